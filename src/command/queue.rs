//! Commands that queue on one stream run together.
//!
//! A stream with commands waiting has a queue and one leader: the command
//! that found no queue. The leader takes what has queued, decides each
//! command on the state the ones before it leave, commits them as one chain
//! (one commit for all), answers each, and goes on with what queued
//! meanwhile; with nothing left, the queue goes. So a hot stream costs a
//! commit per round, not per command, two streams never wait on each other,
//! and memory follows the commands in flight, not the streams ever seen.

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// (job type, stream id) → its queue: a `VecDeque` of that job type.
type Entries = HashMap<(TypeId, String), Box<dyn Any + Send>>;

#[derive(Debug, Default)]
pub(super) struct Queues {
    entries: Mutex<Entries>,
}

impl Queues {
    /// Queues `job` on `stream`; `true` when the caller must lead it, as
    /// no leader runs there.
    pub(super) fn push<J: Send + 'static>(&self, stream: &str, job: J) -> bool {
        let mut entries = self.lock();
        match entries.get_mut(&key::<J>(stream)) {
            Some(queue) => {
                jobs::<J>(queue).push_back(job);
                false
            }
            None => {
                entries.insert(key::<J>(stream), Box::new(VecDeque::from([job])));
                true
            }
        }
    }

    /// Puts jobs back at the head of the queue, in order, for the leader's
    /// next round.
    pub(super) fn requeue<J: Send + 'static>(&self, stream: &str, requeued: Vec<J>) {
        let mut entries = self.lock();
        let queue = entries
            .entry(key::<J>(stream))
            .or_insert_with(|| Box::new(VecDeque::<J>::new()));
        let queue = jobs::<J>(queue);
        for job in requeued.into_iter().rev() {
            queue.push_front(job);
        }
    }

    /// The leader's next round: up to `max` jobs, oldest first. None left
    /// ends the leader: the queue is removed, and the next command leads.
    pub(super) fn take<J: Send + 'static>(&self, stream: &str, max: usize) -> Vec<J> {
        let mut entries = self.lock();
        let key = key::<J>(stream);
        let Some(queue) = entries.get_mut(&key) else {
            return Vec::new();
        };
        let queue = jobs::<J>(queue);
        if queue.is_empty() {
            entries.remove(&key);
            return Vec::new();
        }
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// Ends a leader that stopped early (it panicked): the jobs it left are
    /// dropped, which answers their callers with an error, and the next
    /// command leads anew.
    pub(super) fn abandon<J: Send + 'static>(&self, stream: &str) {
        self.lock().remove(&key::<J>(stream));
    }

    /// Streams with a leader.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The map holds no invariant a panicking holder could break.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn key<J: 'static>(stream: &str) -> (TypeId, String) {
    (TypeId::of::<J>(), stream.to_owned())
}

fn jobs<J: 'static>(queue: &mut Box<dyn Any + Send>) -> &mut VecDeque<J> {
    queue
        .downcast_mut::<VecDeque<J>>()
        .expect("a queue is keyed by its job type")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_command_on_a_stream_leads_and_the_others_queue_behind_it() {
        let queues = Queues::default();
        assert!(queues.push("a", 1u32));
        assert!(!queues.push("a", 2u32));
        assert!(queues.push("b", 10u32), "another stream has its own leader");
        assert!(!queues.push("a", 3u32));
        assert_eq!(queues.take::<u32>("a", 2), [1, 2]);
        queues.requeue("a", vec![2u32]);
        assert_eq!(queues.take::<u32>("a", 10), [2, 3]);
        assert!(!queues.push("a", 4u32), "the leader still runs");
        assert_eq!(queues.take::<u32>("a", 10), [4]);
        assert!(queues.take::<u32>("a", 10).is_empty());
        assert!(queues.push("a", 5u32), "an ended leader is replaced");
        assert_eq!(queues.active(), 2);
    }

    #[test]
    fn jobs_of_another_type_on_the_same_stream_have_their_own_queue() {
        let queues = Queues::default();
        assert!(queues.push("a", 1u32));
        assert!(queues.push("a", "x"));
        assert_eq!(queues.take::<&str>("a", 10), ["x"]);
        assert!(queues.take::<&str>("a", 10).is_empty());
        assert_eq!(queues.take::<u32>("a", 10), [1]);
    }

    #[test]
    fn nothing_is_remembered_once_idle() {
        let queues = Queues::default();
        assert!(queues.push("a", 1u32));
        assert_eq!(queues.take::<u32>("a", 10), [1]);
        assert!(queues.take::<u32>("a", 10).is_empty());
        queues.push("b", 1u32);
        queues.abandon::<u32>("b");
        assert_eq!(queues.active(), 0);
    }
}
