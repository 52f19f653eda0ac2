//! Given / when / then for aggregate tests: past events, a command, the
//! expected events or error.

use std::fmt::Debug;

use super::{Aggregate, DomainError};

pub(crate) struct Given<A: Aggregate>(A);

pub(crate) struct When<A: Aggregate> {
    outcome: Result<Vec<A::Event>, DomainError>,
}

pub(crate) fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in history {
        state.apply(event);
    }
    Given(state)
}

impl<A: Aggregate> Given<A> {
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
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) {
        assert_eq!(self.outcome, Ok(expected.into_iter().collect()));
    }

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
