//! Group commit: concurrent writes queue up and a writer commits them in
//! batches, one durable transaction (one fsync) per batch. The event store
//! (appends) and the embedded document store (CAS writes) both use it.
//!
//! A writer takes whatever has queued while the previous commit was flushing,
//! so batches grow with load on their own and a lone write waits for no
//! timer.
//!
//! With several writers (PostgreSQL), writes are partitioned by a key (the
//! stream): one key always goes to the same writer, so writers of one
//! process never queue behind each other's row locks, and a hot stream's
//! appends gather into that writer's batches instead of being spread thin.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Most writes one transaction takes; bounds the latency a batch adds.
pub(crate) const MAX_BATCH: usize = 512;

/// Writes waiting for a writer, per partition, beyond which callers wait to
/// enqueue.
const QUEUE_DEPTH: usize = 4096;

/// A write waiting for its batch to commit, and where its outcome goes.
#[derive(Debug)]
pub(crate) struct Pending<W, O> {
    pub write: W,
    reply: oneshot::Sender<O>,
}

impl<W, O> Pending<W, O> {
    /// Answers the caller; one that gave up waiting is no longer listening.
    pub fn answer(self, outcome: O) {
        let _ = self.reply.send(outcome);
    }
}

/// The writer has stopped: nothing more will commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// The handle callers write through.
#[derive(Debug)]
pub(crate) struct Submitter<W, O> {
    partitions: Arc<[mpsc::Sender<Pending<W, O>>]>,
    hasher: RandomState,
}

impl<W, O> Clone for Submitter<W, O> {
    fn clone(&self) -> Self {
        Self {
            partitions: Arc::clone(&self.partitions),
            hasher: self.hasher.clone(),
        }
    }
}

/// A writer's end: yields batches of pending writes.
#[derive(Debug)]
pub(crate) struct Batches<W, O>(mpsc::Receiver<Pending<W, O>>);

/// A queue split into `writers` partitions (at least one), one per writer.
pub(crate) fn queue<W, O>(writers: usize) -> (Submitter<W, O>, Vec<Batches<W, O>>) {
    let (senders, batches) = (0..writers.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            (tx, Batches(rx))
        })
        .unzip::<_, _, Vec<_>, _>();
    let submitter = Submitter {
        partitions: senders.into(),
        hasher: RandomState::new(),
    };
    (submitter, batches)
}

impl<W, O> Submitter<W, O> {
    /// Queues `write` on the partition of its `key` and waits until its
    /// batch has committed.
    pub async fn submit(&self, write: W, key: impl FnOnce(&W) -> &str) -> Result<O, Stopped> {
        let partition = self.hasher.hash_one(key(&write)) as usize % self.partitions.len();
        let (reply, answer) = oneshot::channel();
        self.partitions[partition]
            .send(Pending { write, reply })
            .await
            .map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

impl<W, O> Batches<W, O> {
    /// The next batch, waiting for its first write; `None` once every
    /// submitter is gone.
    pub async fn next(&mut self) -> Option<Vec<Pending<W, O>>> {
        let first = self.0.recv().await?;
        Some(self.fill(first))
    }

    /// [`Batches::next`] for a writer on its own thread.
    pub fn next_blocking(&mut self) -> Option<Vec<Pending<W, O>>> {
        let first = self.0.blocking_recv()?;
        Some(self.fill(first))
    }

    fn fill(&mut self, first: Pending<W, O>) -> Vec<Pending<W, O>> {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match self.0.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        batch
    }
}
