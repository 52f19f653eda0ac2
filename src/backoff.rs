//! The kernel's one pause policy: exponential backoff with jitter.
//!
//! Every retry loop (a command that lost a race, a batch that lost a row
//! lock, a CAS conflict, a reconnect, a worker waiting out an outage)
//! pauses by a [`Backoff`], so pauses grow the same way everywhere and
//! racing retries never fall into lockstep.

use std::time::Duration;

/// Pauses that double from `first` up to `max`, jittered.
///
/// ```
/// use std::time::Duration;
/// use scaleout::backoff::Backoff;
///
/// let reconnect = Backoff::waiting(Duration::from_millis(100), Duration::from_secs(5));
/// assert_eq!(reconnect.ceiling(3), Duration::from_millis(800));
/// let pause = reconnect.pause(3);
/// assert!(pause >= Duration::from_millis(400) && pause <= Duration::from_millis(800));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

/// How a pause is drawn below its ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere from zero to the ceiling ("full jitter"): spreads writers
    /// that collided the most, for retrying a lost race.
    Full,
    /// From half the ceiling to all of it: never much sooner than planned,
    /// for waiting out something that is down.
    Half,
}

impl Backoff {
    /// Full jitter, for retrying a lost race.
    pub const fn racing(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: Jitter::Full,
        }
    }

    /// Half jitter, for waiting out an outage.
    pub const fn waiting(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: Jitter::Half,
        }
    }

    /// The ceiling of the pause before retry `attempt` (from 0): `first`
    /// doubled `attempt` times, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1 << attempt.min(20))
            .min(self.max)
    }

    /// The pause before retry `attempt` (from 0).
    pub fn pause(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        match self.jitter {
            Jitter::Full => ceiling.mul_f64(fastrand::f64()),
            Jitter::Half => ceiling.mul_f64(0.5 + fastrand::f64() / 2.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_and_stay_under_their_ceiling() {
        let waiting = Backoff::waiting(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings: Vec<u128> = (0..8).map(|n| waiting.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(waiting.ceiling(u32::MAX), Duration::from_secs(5));
        for attempt in 0..10 {
            let pause = waiting.pause(attempt);
            let ceiling = waiting.ceiling(attempt);
            assert!(
                pause >= ceiling / 2 && pause <= ceiling,
                "{pause:?} of {ceiling:?}"
            );
            let racing = Backoff::racing(Duration::from_millis(2), Duration::from_millis(200));
            assert!(racing.pause(attempt) <= racing.ceiling(attempt));
        }
    }

    #[test]
    fn full_jitter_spreads_pauses_across_the_range() {
        let racing = Backoff::racing(Duration::from_millis(100), Duration::from_millis(100));
        let pauses: Vec<Duration> = (0..200).map(|_| racing.pause(0)).collect();
        assert!(pauses.iter().any(|p| *p < Duration::from_millis(25)));
        assert!(pauses.iter().any(|p| *p > Duration::from_millis(75)));
    }
}
