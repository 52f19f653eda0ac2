//! Given / when / then for aggregate tests: past events, a command, the
//! expected events or error. Pure: no store, no runtime.

use std::fmt::Debug;

use super::{Aggregate, DomainError};

/// An aggregate with its history applied.
#[derive(Debug)]
pub struct Given<A: Aggregate>(A);

/// What the aggregate decided.
#[derive(Debug)]
pub struct When<A: Aggregate> {
    outcome: Result<Vec<A::Event>, DomainError>,
}

/// The aggregate after `history`.
pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in history {
        state.apply(event);
    }
    Given(state)
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` for the aggregate `id`.
    pub fn when(self, id: &str, command: A::Command) -> When<A> {
        When {
            outcome: self.0.decide(id, &command),
        }
    }
}

impl<A: Aggregate> When<A>
where
    A::Event: Debug + PartialEq,
{
    /// Expects exactly these events.
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) {
        assert_eq!(self.outcome, Ok(expected.into_iter().collect()));
    }

    /// Expects this refusal.
    pub fn then_err(self, expected: DomainError) {
        assert_eq!(self.outcome, Err(expected));
    }

    /// Expects a refusal by the named precondition rule.
    pub fn then_rule(self, expected: &str) {
        match self.outcome {
            Err(DomainError::Precondition { rule, .. }) => assert_eq!(rule, expected),
            other => panic!("expected a {expected} refusal, got {other:?}"),
        }
    }
}
