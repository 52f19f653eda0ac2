//! The reference read models: a file view, a folder listing, a comment
//! thread, a counter and a file's name history, as JSON documents
//! (queryable with N1QL on Couchbase), keyed `kind::id`.

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use scaleout::projection::{AnyProjection, Event, Projection, Refused, Route};

use crate::domain::{Counter, CounterEvent, File, FileEvent};

pub fn file_key(file_id: &str) -> String {
    format!("file::{file_id}")
}

pub fn folder_key(folder_id: &str) -> String {
    format!("folder::{folder_id}")
}

pub fn comments_key(file_id: &str) -> String {
    format!("comments::{file_id}")
}

pub fn counter_key(counter_id: &str) -> String {
    format!("counter::{counter_id}")
}

pub fn history_key(file_id: &str) -> String {
    format!("history::{file_id}")
}

/// Every projection of the reference domain.
pub fn all() -> Vec<Box<dyn AnyProjection>> {
    vec![
        Box::new(FileViewProjection),
        Box::new(FolderProjection),
        Box::new(CommentsProjection),
        Box::new(CounterProjection),
        Box::new(FileHistoryProjection),
    ]
}

/// The file an event is about.
fn file_id(event: &FileEvent) -> &str {
    match event {
        FileEvent::Created(e) => &e.file_id,
        FileEvent::Renamed(e) => &e.file_id,
        FileEvent::Moved(e) => &e.file_id,
        FileEvent::Deleted(e) => &e.file_id,
        FileEvent::CommentAdded(e) => &e.file_id,
    }
}

/// One file as users see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    pub file_id: String,
    pub name: String,
    pub folder_id: String,
    /// The file stream's version this view reflects.
    pub version: u64,
    pub comment_count: u64,
    pub deleted: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct FileViewProjection;

impl Projection for FileViewProjection {
    type Source = File;
    type View = FileView;
    const NAME: &'static str = "file_view";

    fn routes(&self, event: &Event<FileEvent>) -> Vec<Route> {
        vec![Route::sequence(file_key(file_id(&event.payload)))]
    }

    fn apply(
        &self,
        _key: &str,
        view: &mut FileView,
        event: &Event<FileEvent>,
    ) -> Result<(), Refused> {
        let file_event = &event.payload;
        if let FileEvent::CommentAdded(_) = file_event {
            view.comment_count = view.comment_count.checked_add(1).ok_or_else(|| {
                Refused(format!(
                    "file {}: the comment count overflows",
                    view.file_id
                ))
            })?;
        }
        view.version = event.version;
        match file_event {
            FileEvent::Created(created) => {
                view.file_id.clone_from(&created.file_id);
                view.name.clone_from(&created.name);
                view.folder_id.clone_from(&created.folder_id);
            }
            FileEvent::Renamed(renamed) => view.name.clone_from(&renamed.new_name),
            FileEvent::Moved(moved) => view.folder_id.clone_from(&moved.to_folder_id),
            FileEvent::Deleted(_) => view.deleted = true,
            FileEvent::CommentAdded(_) => {}
        }
        Ok(())
    }
}

/// The files in one folder: the hot document when many files land in one folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderListing {
    pub folder_id: String,
    /// File id → name, in file id order.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy)]
pub struct FolderProjection;

impl Projection for FolderProjection {
    type Source = File;
    type View = FolderListing;
    const NAME: &'static str = "folder_listing";

    /// Each routed event carries the file's name and folder, so the newest
    /// version wins; the document's per-stream versions keep a late, older
    /// event from re-adding a file that has moved on.
    fn routes(&self, event: &Event<FileEvent>) -> Vec<Route> {
        let folders = match &event.payload {
            FileEvent::Created(e) => vec![&e.folder_id],
            FileEvent::Renamed(e) => vec![&e.folder_id],
            FileEvent::Moved(e) => vec![&e.from_folder_id, &e.to_folder_id],
            FileEvent::Deleted(e) => vec![&e.folder_id],
            FileEvent::CommentAdded(_) => vec![],
        };
        folders
            .into_iter()
            .map(|f| Route::latest(folder_key(f)))
            .collect()
    }

    fn apply(
        &self,
        key: &str,
        view: &mut FolderListing,
        event: &Event<FileEvent>,
    ) -> Result<(), Refused> {
        let file_event = &event.payload;
        let file_id = file_id(file_event);
        let folder_id = key.strip_prefix("folder::").unwrap_or(key);
        view.folder_id = folder_id.to_owned();
        let listed = match file_event {
            FileEvent::Created(e) => Some(&e.name),
            FileEvent::Renamed(e) => Some(&e.new_name),
            FileEvent::Moved(e) => (e.to_folder_id == folder_id).then_some(&e.name),
            FileEvent::Deleted(_) => None,
            FileEvent::CommentAdded(_) => return Ok(()),
        };
        match listed {
            Some(name) => view.files.insert(file_id.to_owned(), name.clone()),
            None => view.files.remove(file_id),
        };
        Ok(())
    }
}

