//! Per-stream turns inside one process.
//!
//! A fixed set of async mutexes, picked by the stream id's hash: memory stays
//! bounded whatever the number of streams, and two streams share a turn only
//! when they hash alike, which at 1,024 shards is rare enough to ignore.

use std::hash::{BuildHasher, RandomState};

use tokio::sync::{Mutex, MutexGuard};

const SHARDS: usize = 1024;

#[derive(Debug)]
pub(super) struct StreamLocks {
    shards: Box<[Mutex<()>]>,
    hasher: RandomState,
}

impl Default for StreamLocks {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl StreamLocks {
    /// Waits for the stream's turn; it lasts until the guard drops.
    pub(super) async fn lock(&self, stream_id: &str) -> MutexGuard<'_, ()> {
        let shard = self.hasher.hash_one(stream_id) as usize % self.shards.len();
        self.shards[shard].lock().await
    }
}
