//! Per-stream turns inside one process.
//!
//! One async mutex per stream that has a command running or waiting, made on
//! first use and dropped with its last user: two streams never wait on each
//! other, and memory follows the commands in flight (bounded by the
//! server's concurrency limits), not the number of streams ever seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

type Turns = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

#[derive(Debug, Default)]
pub(super) struct StreamLocks {
    turns: Turns,
}

/// A stream's turn; it lasts until this drops.
#[derive(Debug)]
pub(super) struct Turn<'a> {
    turns: &'a Turns,
    stream_id: String,
    /// `None` while waiting: a cancelled wait still cleans up.
    guard: Option<OwnedMutexGuard<()>>,
}

impl StreamLocks {
    /// Waits for the stream's turn.
    pub(super) async fn lock(&self, stream_id: &str) -> Turn<'_> {
        let mutex = Arc::clone(
            self.turns
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry(stream_id.to_owned())
                .or_default(),
        );
        let mut turn = Turn {
            turns: &self.turns,
            stream_id: stream_id.to_owned(),
            guard: None,
        };
        turn.guard = Some(mutex.lock_owned().await);
        turn
    }

    /// Streams with a command running or waiting.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.turns.lock().unwrap().len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut turns = self
            .turns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Only the map holds it: nobody runs or waits on this stream.
        if turns
            .get(&self.stream_id)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            turns.remove(&self.stream_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_stream_waits_its_turn_and_another_does_not() {
        let locks = StreamLocks::default();
        let first = locks.lock("a").await;
        // Another stream goes ahead at once.
        let other = tokio::time::timeout(Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("an unrelated stream never waits");
        drop(other);
        // The same stream waits until the turn is released.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), locks.lock("a"))
                .await
                .is_err()
        );
        drop(first);
        drop(locks.lock("a").await);
        assert_eq!(locks.active(), 0, "no stream is remembered once idle");
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_behind() {
        let locks = StreamLocks::default();
        let held = locks.lock("a").await;
        let waiting = tokio::time::timeout(Duration::from_millis(10), locks.lock("a")).await;
        assert!(waiting.is_err());
        drop(held);
        assert_eq!(locks.active(), 0);
    }
}
