//! Rebuilding a read model from the event log into a new generation while
//! the serving one keeps answering, then switching to it in one step.
//!
//! A rebuild is a job recorded in the projection's state document
//! ([`generation`](super::generation)): [`start`] records it, and a
//! [`Rebuilder`] runs it, in whichever process holds its lease (any
//! projector, the embedded platform or `projector rebuild`). The job follows
//! the log from position 1 into the new generation's keys: pages of events
//! folded in memory, each document written once per page, every document of
//! a page in flight at once, the checkpoint after them. A killed builder's
//! lease lapses and another resumes from the checkpoint. Caught up, it keeps
//! following live events until [`switch`] (or at once, for a first build);
//! after the switch it follows through the handover, then ends. The old
//! generation stays until [`drop_generation`] removes it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::follow;
use super::generation::{
    Build, Generation, GenerationState, HANDOVER, key_in, load, now_ms, progress, store,
};
use super::metrics::ProjectorMetrics;
use super::runtime::{Projector, ProjectorConfig};
use super::{FollowConfig, ProjectedEvent, UnknownProjection, choose};
use crate::app::Application;
use crate::documents::{DocumentError, DocumentStore};
use crate::log::EventLog;
use crate::store::{LogFilter, StoreError};

/// How long a builder's claim on a job lasts unless renewed: a builder that
/// dies is replaced this long after its last renewal.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often a builder records its progress and renews its lease.
const PROGRESS: Duration = Duration::from_secs(1);

/// Events a builder reads and folds at a time: documents held in memory
/// are at most one page's worth.
const PAGE: usize = 5000;

/// Why a rebuild request was refused or a job failed.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Unknown(#[from] UnknownProjection),
    #[error("{projection} is already building generation {generation}")]
    AlreadyBuilding {
        projection: String,
        generation: Generation,
    },
    #[error("{projection} has no generation being built")]
    NotBuilding { projection: String },
    #[error(
        "{projection} generation {generation} has not caught up with the log ({})",
        progress(*next_position, *head)
    )]
    NotCaughtUp {
        projection: String,
        generation: Generation,
        next_position: u64,
        head: u64,
    },
    #[error("{projection} generation {generation} cannot be dropped: {why}")]
    InUse {
        projection: String,
        generation: Generation,
        why: &'static str,
    },
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Log(#[from] StoreError),
}

/// Records a rebuild of `projection` into a new generation, run by whichever
/// builder takes it first; refused while another is under way.
pub async fn start(
    documents: &dyn DocumentStore,
    projection: &str,
    switch_when_ready: bool,
) -> Result<Generation, RebuildError> {
    loop {
        let (mut state, cas) = load(documents, projection).await?;
        if let Some(build) = &state.building {
            return Err(RebuildError::AlreadyBuilding {
                projection: projection.to_owned(),
                generation: build.generation,
            });
        }
        let generation = state.newest.max(state.serving.unwrap_or(0)) + 1;
        state.newest = generation;
        state.building = Some(new_build(generation, switch_when_ready));
        if store(documents, projection, &state, cas).await? {
            return Ok(generation);
        }
    }
}

fn new_build(generation: Generation, switch_when_ready: bool) -> Build {
    Build {
        generation,
        owner: String::new(),
        lease_until_ms: 0,
        started_ms: now_ms(),
        next_position: 1,
        head: 0,
        events_per_second: 0.0,
        caught_up: false,
        switch_when_ready,
    }
}

