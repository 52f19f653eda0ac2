//! Generations of a read model: the documents of one projection built from
//! the log at one time. Queries read the *serving* generation; a rebuild
//! builds the next one beside it while the serving one keeps answering, and
//! a switch makes it serve in one step.
//!
//! Each projection's state is one document, `_generation::<projection>`,
//! written with CAS like every other. Generation 1 keeps its documents under
//! their own keys (so the read models of a deployment that predates
//! generations are its generation 1); generation `n > 1` under
//! `_g<n>::<key>`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::documents::{Cas, DocumentError, DocumentStore};

/// How long a process trusts the state it last read: projectors write, and
/// queries read, the serving generation as of at most this long ago.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long the generation that stopped serving is still read beside the
/// new one (a query answers with whichever document has applied more), and
/// written by the finished rebuild: processes that last read the state
/// before the switch keep writing the old generation for up to [`REFRESH`].
pub const HANDOVER: Duration = Duration::from_secs(5);

/// A generation number; generation 1 is the first build.
pub type Generation = u32;

/// The key of `key`'s document in `generation`.
pub fn key_in(generation: Generation, key: &str) -> String {
    if generation <= 1 {
        key.to_owned()
    } else {
        format!("_g{generation}::{key}")
    }
}

/// A rebuild under way: which generation, who builds it, how far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub generation: Generation,
    /// The process building it; another takes over once its lease lapses.
    pub owner: String,
    pub lease_until_ms: u64,
    pub started_ms: u64,
    /// The next log position to fold (everything before it is in).
    pub next_position: u64,
    /// The log's head when progress was last recorded.
    pub head: u64,
    /// Events folded per second, over the build so far.
    pub events_per_second: f64,
    /// Whether it is within a page of the head: it can serve.
    pub caught_up: bool,
    /// Switch to it as soon as it has caught up (a new read model's first
    /// build does; a rebuild waits to be told).
    pub switch_when_ready: bool,
}

/// How far a build is, for an operator.
pub(crate) fn progress(next_position: u64, head: u64) -> String {
    // The head is recorded with the first progress (an empty log is caught
    // up at once, so a build still waiting on it has recorded none).
    if head == 0 {
        "no progress recorded yet".to_owned()
    } else {
        format!("at position {next_position}, head {head}")
    }
}

/// One projection's generations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationState {
    /// What queries read; `None` until a first build has caught up.
    pub serving: Option<Generation>,
    /// The generation that served before, and when it stopped (ms since the
    /// epoch): read beside the new one during [`HANDOVER`], and what
    /// [`drop`](super::rebuild::drop_generation) may remove.
    pub previous: Option<Generation>,
    pub switched_ms: u64,
    pub building: Option<Build>,
    /// The highest generation ever started, so a new one never reuses keys.
    pub newest: Generation,
}

impl GenerationState {
    /// What a projection with no state document has: a deployment that
    /// predates generations serves its read models as generation 1.
    fn legacy() -> Self {
        Self {
            serving: Some(1),
            newest: 1,
            ..Self::default()
        }
    }

    /// The generation live projectors write: the serving one, else the one
    /// a first build is filling (live events there are folded from the log
    /// like any other, so both may write it).
    pub fn written(&self) -> Option<Generation> {
        self.serving
            .or_else(|| self.building.as_ref().map(|b| b.generation))
    }

    /// The generation still read beside the serving one, if its handover is
    /// not over.
    pub fn handing_over(&self, now_ms: u64) -> Option<Generation> {
        self.previous
            .filter(|_| now_ms < self.switched_ms + HANDOVER.as_millis() as u64)
    }
}

