//! The reference queries: each read model by id, waiting for a version
//! when asked.

use std::collections::BTreeMap;

use scaleout::query::{Queries, QueryError};
use tokio::time::Instant;

use crate::views::{
    CommentThread, CommentsProjection, CounterProjection, CounterView, FileHistory,
    FileHistoryProjection, FileView, FileViewProjection, FolderListing, FolderProjection,
    comments_key, counter_key, file_key, folder_key, history_key,
};

/// The reference read models, read through the kernel's [`Queries`].
#[derive(Debug, Clone)]
pub struct ReferenceQueries(pub Queries);

impl ReferenceQueries {
    pub async fn file(
        &self,
        file_id: &str,
        min_version: u64,
        deadline: Instant,
    ) -> Result<FileView, QueryError> {
        let wanted = wanted(format!("file-{file_id}"), min_version);
        self.0
            .read::<FileViewProjection>("file", file_id, &file_key(file_id), &wanted, deadline)
            .await
    }

    pub async fn folder(
        &self,
        folder_id: &str,
        min_versions: &BTreeMap<String, u64>,
        deadline: Instant,
    ) -> Result<FolderListing, QueryError> {
        let wanted: Vec<_> = min_versions.iter().map(|(s, v)| (s.clone(), *v)).collect();
        self.0
            .read::<FolderProjection>(
                "folder",
                folder_id,
                &folder_key(folder_id),
                &wanted,
                deadline,
            )
            .await
    }

    pub async fn comments(
        &self,
        file_id: &str,
        min_version: u64,
        deadline: Instant,
    ) -> Result<CommentThread, QueryError> {
        let wanted = wanted(format!("file-{file_id}"), min_version);
        self.0
            .read::<CommentsProjection>("file", file_id, &comments_key(file_id), &wanted, deadline)
            .await
    }

    pub async fn counter(
        &self,
        counter_id: &str,
        min_version: u64,
        deadline: Instant,
    ) -> Result<CounterView, QueryError> {
        let wanted = wanted(format!("counter-{counter_id}"), min_version);
        self.0
            .read::<CounterProjection>(
                "counter",
                counter_id,
                &counter_key(counter_id),
                &wanted,
                deadline,
            )
            .await
    }

    pub async fn history(
        &self,
        file_id: &str,
        min_version: u64,
        deadline: Instant,
    ) -> Result<FileHistory, QueryError> {
        let wanted = wanted(format!("file-{file_id}"), min_version);
        self.0
            .read::<FileHistoryProjection>(
                "file",
                file_id,
                &history_key(file_id),
                &wanted,
                deadline,
            )
            .await
    }
}

fn wanted(stream: String, min_version: u64) -> Vec<(String, u64)> {
    if min_version == 0 {
        Vec::new()
    } else {
        vec![(stream, min_version)]
    }
}
