//! The documents, per bucket, shared by every connection, with real CAS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::protocol::status;

/// One stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: Vec<u8>,
    pub flags: u32,
    pub datatype: u8,
    pub cas: u64,
}

/// How a mutation treats what is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SET: create or overwrite (checked against `cas` unless it is 0).
    Set,
    /// ADD: only if absent.
    Add,
    /// REPLACE: only if present (checked against `cas` unless it is 0).
    Replace,
}

/// Bucket name → key → document.
type Buckets = HashMap<String, HashMap<Vec<u8>, Item>>;

/// Every bucket's documents.
#[derive(Debug, Clone)]
pub struct Store {
    buckets: Arc<Mutex<Buckets>>,
    /// The last CAS handed out; every mutation takes the next one.
    last_cas: Arc<Mutex<u64>>,
}

impl Store {
    pub fn new(buckets: &[String]) -> Self {
        let buckets = buckets
            .iter()
            .map(|name| (name.clone(), HashMap::new()))
            .collect();
        // Start where a real server's hybrid-logical-clock CAS would be.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| {
                u64::try_from(d.as_nanos()).unwrap_or(u64::MAX) & !0xffff
            });
        Self {
            buckets: Arc::new(Mutex::new(buckets)),
            last_cas: Arc::new(Mutex::new(now)),
        }
    }

    pub fn has_bucket(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_cas(&self) -> u64 {
        let mut last = self
            .last_cas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *last += 1;
        *last
    }

    pub fn get(&self, bucket: &str, key: &[u8]) -> Result<Item, u16> {
        self.lock()
            .get(bucket)
            .and_then(|documents| documents.get(key))
            .cloned()
            .ok_or(status::KEY_ENOENT)
    }

    /// Stores `item` (its `cas` is ignored) if `mode` and `cas` allow; returns the new CAS.
    pub fn mutate(
        &self,
        bucket: &str,
        key: &[u8],
        mode: Mode,
        cas: u64,
        mut item: Item,
    ) -> Result<u64, u16> {
        let mut buckets = self.lock();
        let documents = buckets.get_mut(bucket).ok_or(status::NO_BUCKET)?;
        let current = documents.get(key).map(|item| item.cas);
        match (mode, current) {
            (Mode::Add, Some(_)) => return Err(status::KEY_EEXISTS),
            (Mode::Replace, None) => return Err(status::KEY_ENOENT),
            (Mode::Set, None) if cas != 0 => return Err(status::KEY_ENOENT),
            (Mode::Set | Mode::Replace, Some(current)) if cas != 0 && cas != current => {
                return Err(status::KEY_EEXISTS);
            }
            _ => {}
        }
        item.cas = self.next_cas();
        let cas = item.cas;
        documents.insert(key.to_vec(), item);
        Ok(cas)
    }

    /// Deletes if present and `cas` (unless 0) matches; returns a new CAS.
    pub fn delete(&self, bucket: &str, key: &[u8], cas: u64) -> Result<u64, u16> {
        let mut buckets = self.lock();
        let documents = buckets.get_mut(bucket).ok_or(status::NO_BUCKET)?;
        match documents.get(key) {
            None => return Err(status::KEY_ENOENT),
            Some(item) if cas != 0 && item.cas != cas => return Err(status::KEY_EEXISTS),
            Some(_) => {}
        }
        documents.remove(key);
        Ok(self.next_cas())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(value: &[u8]) -> Item {
        Item {
            value: value.to_vec(),
            flags: 0,
            datatype: 0,
            cas: 0,
        }
    }

    #[test]
    fn cas_semantics_follow_couchbase() {
        let store = Store::new(&["b".to_owned()]);
        let first = store.mutate("b", b"k", Mode::Add, 0, item(b"1")).unwrap();
        assert_eq!(
            store.mutate("b", b"k", Mode::Add, 0, item(b"2")),
            Err(status::KEY_EEXISTS)
        );
        let second = store
            .mutate("b", b"k", Mode::Replace, first, item(b"2"))
            .unwrap();
        assert!(second > first);
        assert_eq!(
            store.mutate("b", b"k", Mode::Replace, first, item(b"3")),
            Err(status::KEY_EEXISTS)
        );
        assert_eq!(
            store.mutate("b", b"x", Mode::Replace, 0, item(b"3")),
            Err(status::KEY_ENOENT)
        );
        assert_eq!(store.delete("b", b"k", first), Err(status::KEY_EEXISTS));
        store.delete("b", b"k", second).unwrap();
        assert_eq!(store.get("b", b"k"), Err(status::KEY_ENOENT));
    }
}
