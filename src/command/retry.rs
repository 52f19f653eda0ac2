//! How often and how soon a command that lost a race is decided again.

use std::time::Duration;

use crate::backoff::Backoff;

/// Bounded retries with "full jitter" exponential backoff: the n-th pause is
/// uniform in `[0, min(cap, base * 2^n)]`, so writers that collided once do
/// not collide again in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Decisions after the first one; 0 never retries.
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 10,
            base: Duration::from_millis(2),
            cap: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// The pause before retry number `attempt` (from 0).
    pub fn backoff(&self, attempt: u32) -> Duration {
        Backoff::racing(self.base, self.cap).pause(attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_stays_under_the_cap() {
        let policy = RetryPolicy {
            max_retries: 30,
            base: Duration::from_millis(2),
            cap: Duration::from_millis(50),
        };
        for attempt in 0..30 {
            let ceiling = Duration::from_millis(2 << attempt.min(10)).min(policy.cap);
            for _ in 0..200 {
                assert!(policy.backoff(attempt) <= ceiling, "attempt {attempt}");
            }
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let policy = RetryPolicy::default();
        let pauses: std::collections::HashSet<_> = (0..50).map(|_| policy.backoff(4)).collect();
        assert!(pauses.len() > 40, "pauses should spread out: {pauses:?}");
    }
}
