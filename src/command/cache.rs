//! Aggregate states kept between commands, so a command reads only the
//! events appended since the last one instead of the whole stream.
//!
//! A state is taken out while its stream's turn lasts and put back only when
//! the log holds it (its round's appends all written, or none made), so a
//! failed or abandoned command can never leave a state the log does not
//! hold. Entries from other processes' appends are caught up by reading from
//! the cached version on; a stream that only this process writes is not even
//! read (see [`Cached::others_write`]).

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

/// Stream id → a [`Cached`] state of some aggregate type.
type Entries = HashMap<String, Box<dyn Any + Send>>;

/// A stream's state as of `version`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Cached<A> {
    pub(super) version: u64,
    pub(super) state: A,
    /// Whether another writer appended to the stream lately: the last read
    /// found events this process had not folded (or loaded it anew). Only
    /// then does a round read before deciding; otherwise it decides on this
    /// state at once, and the expected version of its first append proves
    /// the state current.
    pub(super) others_write: bool,
}

/// A bounded map of stream id → [`Cached`] state.
#[derive(Debug)]
pub(super) struct StateCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl StateCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Takes the state of `stream_id` out, if cached and of type `A`.
    pub(super) fn take<A: Send + 'static>(&self, stream_id: &str) -> Option<Cached<A>> {
        let cached = self.lock().remove(stream_id)?;
        cached.downcast::<Cached<A>>().ok().map(|cached| *cached)
    }

    /// Puts a state back; when full, makes room by dropping another entry
    /// (any: a miss only costs one full read of that stream).
    pub(super) fn put<A: Send + 'static>(&self, stream_id: String, cached: Cached<A>) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.capacity
            && let Some(victim) = entries.keys().next().cloned()
        {
            entries.remove(&victim);
        }
        entries.insert(stream_id, Box::new(cached));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The map holds no invariant a panicking holder could break.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<A>(version: u64, state: A) -> Cached<A> {
        Cached {
            version,
            state,
            others_write: false,
        }
    }

    #[test]
    fn a_taken_state_is_gone_until_put_back() {
        let cache = StateCache::new(4);
        cache.put("s".into(), at(3, 42u32));
        assert_eq!(cache.take::<u32>("s"), Some(at(3, 42)));
        assert_eq!(cache.take::<u32>("s"), None);
    }

    #[test]
    fn a_state_of_another_type_is_a_miss() {
        let cache = StateCache::new(4);
        cache.put("s".into(), at(1, 1u8));
        assert_eq!(cache.take::<u32>("s"), None);
    }

    #[test]
    fn capacity_bounds_the_entries() {
        let cache = StateCache::new(2);
        for i in 0..10u64 {
            cache.put(format!("s{i}"), at(i, i));
        }
        assert_eq!(cache.lock().len(), 2);
        assert_eq!(cache.take::<u64>("s9"), Some(at(9, 9)));
    }
}
