//! The event log of another process, through its read API: how a projector
//! fills gaps from command-svc's log without a database connection of its own.
//! It reads events as stored: the projector upcasts them with its own
//! application's upcasters.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::Notify;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::read_service::MAX_PAGE;
use super::tls::ClientTls;
use crate::log::EventLog;
use crate::pb::{self, read_service_client::ReadServiceClient};
use crate::store::{LogFilter, LogPage, RecordedEvent, StoreError};

/// A [`EventLog`] served by a `scaleout.v1.ReadService`.
#[derive(Debug, Clone)]
pub struct RemoteLog {
    client: ReadServiceClient<Channel>,
    url: String,
    timeout: Duration,
    token: Option<TokenFile>,
}

/// What a client needs beyond the URL where the server asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub tls: ClientTls,
    /// A file holding the bearer token to send (a JWT with the
    /// `scaleout.read` scope), read again whenever it changes, so that an
    /// agent renewing it needs no restart.
    pub token_file: Option<PathBuf>,
}

/// A bearer token file and what was last read from it.
#[derive(Debug, Clone)]
struct TokenFile {
    path: PathBuf,
    read: Arc<Mutex<Option<ReadToken>>>,
}

/// The `authorization` value a token file held when it was last modified.
type ReadToken = (Option<SystemTime>, MetadataValue<Ascii>);

impl TokenFile {
    /// The `authorization` value the file holds now.
    fn authorization(&self) -> Result<MetadataValue<Ascii>, StoreError> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|meta| meta.modified())
            .ok();
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, value)) = read.as_ref()
            && *seen == modified
            && modified.is_some()
        {
            return Ok(value.clone());
        }
        let path = self.path.display();
        let token = std::fs::read_to_string(&self.path)
            .map_err(|e| StoreError::unavailable(format!("reading the token file {path}: {e}")))?;
        let value = format!("Bearer {}", token.trim())
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| StoreError::backend(format!("the token file {path} holds no token")))?;
        *read = Some((modified, value.clone()));
        Ok(value)
    }
}

impl RemoteLog {
    /// A log at `url` (e.g. `http://command-svc:50051`, or `https://` with
    /// `tls`), connected on first use and again after a loss; each call is
    /// bounded by `timeout`.
    pub fn new(
        url: &str,
        timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Self, StoreError> {
        let tls = &credentials.tls;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| StoreError::backend(format!("invalid event log URL {url:?}: {e}")))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let config = tls
                .config()
                .map_err(|e| StoreError::backend(format!("event log TLS: {e}")))?;
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| StoreError::backend(format!("event log TLS: {e}")))?;
        }
        Ok(Self {
            client: ReadServiceClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(64 << 20),
            url: url.to_owned(),
            timeout,
            token: credentials.token_file.clone().map(|path| TokenFile {
                path,
                read: Arc::default(),
            }),
        })
    }

    /// `body` as a request, with the bearer token if there is one.
    fn request<T>(&self, body: T) -> Result<tonic::Request<T>, StoreError> {
        let mut request = tonic::Request::new(body);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.authorization()?);
        }
        Ok(request)
    }

    fn failure(&self, status: tonic::Status) -> StoreError {
        let message = format!("event log {}: {}", self.url, status.message());
        let error = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                StoreError::unavailable(message)
            }
            _ => StoreError::backend(message),
        };
        error.caused_by(status)
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.failure(status)),
            Err(_) => Err(StoreError::unavailable(format!(
                "event log {} did not answer within {:?}",
                self.url, self.timeout
            ))),
        }
    }
}

fn recorded(logged: pb::LoggedEvent) -> Result<RecordedEvent, StoreError> {
    let envelope = logged
        .event
        .ok_or_else(|| StoreError::backend("a logged event without its envelope"))?;
    RecordedEvent::from_envelope(logged.position, envelope)
        .map_err(|e| StoreError::backend(e.to_string()))
}

#[async_trait]
impl EventLog for RemoteLog {
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut events = Vec::new();
        let mut from = from_version;
        while events.len() < limit {
            let page_limit = (limit - events.len()).min(MAX_PAGE as usize) as u32;
            let mut client = self.client.clone();
            let page = self
                .call(client.read_stream(self.request(pb::ReadStreamRequest {
                    stream_id: stream_id.to_owned(),
                    from_version: from,
                    limit: page_limit,
                    // The projector upcasts with its own application's upcasters.
                    as_stored: true,
                })?))
                .await?;
            for logged in page.events {
                events.push(recorded(logged)?);
            }
            if page.end_of_stream {
                break;
            }
            from = page.next_version;
        }
        Ok(events)
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        let mut client = self.client.clone();
        let page = self
            .call(client.read_all(self.request(pb::ReadAllRequest {
                from_position,
                limit: limit.min(MAX_PAGE as usize) as u32,
                filter: Some(pb::LogFilter {
                    stream_types: filter.stream_types.clone(),
                    event_types: filter.event_types.clone(),
                }),
                as_stored: true,
            })?))
            .await?;
        Ok(LogPage {
            events: page
                .events
                .into_iter()
                .map(recorded)
                .collect::<Result<_, _>>()?,
            next_position: page.next_position,
            head: page.head_position,
        })
    }

    fn appended(&self) -> Option<&Notify> {
        None
    }
}