/// Makes the generation being built serve, in one step; refused unless it
/// has caught up with the log. Its builder follows through the handover.
pub async fn switch(
    documents: &dyn DocumentStore,
    projection: &str,
) -> Result<Generation, RebuildError> {
    loop {
        let (mut state, cas) = load(documents, projection).await?;
        let Some(build) = state.building.as_mut() else {
            return Err(RebuildError::NotBuilding {
                projection: projection.to_owned(),
            });
        };
        let generation = build.generation;
        if state.serving == Some(generation) {
            return Ok(generation);
        }
        if !build.caught_up {
            return Err(RebuildError::NotCaughtUp {
                projection: projection.to_owned(),
                generation,
                next_position: build.next_position,
                head: build.head,
            });
        }
        build.switch_when_ready = true;
        serve(&mut state, generation);
        if store(documents, projection, &state, cas).await? {
            tracing::info!(projection, generation, "read model switched");
            return Ok(generation);
        }
    }
}

/// Has the build under way switch as soon as it has caught up.
pub async fn switch_when_ready(
    documents: &dyn DocumentStore,
    projection: &str,
) -> Result<(), RebuildError> {
    loop {
        let (mut state, cas) = load(documents, projection).await?;
        let Some(build) = state.building.as_mut() else {
            return Err(RebuildError::NotBuilding {
                projection: projection.to_owned(),
            });
        };
        if build.switch_when_ready {
            return Ok(());
        }
        build.switch_when_ready = true;
        if store(documents, projection, &state, cas).await? {
            return Ok(());
        }
    }
}

fn serve(state: &mut GenerationState, generation: Generation) {
    state.previous = state.serving;
    state.serving = Some(generation);
    state.switched_ms = now_ms();
}

/// Removes every document of an old `generation` of `projection`: the keys
/// are found the way they were made, by routing the log's events (a key
/// value store has no scan). Idempotent: a call cut short is run again.
/// Returns the documents removed.
pub async fn drop_generation(
    log: &dyn EventLog,
    documents: &dyn DocumentStore,
    app: &dyn Application,
    projection: &str,
    generation: Generation,
) -> Result<u64, RebuildError> {
    let mut chosen = choose(app.projections(), &[projection.to_owned()])?;
    let routed = chosen.remove(0);
    let (state, _) = load(documents, projection).await?;
    let why = if state.serving == Some(generation) {
        Some("it is serving")
    } else if state
        .building
        .as_ref()
        .is_some_and(|b| b.generation == generation)
    {
        Some("it is being built")
    } else if generation == 0 || generation > state.newest {
        Some("there is no such generation")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(RebuildError::InUse {
            projection: projection.to_owned(),
            generation,
            why,
        });
    }
    let known = app.known_types();
    let mut removed = 0;
    let mut from = 1;
    loop {
        let page = log.read_all(from, PAGE, &LogFilter::all()).await?;
        let mut keys = HashSet::new();
        for recorded in page.events {
            let Ok(event) = ProjectedEvent::from_recorded(recorded, &known) else {
                continue;
            };
            for route in routed.routes(&event).unwrap_or_default() {
                keys.insert(key_in(generation, &route.key));
            }
        }
        for key in keys {
            removed += remove(documents, &key).await?;
        }
        from = page.next_position;
        if from > page.head {
            break;
        }
    }
    remove(documents, &checkpoint_key(projection, generation)).await?;
    loop {
        let (mut state, cas) = load(documents, projection).await?;
        if state.previous != Some(generation) {
            break;
        }
        state.previous = None;
        if store(documents, projection, &state, cas).await? {
            break;
        }
    }
    tracing::info!(
        projection,
        generation,
        removed,
        "read model generation dropped"
    );
    Ok(removed)
}

/// Removes `key` whatever its CAS; 1 if it was there.
async fn remove(documents: &dyn DocumentStore, key: &str) -> Result<u64, DocumentError> {
    loop {
        let Some(document) = documents.get(key).await? else {
            return Ok(0);
        };
        match documents.remove(key, document.cas).await {
            Ok(()) => return Ok(1),
            Err(DocumentError::CasMismatch(_)) => continue,
            Err(DocumentError::NotFound(_)) => return Ok(0),
            Err(error) => return Err(error),
        }
    }
}

/// The follower name of a generation's build: its checkpoint is
/// `_checkpoint::<name>`.
fn follower_name(projection: &str, generation: Generation) -> String {
    format!("rebuild-{projection}-g{generation}")
}

