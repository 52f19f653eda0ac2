//! Where writers contend: which streams lose the most command races and
//! which documents the most CAS races, over a sliding window.
//!
//! Every key cannot be counted: anyone who sends commands picks stream ids.
//! Each slot of the window keeps at most [`TRACKED`] keys the way the
//! Space-Saving algorithm does: a key new to a full slot takes the place of
//! the slot's least-counted key and inherits its count. So every key that
//! lost more races than that minimum is in the report, in order, and a
//! count overstates the truth by at most the minimum it inherited (exact
//! while a slot sees no more than [`TRACKED`] keys).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys counted per slot.
pub const TRACKED: usize = 512;
/// Slots in the window; the oldest is forgotten as a new one starts.
const SLOTS: u64 = 6;
/// The time one slot covers.
const SLOT: Duration = Duration::from_secs(10);
/// The stretch of time a report covers.
pub const WINDOW: Duration = Duration::from_secs(SLOTS * SLOT.as_secs());
/// Longest key kept, in bytes: a key is reported, never used as an address.
const MAX_KEY_BYTES: usize = 256;
/// Keys per kind on the metrics page: each is a series, so they are few.
const METRIC_RANKS: usize = 10;

/// A key and the races it lost in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hot {
    pub key: String,
    pub lost: u64,
}

/// One process's contention: command races lost per stream, CAS races lost
/// per document.
#[derive(Debug)]
pub struct Contention {
    streams: HotKeys,
    documents: HotKeys,
}

impl Default for Contention {
    fn default() -> Self {
        Self::new()
    }
}

impl Contention {
    pub fn new() -> Self {
        Self {
            streams: HotKeys::new(Instant::now()),
            documents: HotKeys::new(Instant::now()),
        }
    }

    /// A command on `stream` lost a race to another writer: decided again,
    /// or refused for a version that had moved.
    pub fn lost_command_race(&self, stream: &str) {
        self.streams.record(stream, Instant::now());
    }

    /// A write of `document` lost a CAS race and is read and folded again.
    pub fn lost_cas_race(&self, document: &str) {
        self.documents.record(document, Instant::now());
    }

    /// The `limit` streams that lost the most races in the window, most first.
    pub fn hot_streams(&self, limit: usize) -> Vec<Hot> {
        self.streams.top(limit, Instant::now())
    }

    /// The `limit` documents that lost the most races in the window.
    pub fn hot_documents(&self, limit: usize) -> Vec<Hot> {
        self.documents.top(limit, Instant::now())
    }

    /// The hottest keys as Prometheus gauges labelled by rank, so that the
    /// series stay bounded however many keys contend.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let window = WINDOW.as_secs();
        for (name, label, help, hot) in [
            (
                "scaleout_contention_stream_lost_races",
                "stream",
                "command races lost (decided again or refused)",
                self.hot_streams(METRIC_RANKS),
            ),
            (
                "scaleout_contention_document_lost_races",
                "document",
                "document writes that lost a CAS race",
                self.hot_documents(METRIC_RANKS),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} The {METRIC_RANKS} most contended keys over the last {window} s: {help}.\n\
                 # TYPE {name} gauge"
            );
            for (rank, Hot { key, lost }) in hot.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{rank=\"{}\",{label}=\"{}\"}} {lost}",
                    rank + 1,
                    escape_label(key)
                );
            }
        }
        out
    }
}

/// A label value in the Prometheus text format.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Counts per key over a sliding window of slots.
#[derive(Debug)]
struct HotKeys {
    origin: Instant,
    slots: Mutex<Vec<Slot>>,
}

/// One slot's counts, numbered from the origin so that a stale slot is
/// recognised and started afresh.
#[derive(Debug, Default)]
struct Slot {
    number: u64,
    counts: HashMap<String, u64>,
}

