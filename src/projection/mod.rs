//! Projections: read models as a fold of the event log, written with CAS by
//! many competing instances.
//!
//! A [`Projection`] names the documents an event touches ([`Route`]s) and
//! folds the event into each. The [`runtime`] does the rest, the same way for every read
//! model: every document records the last version it applied of each source
//! stream, so a duplicate is acked and skipped and a gap is filled from the
//! event log; a document is read with its CAS and written back with it (a
//! missing one is inserted, never written with CAS 0), and a lost race is
//! read and folded again. Deliveries that touch the same document are folded
//! into one write.

mod event;
mod fold;
mod follow;
pub mod generation;
pub mod metrics;
pub mod rebuild;
pub mod runtime;
pub mod verify;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::Aggregate;

pub use self::event::{Event, Poison, ProjectedEvent};
pub use self::fold::{AnyProjection, FoldError, Folded, Outcome};
pub use self::follow::FollowConfig;

/// A document an event changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub key: String,
    pub order: Order,
}

/// How a document takes the versions of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The document sees every event of the stream: they apply one after
    /// another, a duplicate is skipped and a gap is read from the event log.
    Sequence,
    /// The event carries everything the document keeps about its stream
    /// (e.g. a file's name and folder in a folder listing): the newest
    /// version wins and an older one arriving late is skipped, so the
    /// document need not see every event of the stream.
    Latest,
}

impl Route {
    pub fn sequence(key: String) -> Self {
        Self {
            key,
            order: Order::Sequence,
        }
    }

    pub fn latest(key: String) -> Self {
        Self {
            key,
            order: Order::Latest,
        }
    }
}

/// One read model, folded from the events of one aggregate.
pub trait Projection: Send + Sync + 'static {
    /// The aggregate whose events this read model folds; events of other
    /// stream types never reach it.
    type Source: Aggregate;

    /// The document's shape, stored as JSON.
    type View: Serialize + DeserializeOwned + Default + Send;

    /// Names the projection in logs and metrics.
    const NAME: &'static str;

    /// The documents `event` changes (none if it does not concern this read
    /// model), and how its stream's versions line up in each.
    fn routes(&self, event: &SourceEvent<Self>) -> Vec<Route>;

    /// Folds `event` into the document at `key`. Called once per event and
    /// document, in stream order. An event the view cannot take (a total
    /// that would overflow) is refused, leaving the view as it was: the fold
    /// skips it, the same way every time, and its delivery is parked with
    /// the reason so that someone sees it.
    fn apply(
        &self,
        key: &str,
        view: &mut Self::View,
        event: &SourceEvent<Self>,
    ) -> Result<(), Refused>;
}

/// An event of a projection's source aggregate, decoded.
pub type SourceEvent<P> = Event<<<P as Projection>::Source as Aggregate>::Event>;

/// Why a projection could not fold an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A projection name the application has no projection for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
// The known ones first: the name is the caller's, of any length.
#[error("unknown projection (expected some of {}): {name:?}", known.join(", "))]
pub struct UnknownProjection {
    pub name: String,
    pub known: Vec<&'static str>,
}

/// The projections of `all` with these names, in that order; all of them
/// when `names` is empty (how a projector's `--projections` picks).
///
/// ```
/// use scaleout::projection::{AnyProjection, choose};
///
/// let all: Vec<Box<dyn AnyProjection>> = Vec::new(); // an application's projections
/// assert!(choose(all, &[]).unwrap().is_empty());
/// let refused = choose(Vec::new(), &["balance".to_owned()]).err().unwrap();
/// assert_eq!(refused.to_string(), "unknown projection (expected some of ): \"balance\"");
/// ```
pub fn choose(
    mut all: Vec<Box<dyn AnyProjection>>,
    names: &[String],
) -> Result<Vec<Box<dyn AnyProjection>>, UnknownProjection> {
    if names.is_empty() {
        return Ok(all);
    }
    let known: Vec<&'static str> = all.iter().map(|p| p.name()).collect();
    names
        .iter()
        .map(|name| {
            let index =
                all.iter()
                    .position(|p| p.name() == name)
                    .ok_or_else(|| UnknownProjection {
                        name: name.clone(),
                        known: known.clone(),
                    })?;
            Ok(all.remove(index))
        })
        .collect()
}
