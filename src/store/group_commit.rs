//! Group commit: concurrent appends queue up and a writer commits them in
//! batches, one durable transaction (one fsync) per batch.
//!
//! A writer takes whatever has queued while the previous commit was flushing,
//! so batches grow with load on their own and a lone append waits for no
//! timer.
//!
//! With several writers (PostgreSQL), appends are partitioned by stream: one
//! stream always goes to the same writer, so writers of one process never
//! queue behind each other's row locks, and a hot stream's appends gather
//! into that writer's batches instead of being spread thin.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{AppendOutcome, AppendRequest, StoreError};

/// Most appends one transaction takes; bounds the latency a batch adds.
pub(crate) const MAX_BATCH: usize = 512;

/// Appends waiting for a writer, beyond which callers wait to enqueue.
const QUEUE_DEPTH: usize = 4096;

/// An append waiting for its batch to commit.
#[derive(Debug)]
pub(crate) struct Pending {
    pub request: AppendRequest,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

impl Pending {
    /// Answers the caller; one that gave up waiting is no longer listening.
    pub fn answer(self, outcome: Result<AppendOutcome, StoreError>) {
        let _ = self.reply.send(outcome);
    }
}

/// The handle callers append through.
#[derive(Debug, Clone)]
pub(crate) struct Submitter {
    partitions: Arc<[mpsc::Sender<Pending>]>,
    hasher: RandomState,
}

/// The writer's end: yields batches of pending appends.
#[derive(Debug)]
pub(crate) struct Batches(mpsc::Receiver<Pending>);

/// A queue split into `writers` partitions (at least one), one per writer.
pub(crate) fn queue(writers: usize) -> (Submitter, Vec<Batches>) {
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

impl Submitter {
    /// Queues an append and waits until its batch has committed.
    pub async fn submit(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let partition = self.hasher.hash_one(&request.stream_id) as usize % self.partitions.len();
        self.partitions[partition]
            .send(Pending { request, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Batches {
    /// The next batch, waiting for its first append; `None` once every
    /// submitter is gone.
    pub async fn next(&mut self) -> Option<Vec<Pending>> {
        let first = self.0.recv().await?;
        Some(self.fill(first))
    }

    /// [`Batches::next`] for a writer on its own thread.
    pub fn next_blocking(&mut self) -> Option<Vec<Pending>> {
        let first = self.0.blocking_recv()?;
        Some(self.fill(first))
    }

    fn fill(&mut self, first: Pending) -> Vec<Pending> {
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

fn stopped() -> StoreError {
    StoreError::Unavailable("the event store's writer has stopped".into())
}
