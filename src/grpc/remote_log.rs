//! The event log of another process, through its read API: how a projector
//! fills gaps from command-svc's log without a database connection of its own.
//! It reads events as stored: the projector upcasts them with its own
//! application's upcasters.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tonic::Code;
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
}

impl RemoteLog {
    /// A log at `url` (e.g. `http://command-svc:50051`, or `https://` with
    /// `tls`), connected on first use and again after a loss; each call is
    /// bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration, tls: &ClientTls) -> Result<Self, StoreError> {
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
        })
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
                .call(client.read_stream(pb::ReadStreamRequest {
                    stream_id: stream_id.to_owned(),
                    from_version: from,
                    limit: page_limit,
                    // The projector upcasts with its own application's upcasters.
                    as_stored: true,
                }))
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
            .call(client.read_all(pb::ReadAllRequest {
                from_position,
                limit: limit.min(MAX_PAGE as usize) as u32,
                filter: Some(pb::LogFilter {
                    stream_types: filter.stream_types.clone(),
                    event_types: filter.event_types.clone(),
                }),
                as_stored: true,
            }))
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
