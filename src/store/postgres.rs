//! Placeholder: the PostgreSQL backend is being written.
use super::StoreError;
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub url: String,
}
impl PostgresConfig {
    pub fn new(url: &str) -> Self {
        Self { url: url.into() }
    }
}
#[derive(Debug)]
pub struct PostgresStore;
impl PostgresStore {
    pub async fn connect(_config: PostgresConfig) -> Result<Self, StoreError> {
        Err(StoreError::Backend("not yet".into()))
    }
}
