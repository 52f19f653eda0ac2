//! Aggregate states kept between commands, so a command reads only the
//! events appended since the last one instead of the whole stream.
//!
//! A state is taken out while its stream's turn lasts and put back only after
//! a successful append, so a failed or abandoned command can never leave a
//! state that the log does not hold. Entries from other processes' appends
//! are caught up by reading from the cached version on.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

/// Stream id → (version, state of some aggregate type).
type Entries = HashMap<String, (u64, Box<dyn Any + Send>)>;

/// A bounded map of stream id → (version, state).
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
    pub(super) fn take<A: Send + 'static>(&self, stream_id: &str) -> Option<(u64, A)> {
        let (version, state) = self.lock().remove(stream_id)?;
        state.downcast::<A>().ok().map(|state| (version, *state))
    }

    /// Puts a state back; when full, makes room by dropping another entry
    /// (any: a miss only costs one full read of that stream).
    pub(super) fn put<A: Send + 'static>(&self, stream_id: String, version: u64, state: A) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.capacity
            && let Some(victim) = entries.keys().next().cloned()
        {
            entries.remove(&victim);
        }
        entries.insert(stream_id, (version, Box::new(state)));
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

    #[test]
    fn a_taken_state_is_gone_until_put_back() {
        let cache = StateCache::new(4);
        cache.put("s".into(), 3, 42u32);
        assert_eq!(cache.take::<u32>("s"), Some((3, 42)));
        assert_eq!(cache.take::<u32>("s"), None);
    }

    #[test]
    fn a_state_of_another_type_is_a_miss() {
        let cache = StateCache::new(4);
        cache.put("s".into(), 1, 1u8);
        assert_eq!(cache.take::<u32>("s"), None);
    }

    #[test]
    fn capacity_bounds_the_entries() {
        let cache = StateCache::new(2);
        for i in 0..10u64 {
            cache.put(format!("s{i}"), i, i);
        }
        assert_eq!(cache.lock().len(), 2);
        assert_eq!(cache.take::<u64>("s9"), Some((9, 9)));
    }
}