impl HotKeys {
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            slots: Mutex::new((0..SLOTS).map(|_| Slot::default()).collect()),
        }
    }

    fn slot_number(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        elapsed.as_secs() / SLOT.as_secs()
    }

    fn record(&self, key: &str, now: Instant) {
        let number = self.slot_number(now);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let index = usize::try_from(number % SLOTS).unwrap_or_default();
        let slot = &mut slots[index];
        if slot.number != number {
            *slot = Slot {
                number,
                counts: HashMap::new(),
            };
        }
        let key = clip(key);
        if let Some(count) = slot.counts.get_mut(key) {
            *count += 1;
            return;
        }
        let inherited = if slot.counts.len() < TRACKED {
            0
        } else {
            let (least, count) = slot
                .counts
                .iter()
                .min_by_key(|(_, count)| **count)
                .map(|(key, count)| (key.clone(), *count))
                .unwrap_or_default();
            slot.counts.remove(&least);
            count
        };
        slot.counts.insert(key.to_owned(), inherited + 1);
    }

    fn top(&self, limit: usize, now: Instant) -> Vec<Hot> {
        let current = self.slot_number(now);
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut totals: HashMap<&str, u64> = HashMap::new();
        for slot in slots.iter().filter(|s| s.number + SLOTS > current) {
            for (key, count) in &slot.counts {
                *totals.entry(key).or_default() += count;
            }
        }
        let mut hot: Vec<Hot> = totals
            .into_iter()
            .map(|(key, lost)| Hot {
                key: key.to_owned(),
                lost,
            })
            .collect();
        hot.sort_by(|a, b| b.lost.cmp(&a.lost).then_with(|| a.key.cmp(&b.key)));
        hot.truncate(limit);
        hot
    }
}

/// `key` cut to [`MAX_KEY_BYTES`] at a character boundary.
fn clip(key: &str) -> &str {
    let mut end = key.len().min(MAX_KEY_BYTES);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hot(key: &str, lost: u64) -> Hot {
        Hot {
            key: key.into(),
            lost,
        }
    }

    #[test]
    fn ranks_keys_by_races_lost_in_the_window() {
        let start = Instant::now();
        let keys = HotKeys::new(start);
        for _ in 0..5 {
            keys.record("counter-hot", start);
        }
        keys.record("counter-cold", start);
        keys.record("counter-warm", start + SLOT);
        keys.record("counter-warm", start + SLOT);
        let later = start + SLOT * 2;
        assert_eq!(
            keys.top(10, later),
            [
                hot("counter-hot", 5),
                hot("counter-warm", 2),
                hot("counter-cold", 1)
            ]
        );
        assert_eq!(keys.top(1, later), [hot("counter-hot", 5)]);
    }

    #[test]
    fn forgets_races_older_than_the_window() {
        let start = Instant::now();
        let keys = HotKeys::new(start);
        keys.record("old", start);
        keys.record("recent", start + WINDOW - SLOT);
        // The slot `old` was counted in is reused for the new one.
        keys.record("new", start + WINDOW);
        assert_eq!(
            keys.top(10, start + WINDOW),
            [hot("new", 1), hot("recent", 1)]
        );
        assert_eq!(keys.top(10, start + WINDOW * 3), []);
    }

    #[test]
    fn a_flood_of_new_keys_cannot_push_out_the_hot_one() {
        let start = Instant::now();
        let keys = HotKeys::new(start);
        for _ in 0..100 {
            keys.record("counter-hot", start);
        }
        // Ten times as many distinct keys as are tracked, each losing once.
        for n in 0..TRACKED * 10 {
            keys.record(&format!("flood-{n}"), start);
        }
        let top = keys.top(2, start);
        assert_eq!(top[0], hot("counter-hot", 100));
        // A newcomer inherits the least count it displaced, which is at
        // most the races lost per tracked key: 5,120 over 512 here.
        assert!(top[1].lost <= 11, "{top:?}");
        let slots = keys.slots.lock().unwrap();
        assert!(slots.iter().all(|s| s.counts.len() <= TRACKED));
    }

    #[test]
    fn long_keys_are_clipped_and_labels_escaped() {
        let contention = Contention::new();
        contention.lost_cas_race(&"é".repeat(MAX_KEY_BYTES));
        contention.lost_command_race("a\"b\\c\nd");
        let documents = contention.hot_documents(1);
        assert_eq!(documents[0].key.len(), MAX_KEY_BYTES);
        let page = contention.render();
        assert!(
            page.contains(
                "scaleout_contention_stream_lost_races{rank=\"1\",stream=\"a\\\"b\\\\c\\nd\"} 1\n"
            ),
            "{page}"
        );
        assert!(page.contains("# TYPE scaleout_contention_document_lost_races gauge\n"));
    }
}