/// The comments on one file, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommentThread {
    pub file_id: String,
    /// The file stream's version this thread reflects.
    pub version: u64,
    pub comments: Vec<Comment>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comment {
    /// The id of the event that added it.
    pub comment_id: String,
    pub author: String,
    pub text: String,
    pub posted_at_ms: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct CommentsProjection;

impl Projection for CommentsProjection {
    type Source = File;
    type View = CommentThread;
    const NAME: &'static str = "comment_thread";

    /// Every event of the file's stream, so the thread's versions have no gaps.
    fn routes(&self, event: &Event<FileEvent>) -> Vec<Route> {
        vec![Route::sequence(comments_key(file_id(&event.payload)))]
    }

    fn apply(
        &self,
        _key: &str,
        view: &mut CommentThread,
        event: &Event<FileEvent>,
    ) -> Result<(), Refused> {
        let file_event = &event.payload;
        view.file_id = file_id(file_event).to_owned();
        view.version = event.version;
        if let FileEvent::CommentAdded(added) = file_event {
            let posted_at_ms = event
                .occurred_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            view.comments.push(Comment {
                comment_id: event.event_id.to_string(),
                author: added.author.clone(),
                text: added.text.clone(),
                posted_at_ms,
            });
        }
        Ok(())
    }
}

/// A counter's total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    pub counter_id: String,
    pub count: u64,
    /// The counter stream's version this total reflects.
    pub version: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct CounterProjection;

impl Projection for CounterProjection {
    type Source = Counter;
    type View = CounterView;
    const NAME: &'static str = "counter";

    fn routes(&self, event: &Event<CounterEvent>) -> Vec<Route> {
        let CounterEvent::Incremented(e) = &event.payload;
        vec![Route::sequence(counter_key(&e.counter_id))]
    }

    fn apply(
        &self,
        _key: &str,
        view: &mut CounterView,
        event: &Event<CounterEvent>,
    ) -> Result<(), Refused> {
        let CounterEvent::Incremented(e) = &event.payload;
        view.count = view.count.checked_add(e.amount).ok_or_else(|| {
            Refused(format!(
                "counter {}: adding {} to {} overflows",
                e.counter_id, e.amount, view.count
            ))
        })?;
        view.counter_id.clone_from(&e.counter_id);
        view.version = event.version;
        Ok(())
    }
}

/// The names a history keeps: a document (and an answer) stays well inside
/// the stores' and gRPC's limits however often a file is renamed.
pub const MAX_HISTORY: usize = 1000;

/// Every name a file has had, the latest [`MAX_HISTORY`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHistory {
    pub file_id: String,
    /// Oldest first.
    pub names: Vec<NameChange>,
    /// Names older than the first one kept.
    pub earlier: u64,
    /// The file stream's version this history reflects.
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameChange {
    pub name: String,
    pub version: u64,
    pub named_at_ms: u64,
}

/// The name history, added after the other read models: a deployment that
/// first runs it builds it from the log before it serves.
#[derive(Debug, Clone, Copy)]
pub struct FileHistoryProjection;

impl Projection for FileHistoryProjection {
    type Source = File;
    type View = FileHistory;
    const NAME: &'static str = "file_history";

    /// Every event of the file's stream, so the history's versions have no gaps.
    fn routes(&self, event: &Event<FileEvent>) -> Vec<Route> {
        vec![Route::sequence(history_key(file_id(&event.payload)))]
    }

    fn apply(
        &self,
        _key: &str,
        view: &mut FileHistory,
        event: &Event<FileEvent>,
    ) -> Result<(), Refused> {
        view.file_id = file_id(&event.payload).to_owned();
        view.version = event.version;
        let name = match &event.payload {
            FileEvent::Created(created) => &created.name,
            FileEvent::Renamed(renamed) => &renamed.new_name,
            _ => return Ok(()),
        };
        view.names.push(NameChange {
            name: name.clone(),
            version: event.version,
            named_at_ms: event
                .occurred_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
        if view.names.len() > MAX_HISTORY {
            view.names.remove(0);
            view.earlier += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use scaleout::projection::{UnknownProjection, choose};

    use super::*;

    #[test]
    fn projections_are_chosen_by_name() {
        let names = |chosen: Vec<Box<dyn AnyProjection>>| -> Vec<&'static str> {
            chosen.iter().map(|p| p.name()).collect()
        };
        assert_eq!(names(choose(all(), &[]).unwrap()).len(), 5);
        assert_eq!(
            names(choose(all(), &["counter".into(), "file_view".into()]).unwrap()),
            ["counter", "file_view"]
        );
        assert_eq!(
            choose(all(), &["nope".into()]).err(),
            Some(UnknownProjection {
                name: "nope".into(),
                known: vec![
                    "file_view",
                    "folder_listing",
                    "comment_thread",
                    "counter",
                    "file_history"
                ],
            })
        );
    }
}