fn checkpoint_key(projection: &str, generation: Generation) -> String {
    follow::checkpoint_key(&follower_name(projection, generation))
}

/// What became of a builder's turn at a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The projection has no job.
    NoJob,
    /// Another builder holds the job's lease.
    HeldElsewhere,
    /// Switched and handed over: the job is done.
    Done,
    /// The job was taken over, or dropped, meanwhile.
    Lost,
    /// Stopped before it was done; another builder (or this one) resumes it.
    Stopped,
}

/// Runs rebuild jobs in this process.
#[derive(Clone)]
pub struct Rebuilder {
    app: Arc<dyn Application>,
    documents: Arc<dyn DocumentStore>,
    log: Arc<dyn EventLog>,
    /// The live projector's counters, where progress is shown.
    metrics: Arc<ProjectorMetrics>,
    /// Names this process in leases.
    owner: String,
}

impl std::fmt::Debug for Rebuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuilder")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Rebuilder {
    pub fn new(
        app: Arc<dyn Application>,
        documents: Arc<dyn DocumentStore>,
        log: Arc<dyn EventLog>,
        metrics: Arc<ProjectorMetrics>,
    ) -> Self {
        Self {
            app,
            documents,
            log,
            metrics,
            owner: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// Takes `projection`'s job if nobody holds it and runs it until it is
    /// done, lost, or `stopping`.
    pub async fn run(
        &self,
        projection: &str,
        stopping: &CancellationToken,
    ) -> Result<Ended, RebuildError> {
        let projections = choose(self.app.projections(), &[projection.to_owned()])?;
        let build = match self.claim(projection).await? {
            Ok(build) => build,
            Err(ended) => return Ok(ended),
        };
        let generation = build.generation;
        tracing::info!(
            projection,
            generation,
            from = build.next_position,
            "building a read model generation from the event log"
        );
        let following = stopping.child_token();
        let projector = Projector::new(
            Arc::clone(&self.documents),
            Arc::clone(&self.log),
            self.app.known_types(),
            projections,
            Arc::new(ProjectorMetrics::default()),
            ProjectorConfig::default(),
        )
        .writing(generation);
        let config = FollowConfig {
            name: follower_name(projection, generation),
            settle_delay: Duration::ZERO,
            poll: Duration::from_millis(100),
            page: PAGE,
        };
        let follower = tokio::spawn({
            let following = following.clone();
            async move { projector.follow(config, following).await }
        });
        let started = tokio::time::Instant::now();
        let ended = loop {
            tokio::select! {
                () = stopping.cancelled() => break Ok(Ended::Stopped),
                () = tokio::time::sleep(PROGRESS) => {}
            }
            match self
                .progress(projection, generation, (build.next_position, started))
                .await
            {
                Ok(Some(ended)) => break Ok(ended),
                Ok(None) => {}
                // The store or the log is away: the lease may lapse and
                // another builder take over, which the next round sees.
                Err(error) => tracing::warn!(%error, projection, "cannot record rebuild progress"),
            }
        };
        following.cancel();
        let _ = follower.await;
        if matches!(ended, Ok(Ended::Stopped)) {
            self.release(projection, generation).await;
        }
        tracing::info!(projection, generation, ?ended, "read model build ended");
        ended
    }

    /// The job, claimed for this builder; why not when there is none or
    /// its lease is someone else's and live.
    async fn claim(&self, projection: &str) -> Result<Result<Build, Ended>, RebuildError> {
        loop {
            let (mut state, cas) = load(self.documents.as_ref(), projection).await?;
            let Some(build) = state.building.as_mut() else {
                return Ok(Err(Ended::NoJob));
            };
            if build.owner != self.owner && build.lease_until_ms > now_ms() {
                return Ok(Err(Ended::HeldElsewhere));
            }
            build.owner.clone_from(&self.owner);
            build.lease_until_ms = now_ms() + LEASE.as_millis() as u64;
            let claimed = build.clone();
            if store(self.documents.as_ref(), projection, &state, cas).await? {
                return Ok(Ok(claimed));
            }
        }
    }

    /// Lets the lease go at once, so another builder need not wait it out.
    async fn release(&self, projection: &str, generation: Generation) {
        let released = async {
            loop {
                let (mut state, cas) = load(self.documents.as_ref(), projection).await?;
                match state.building.as_mut() {
                    Some(build) if build.generation == generation && build.owner == self.owner => {
                        build.lease_until_ms = 0;
                    }
                    _ => return Ok::<_, DocumentError>(()),
                }
                if store(self.documents.as_ref(), projection, &state, cas).await? {
                    return Ok(());
                }
            }
        };
        if let Err(error) = released.await {
            tracing::warn!(%error, projection, "could not release a rebuild's lease; it lapses");
        }
    }

    /// Records how far the job is and renews its lease; switches when it
    /// should and ends the job after the handover. `Some` once it has ended.
    async fn progress(
        &self,
        projection: &str,
        generation: Generation,
        (first, started): (u64, tokio::time::Instant),
    ) -> Result<Option<Ended>, RebuildError> {
        let next_position = follow::stored_checkpoint(
            self.documents.as_ref(),
            &checkpoint_key(projection, generation),
        )
        .await?;
        let head = self
            .log
            .read_all(u64::MAX, 1, &LogFilter::all())
            .await?
            .head;
        loop {
            let (mut state, cas) = load(self.documents.as_ref(), projection).await?;
            let Some(build) = state
                .building
                .as_mut()
                .filter(|b| b.generation == generation)
            else {
                return Ok(Some(Ended::Lost));
            };
            if build.owner != self.owner {
                return Ok(Some(Ended::Lost));
            }
            let folded = next_position.saturating_sub(build.next_position);
            let elapsed = started.elapsed().as_secs_f64().max(1e-3);
            build.events_per_second = next_position.saturating_sub(first) as f64 / elapsed;
            build.lease_until_ms = now_ms() + LEASE.as_millis() as u64;
            build.next_position = next_position;
            build.head = head;
            // Under live load the head moves on while a page is folded:
            // within a page of it, the builder reaches it in one more step.
            build.caught_up = (head + 1).saturating_sub(next_position) <= PAGE as u64;
            let (caught_up, switch_now) = (
                build.caught_up,
                build.caught_up && build.switch_when_ready && state.serving != Some(generation),
            );
            let rate = build.events_per_second;
            if switch_now {
                serve(&mut state, generation);
            }
            let done = state.serving == Some(generation)
                && now_ms() >= state.switched_ms + HANDOVER.as_millis() as u64;
            if done {
                state.building = None;
            }
            if store(self.documents.as_ref(), projection, &state, cas).await? {
                ProjectorMetrics::add(&self.metrics.rebuild_events, folded);
                let remaining = (head + 1).saturating_sub(next_position);
                self.metrics.rebuild_remaining.store(
                    if done { 0 } else { remaining },
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::info!(
                    projection,
                    generation,
                    position = next_position,
                    head,
                    events_per_second = rate.round(),
                    eta_seconds = (remaining as f64 / rate.max(1.0)).round(),
                    caught_up,
                    "rebuilding"
                );
                if switch_now {
                    tracing::info!(projection, generation, "read model switched");
                }
                return Ok(done.then_some(Ended::Done));
            }
        }
    }

    /// What every projector (and the embedded platform) does beside its
    /// workers: registers the application's read models, so that one new to
    /// a deployment gets a first build, and runs any job of the
    /// `projections` it keeps whose builder is gone, until `stopping`.
    pub async fn supervise(self, projections: Vec<&'static str>, stopping: CancellationToken) {
        if !register_until(self.documents.as_ref(), self.app.as_ref(), &stopping).await {
            return;
        }
        let mut jobs = tokio::task::JoinSet::new();
        for projection in projections {
            let (rebuilder, stopping) = (self.clone(), stopping.clone());
            jobs.spawn(async move {
                loop {
                    if let Err(error) = rebuilder.run(projection, &stopping).await {
                        tracing::warn!(%error, projection, "a rebuild failed; retrying");
                    }
                    tokio::select! {
                        () = stopping.cancelled() => return,
                        () = tokio::time::sleep(LEASE / 2) => {}
                    }
                }
            });
        }
        while jobs.join_next().await.is_some() {}
    }
}

/// Registers `app`'s read models ([`register`]), retrying with backoff while
/// the store does not answer; `false` if stopped first.
pub async fn register_until(
    documents: &dyn DocumentStore,
    app: &dyn Application,
    stopping: &CancellationToken,
) -> bool {
    let mut failures = 0;
    loop {
        match register(documents, app).await {
            Ok(()) => return true,
            Err(error) => tracing::warn!(%error, "cannot register the read models; retrying"),
        }
        failures += 1;
        tokio::select! {
            () = stopping.cancelled() => return false,
            () = tokio::time::sleep(LEASE.min(PROGRESS * failures)) => {}
        }
    }
}

/// Records `app`'s read models in `_read_models`. The first registration of
/// a deployment records them all as they are (a fresh deployment's, or one
/// whose documents predate generations and are generation 1); a read model
/// registered later is new here and gets a first build before it serves.
pub async fn register(
    documents: &dyn DocumentStore,
    app: &dyn Application,
) -> Result<(), RebuildError> {
    let all: Vec<String> = app
        .projections()
        .iter()
        .map(|p| p.name().to_owned())
        .collect();
    loop {
        let Some(registry) = documents.get(REGISTRY).await? else {
            let body = registry_body(&all);
            match documents.insert(REGISTRY, &body).await {
                Ok(_) | Err(DocumentError::Exists(_)) => continue,
                Err(error) => return Err(error.into()),
            }
        };
        let mut known: Vec<String> = serde_json::from_slice::<Registry>(&registry.body)
            .map_err(|e| DocumentError::backend(format!("{REGISTRY} does not parse: {e}")))?
            .projections;
        let new: Vec<&String> = all.iter().filter(|p| !known.contains(p)).collect();
        if new.is_empty() {
            return Ok(());
        }
        for projection in &new {
            tracing::info!(
                projection = %projection,
                "a new read model: building it from the event log before it serves"
            );
            let state = GenerationState {
                building: Some(new_build(1, true)),
                newest: 1,
                ..GenerationState::default()
            };
            // Another process may have written it first; theirs stands.
            store(documents, projection, &state, None).await?;
        }
        known.extend(new.into_iter().cloned());
        match documents
            .replace(REGISTRY, &registry_body(&known), registry.cas)
            .await
        {
            Ok(_) => return Ok(()),
            Err(DocumentError::CasMismatch(_) | DocumentError::NotFound(_)) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// The deployment's registered read models.
const REGISTRY: &str = "_read_models";

#[derive(serde::Serialize, serde::Deserialize)]
struct Registry {
    projections: Vec<String>,
}

fn registry_body(projections: &[String]) -> Vec<u8> {
    serde_json::to_vec(&Registry {
        projections: projections.to_vec(),
    })
    .expect("a registry serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_switch_says_how_far_the_build_is() {
        let refused = |next_position, head| {
            RebuildError::NotCaughtUp {
                projection: "counter".into(),
                generation: 2,
                next_position,
                head,
            }
            .to_string()
        };
        assert_eq!(
            refused(1, 0),
            "counter generation 2 has not caught up with the log (no progress recorded yet)"
        );
        assert_eq!(
            refused(6, 9000),
            "counter generation 2 has not caught up with the log (at position 6, head 9000)"
        );
    }
}
