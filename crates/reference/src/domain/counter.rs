//! The counter aggregate: the scale-out sample, one hot stream.

use scaleout::domain::{Aggregate, DomainError};
use scaleout::domain_event;

use super::values::Amount;
use crate::pb;

domain_event!(
    /// Everything that happens to a counter.
    CounterEvent {
        Incremented(pb::CounterIncremented),
    }
);

/// What a user can ask of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterCommand {
    /// Adds to the counter, creating it on first use.
    Increment { amount: Amount },
}

/// A counter needs no state to decide: every increment is valid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter;

impl Aggregate for Counter {
    const STREAM_TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;

    fn decide(&self, id: &str, command: &CounterCommand) -> Result<Vec<CounterEvent>, DomainError> {
        let CounterCommand::Increment { amount } = command;
        Ok(vec![CounterEvent::Incremented(pb::CounterIncremented {
            counter_id: id.to_owned(),
            amount: amount.get(),
        })])
    }

    fn apply(&mut self, _event: CounterEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use scaleout::domain::testing::given;

    #[test]
    fn increment_records_the_amount() {
        let incremented = |amount| {
            CounterEvent::Incremented(pb::CounterIncremented {
                counter_id: "c".into(),
                amount,
            })
        };
        given::<Counter>([incremented(2)])
            .when(
                "c",
                CounterCommand::Increment {
                    amount: Amount::parse(3).unwrap(),
                },
            )
            .then([incremented(3)]);
    }
}
