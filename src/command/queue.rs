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
use std::sync::atomic::Ordering;

/// (job type, stream id) → its leader and its queue (a `VecDeque` of that
/// job type).
type Entries = HashMap<(TypeId, String), (Lead, Box<dyn Any + Send>)>;

#[derive(Debug, Default)]
pub(super) struct Queues {
    entries: Mutex<Entries>,
    leads: std::sync::atomic::AtomicU64,
}

/// Which leader a queue has: a queue that ended and was made again has
/// another, so a leader acts only on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lead(u64);

impl Queues {
    /// Queues `job` on `stream`; the lead when the caller must lead it, as
    /// no leader runs there.
    pub(super) fn push<J: Send + 'static>(&self, stream: &str, job: J) -> Option<Lead> {
        let mut entries = self.lock();
        if let Some((_, queue)) = entries.get_mut(&key::<J>(stream)) {
            jobs::<J>(queue).push_back(job);
            return None;
        }
        let lead = Lead(self.leads.fetch_add(1, Ordering::Relaxed));
        entries.insert(key::<J>(stream), (lead, Box::new(VecDeque::from([job]))));
        Some(lead)
    }

    /// Puts jobs back at the head of `lead`'s queue, in order, for its next
    /// round.
    pub(super) fn requeue<J: Send + 'static>(&self, stream: &str, lead: Lead, requeued: Vec<J>) {
        let mut entries = self.lock();
        let (_, queue) = entries
            .entry(key::<J>(stream))
            .or_insert_with(|| (lead, Box::new(VecDeque::<J>::new())));
        let queue = jobs::<J>(queue);
        for job in requeued.into_iter().rev() {
            queue.push_front(job);
        }
    }

    /// `lead`'s next round: up to `max` jobs, oldest first. None left ends
    /// the leader: the queue is removed, and the next command leads.
    pub(super) fn take<J: Send + 'static>(&self, stream: &str, lead: Lead, max: usize) -> Vec<J> {
        let mut entries = self.lock();
        let key = key::<J>(stream);
        let Some((_, queue)) = entries.get_mut(&key).filter(|(owner, _)| *owner == lead) else {
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

    /// Ends `lead` whichever way it stops (a leader that panicked leaves
    /// jobs: they are dropped, which answers their callers with an error):
    /// its queue goes, unless it ended already and another leads a new one.
    pub(super) fn end<J: Send + 'static>(&self, stream: &str, lead: Lead) {
        let mut entries = self.lock();
        let key = key::<J>(stream);
        if entries.get(&key).is_some_and(|(owner, _)| *owner == lead) {
            entries.remove(&key);
        }
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
        let lead = queues.push("a", 1u32).expect("the first leads");
        assert!(queues.push("a", 2u32).is_none());
        assert!(
            queues.push("b", 10u32).is_some(),
            "another stream has its own leader"
        );
        assert!(queues.push("a", 3u32).is_none());
        assert_eq!(queues.take::<u32>("a", lead, 2), [1, 2]);
        queues.requeue("a", lead, vec![2u32]);
        assert_eq!(queues.take::<u32>("a", lead, 10), [2, 3]);
        assert!(queues.push("a", 4u32).is_none(), "the leader still runs");
        assert_eq!(queues.take::<u32>("a", lead, 10), [4]);
        assert!(queues.take::<u32>("a", lead, 10).is_empty());
        assert!(
            queues.push("a", 5u32).is_some(),
            "an ended leader is replaced"
        );
        assert_eq!(queues.active(), 2);
    }

    #[test]
    fn a_leader_that_ended_leaves_the_next_ones_queue_alone() {
        let queues = Queues::default();
        let first = queues.push("a", 1u32).unwrap();
        assert_eq!(queues.take::<u32>("a", first, 10), [1]);
        assert!(queues.take::<u32>("a", first, 10).is_empty(), "it ends");
        let next = queues.push("a", 2u32).expect("the next command leads");
        // The first leader on its way out, after the next one started.
        queues.end::<u32>("a", first);
        assert!(queues.take::<u32>("a", first, 10).is_empty());
        assert_eq!(queues.take::<u32>("a", next, 10), [2], "nothing dropped");
    }

    #[test]
    fn jobs_of_another_type_on_the_same_stream_have_their_own_queue() {
        let queues = Queues::default();
        let numbers = queues.push("a", 1u32).unwrap();
        let words = queues.push("a", "x").unwrap();
        assert_eq!(queues.take::<&str>("a", words, 10), ["x"]);
        assert!(queues.take::<&str>("a", words, 10).is_empty());
        assert_eq!(queues.take::<u32>("a", numbers, 10), [1]);
    }

    #[test]
    fn nothing_is_remembered_once_idle() {
        let queues = Queues::default();
        let lead = queues.push("a", 1u32).unwrap();
        assert_eq!(queues.take::<u32>("a", lead, 10), [1]);
        assert!(queues.take::<u32>("a", lead, 10).is_empty());
        let panicked = queues.push("b", 1u32).unwrap();
        queues.end::<u32>("b", panicked);
        assert_eq!(queues.active(), 0);
    }
}
