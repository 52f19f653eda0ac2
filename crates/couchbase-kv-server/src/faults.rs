//! Failures a running server can be switched into while clients stay
//! connected, so tests see what the SDK — and the code above it — does when
//! Couchbase Server misbehaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// One way to fail; at most one is active at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Accept connections and read requests but answer nothing, like a
    /// SIGSTOPped server. Requests read while frozen are answered late, in
    /// order, once the freeze is cleared (like after SIGCONT), unless the
    /// client has closed that connection meanwhile.
    Freeze,
    /// Data operations (GET, SET, ADD, REPLACE, DELETE) answer TMPFAIL
    /// (0x86), as during warm-up or with a full write queue.
    TemporaryFailure,
    /// Data operations answer NOT_MY_VBUCKET (0x07) with the bucket config,
    /// whose `rev` goes up when this fault is set, as while a rebalance
    /// moves vBuckets.
    NotMyVbucket,
    /// Mutations (SET, ADD, REPLACE, DELETE) close their connection without
    /// an answer — after the write is done if `applied`, before it if not:
    /// to the client the write may or may not have happened.
    DropMidWrite { applied: bool },
}

/// The switch for one server's faults; clones control the same server.
#[derive(Debug, Clone)]
pub struct Faults(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    active: watch::Sender<Option<Fault>>,
    /// The `rev` of every config this server hands out.
    config_rev: AtomicU64,
}

impl Faults {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Shared {
            active: watch::Sender::new(None),
            config_rev: AtomicU64::new(1),
        }))
    }

    /// Switches to `fault`, replacing any other; applies to requests read
    /// from now on.
    pub fn set(&self, fault: Fault) {
        if fault == Fault::NotMyVbucket {
            self.0.config_rev.fetch_add(1, Ordering::SeqCst);
        }
        self.0.active.send_replace(Some(fault));
    }

    /// Back to answering normally (a frozen server answers what it read).
    pub fn clear(&self) {
        self.0.active.send_replace(None);
    }

    pub fn active(&self) -> Option<Fault> {
        *self.0.active.borrow()
    }

    /// The cluster config revision the server serves now.
    pub fn config_rev(&self) -> u64 {
        self.0.config_rev.load(Ordering::SeqCst)
    }

    /// Returns once the server is not frozen.
    pub(crate) async fn thawed(&self) {
        let mut active = self.0.active.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = active.wait_for(|fault| *fault != Some(Fault::Freeze)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn not_my_vbucket_bumps_the_config_and_a_freeze_thaws() {
        let faults = Faults::new();
        assert_eq!((faults.active(), faults.config_rev()), (None, 1));
        faults.set(Fault::TemporaryFailure);
        assert_eq!(faults.config_rev(), 1);
        faults.set(Fault::NotMyVbucket);
        assert_eq!(
            (faults.active(), faults.config_rev()),
            (Some(Fault::NotMyVbucket), 2)
        );

        faults.set(Fault::Freeze);
        let waiting = tokio::spawn({
            let faults = faults.clone();
            async move { faults.thawed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        faults.clear();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("thawed once cleared")
            .unwrap();
    }
}
