//! Reading the event log as a whole: the port read models heal and rebuild
//! through, and a follower that catches up and then waits for commits.
//!
//! The log is the source of truth and the bus only its fast path, so every
//! part of the read side can reach it: in-process through the store itself
//! ([`StoreLog`]), from another process through the read API over gRPC
//! ([`crate::grpc::RemoteLog`]). Positions are handed out in commit order
//! (see [`EventStore::read_all`]), so a reader's next position is a complete
//! checkpoint.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::store::{EventStore, LogFilter, LogPage, RecordedEvent, StoreError};

/// Where the read side reads the log.
#[async_trait]
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// Up to `limit` events of a stream from `from_version`, in order.
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// A page of the log from `from_position` (see [`EventStore::read_all`]).
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError>;

    /// Notified after each commit, when the log is in this process; a
    /// follower of a remote log polls instead.
    fn appended(&self) -> Option<&Notify>;
}

/// The log of a store in this process.
#[derive(Debug, Clone)]
pub struct StoreLog(pub Arc<dyn EventStore>);

#[async_trait]
impl EventLog for StoreLog {
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.0.read_stream(stream_id, from_version, limit).await
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        self.0.read_all(from_position, limit, filter).await
    }

    fn appended(&self) -> Option<&Notify> {
        Some(self.0.appended())
    }
}

/// What one step of a [`Follower`] brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The events that passed the filter; empty when the step only moved
    /// past events that did not, or just reached the head.
    pub events: Vec<RecordedEvent>,
    /// Where the follower continues.
    pub next_position: u64,
    /// Whether every committed event before `next_position` has been read.
    pub caught_up: bool,
}

/// Reads the log from a position onwards: pages while behind, then waits at
/// the head for commits (woken by this process's own, polling for others').
#[derive(Debug)]
pub struct Follower {
    log: Arc<dyn EventLog>,
    next: u64,
    filter: LogFilter,
    page: usize,
    poll: Duration,
    /// Whether the last step said so, so the head is reported once, not at
    /// every wake-up.
    at_head: bool,
}

impl Follower {
    /// Follows from `from_position` (0 and 1 both mean the start), reading
    /// `page` events at a time and looking for other processes' commits
    /// every `poll`.
    pub fn new(
        log: Arc<dyn EventLog>,
        from_position: u64,
        filter: LogFilter,
        page: usize,
        poll: Duration,
    ) -> Self {
        Self {
            log,
            next: from_position.max(1),
            filter,
            page: page.max(1),
            poll,
            at_head: false,
        }
    }

    /// The next step: events if any have committed past the position,
    /// otherwise (once) a step saying the head is reached, otherwise it
    /// waits for a commit. Cancel-safe: a step that was not returned was not
    /// taken.
    pub async fn next(&mut self) -> Result<Step, StoreError> {
        loop {
            // Registered before reading, so a commit in between still wakes us.
            let mut notified = self.log.appended().map(|n| Box::pin(n.notified()));
            if let Some(notified) = notified.as_mut() {
                notified.as_mut().enable();
            }
            let page = self
                .log
                .read_all(self.next, self.page, &self.filter)
                .await?;
            let caught_up = page.next_position > page.head;
            if !page.events.is_empty()
                || page.next_position > self.next
                || !self.at_head && caught_up
            {
                self.next = page.next_position;
                self.at_head = caught_up;
                return Ok(Step {
                    events: page.events,
                    next_position: self.next,
                    caught_up,
                });
            }
            match notified {
                Some(notified) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(self.poll) => {}
                    }
                }
                None => tokio::time::sleep(self.poll).await,
            }
        }
    }
}