/// The key of a projection's state document.
pub fn state_key(projection: &str) -> String {
    format!("_generation::{projection}")
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A projection's state as stored, with the CAS to change it; a missing
/// document reads as [`GenerationState::legacy`] with no CAS.
pub async fn load(
    documents: &dyn DocumentStore,
    projection: &str,
) -> Result<(GenerationState, Option<Cas>), DocumentError> {
    let key = state_key(projection);
    let Some(document) = documents.get(&key).await? else {
        return Ok((GenerationState::legacy(), None));
    };
    let state = serde_json::from_slice(&document.body)
        .map_err(|e| DocumentError::backend(format!("{key} does not parse: {e}")))?;
    Ok((state, Some(document.cas)))
}

/// Writes `state` if the document is still at `cas` (inserts it when
/// `None`); `Ok(false)` when someone changed it first.
pub async fn store(
    documents: &dyn DocumentStore,
    projection: &str,
    state: &GenerationState,
    cas: Option<Cas>,
) -> Result<bool, DocumentError> {
    let key = state_key(projection);
    let body = serde_json::to_vec(state).expect("a generation state serializes");
    let written = match cas {
        None => documents.insert(&key, &body).await.map(drop),
        Some(cas) => documents.replace(&key, &body, cas).await.map(drop),
    };
    match written {
        Ok(()) => Ok(true),
        Err(
            DocumentError::Exists(_) | DocumentError::CasMismatch(_) | DocumentError::NotFound(_),
        ) => Ok(false),
        Err(error) => Err(error),
    }
}

/// A projection's state and when it was read.
type Cached = (Instant, Arc<GenerationState>);

/// Projections' states as this process last read them, each re-read once
/// it is [`REFRESH`] old. One entry per projection of the application.
#[derive(Debug, Clone)]
pub struct Generations {
    documents: Arc<dyn DocumentStore>,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
    /// Held while a state is re-read: callers that find it stale meanwhile
    /// wait for that read instead of each reading it.
    reading: Arc<tokio::sync::Mutex<()>>,
}

impl Generations {
    pub fn new(documents: Arc<dyn DocumentStore>) -> Self {
        Self {
            documents,
            cache: Arc::default(),
            reading: Arc::default(),
        }
    }

    fn cached(&self, projection: &str) -> Option<Arc<GenerationState>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(projection)
            .filter(|(read, _)| read.elapsed() < REFRESH)
            .map(|(_, state)| Arc::clone(state))
    }

    /// `projection`'s state, at most [`REFRESH`] old.
    pub async fn state(&self, projection: &str) -> Result<Arc<GenerationState>, DocumentError> {
        if let Some(state) = self.cached(projection) {
            return Ok(state);
        }
        let _reading = self.reading.lock().await;
        if let Some(state) = self.cached(projection) {
            return Ok(state);
        }
        let (state, _) = load(self.documents.as_ref(), projection).await?;
        let state = Arc::new(state);
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(projection.to_owned(), (Instant::now(), Arc::clone(&state)));
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_one_keeps_plain_keys_and_later_ones_a_prefix() {
        assert_eq!(key_in(1, "counter::c"), "counter::c");
        assert_eq!(key_in(3, "counter::c"), "_g3::counter::c");
    }

    #[test]
    fn live_writes_follow_the_serving_generation_else_a_first_build() {
        let build = |generation| Build {
            generation,
            owner: "p".into(),
            lease_until_ms: 0,
            started_ms: 0,
            next_position: 1,
            head: 0,
            events_per_second: 0.0,
            caught_up: false,
            switch_when_ready: true,
        };
        let first = GenerationState {
            building: Some(build(1)),
            newest: 1,
            ..GenerationState::default()
        };
        assert_eq!(first.written(), Some(1));
        let rebuilding = GenerationState {
            serving: Some(1),
            building: Some(build(2)),
            newest: 2,
            ..GenerationState::default()
        };
        assert_eq!(rebuilding.written(), Some(1));
        assert_eq!(GenerationState::legacy().written(), Some(1));
    }

    #[test]
    fn the_previous_generation_is_read_only_during_the_handover() {
        let state = GenerationState {
            serving: Some(2),
            previous: Some(1),
            switched_ms: 10_000,
            newest: 2,
            ..GenerationState::default()
        };
        assert_eq!(state.handing_over(10_001), Some(1));
        let over = 10_000 + HANDOVER.as_millis() as u64;
        assert_eq!(state.handing_over(over), None);
    }
}
