//! One command followed across the split deployment: the caller's trace
//! context goes into command-svc, is stored with the events, travels through
//! RabbitMQ to a projector and its document write, and the query that waits
//! for that write joins it too. Each process exports its spans over
//! OTLP/gRPC to a collector this test runs.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use reference::pb::command_service_client::CommandServiceClient;
use reference::pb::query_service_client::QueryServiceClient;
use reference::pb::read_service_client::ReadServiceClient;
use reference::pb::{self};
use support::Process;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// A span as the collector received it, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<KeyValue>,
    links: Vec<Vec<u8>>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|value| match value {
                Value::StringValue(text) => text.clone(),
                Value::IntValue(n) => n.to_string(),
                other => format!("{other:?}"),
            })
    }
}

/// An OTLP trace collector keeping everything it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|value| match value {
                    Value::StringValue(name) => name.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span.attributes,
                    links: span.links.into_iter().map(|link| link.span_id).collect(),
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free port; returns its `http://` endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn of_trace(&self, trace_id: &[u8]) -> Vec<Received> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `request` sent as part of the caller's span `span_id` of `trace_id`.
fn traced<T>(request: T, trace_id: &[u8], span_id: &[u8]) -> Request<T> {
    let mut request = Request::new(request);
    let traceparent = format!("00-{}-{}-01", hex(trace_id), hex(span_id));
    request
        .metadata_mut()
        .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
    request
}

/// The names from `span` up through its parents, as far as this trace's
/// spans go, and the parent id it ends at.
fn ancestry(span: &Received, spans: &[Received]) -> (Vec<String>, Vec<u8>) {
    let by_id: HashMap<&[u8], &Received> =
        spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let mut names = vec![format!("{}: {}", span.service, span.name)];
    let mut parent = span.parent_span_id.clone();
    while let Some(next) = by_id.get(parent.as_slice()) {
        names.push(format!("{}: {}", next.service, next.name));
        parent = next.parent_span_id.clone();
    }
    (names, parent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_is_one_trace_from_the_request_to_the_query_that_waited_for_it() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let couchbase = couchbase_kv_server::TestServer::start(Default::default())
        .await
        .unwrap();
    let rabbit = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: None,
        rabbit: Some(rabbit.clone()),
    };
    let data = tempfile::tempdir().unwrap();
    let amqp = support::bus::rabbitmq_url();
    let store = format!("redb:{}", data.path().join("events.redb").display());
    let documents = couchbase.connection_string();
    let command = Process::start(
        "command-svc",
        &strings(&[
            "--listen",
            "127.0.0.1:0",
            "--event-store",
            &store,
            "--event-bus",
            &amqp,
            "--event-bus-prefix",
            rabbit.prefix(),
            "--otlp-endpoint",
            &endpoint,
        ]),
    );
    let projector = Process::start(
        "projector",
        &strings(&[
            "--listen",
            "127.0.0.1:0",
            "--event-bus",
            &amqp,
            "--event-bus-prefix",
            rabbit.prefix(),
            "--event-log",
            &format!("http://{}", command.addr),
            "--document-store",
            &documents,
            "--otlp-endpoint",
            &endpoint,
        ]),
    );
    let query = Process::start(
        "query-svc",
        &strings(&[
            "--listen",
            "127.0.0.1:0",
            "--document-store",
            &documents,
            "--otlp-endpoint",
            &endpoint,
        ]),
    );
    for process in [&command, &projector, &query] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", process.addr))
            .unwrap()
            .connect_lazy();
        support::wait_for_health(channel, "", ServingStatus::Serving).await;
    }

    // The caller's trace: one span sends the command, another the query.
    let trace_id: [u8; 16] = uuid::Uuid::new_v4().into_bytes();
    let (sending, asking) = ([1u8, 2, 3, 4, 5, 6, 7, 8], [8u8, 7, 6, 5, 4, 3, 2, 1]);
    let mut commands = CommandServiceClient::connect(format!("http://{}", command.addr))
        .await
        .unwrap();
    let written = commands
        .increment_counter(traced(
            pb::IncrementCounterRequest {
                counter_id: "traced".into(),
                amount: Some(3),
                ..Default::default()
            },
            &trace_id,
            &sending,
        ))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let mut queries = QueryServiceClient::connect(format!("http://{}", query.addr))
        .await
        .unwrap();
    let mut ask = traced(
        pb::GetCounterRequest {
            counter_id: "traced".into(),
            min_version: written.version,
        },
        &trace_id,
        &asking,
    );
    ask.set_timeout(Duration::from_secs(30));
    let view = queries.get_counter(ask).await.unwrap().into_inner();
    assert_eq!((view.count, view.version), (3, written.version));

    // The event carries the trace, and with no correlation id of its own
    // the command is correlated by its trace.
    let mut reader = ReadServiceClient::connect(format!("http://{}", command.addr))
        .await
        .unwrap();
    let logged = reader
        .read_stream(pb::ReadStreamRequest {
            stream_id: written.stream_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let envelope = logged.events[0].event.clone().unwrap();
    assert!(
        envelope
            .traceparent
            .starts_with(&format!("00-{}-", hex(&trace_id))),
        "the event's traceparent {:?} is not the caller's trace",
        envelope.traceparent
    );
    assert_eq!(
        envelope.correlation_id,
        uuid::Uuid::from_bytes(trace_id).to_string()
    );

    // Stopping flushes every process's last spans.
    for process in [query, projector, command] {
        assert!(process.stop().success());
    }
    let spans = collector.of_trace(&trace_id);
    let by_name = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| {
                let seen: Vec<_> = spans.iter().map(|s| (&s.service, &s.name)).collect();
                panic!("no {service} span {name:?} in the trace; it has {seen:?}")
            })
    };

    let write = by_name("projector", "write document");
    let (chain, root) = ancestry(write, &spans);
    assert_eq!(
        chain,
        [
            "projector: write document",
            "projector: project",
            "command-svc: publish",
            "command-svc: append",
            "command-svc: command",
            "command-svc: scaleout.v1.CommandService/IncrementCounter",
        ],
        "the document write does not descend from the command"
    );
    assert_eq!(root, sending, "the command's trace is not the caller's");
    assert_eq!(
        by_name("command-svc", "decide").parent_span_id,
        by_name("command-svc", "command").span_id,
    );
    assert_eq!(
        by_name("command-svc", "command").attribute("correlation_id"),
        Some(uuid::Uuid::from_bytes(trace_id).to_string()),
    );

    let read = by_name("query-svc", "read view");
    let (chain, root) = ancestry(read, &spans);
    assert_eq!(
        chain,
        [
            "query-svc: read view",
            "query-svc: scaleout.v1.QueryService/GetCounter",
        ]
    );
    assert_eq!(root, asking, "the query's trace is not the caller's");

    // Nothing in the trace hangs off a span nobody sent.
    let known: Vec<&[u8]> = spans
        .iter()
        .map(|s| s.span_id.as_slice())
        .chain([sending.as_slice(), asking.as_slice()])
        .collect();
    for span in &spans {
        assert!(
            known.contains(&span.parent_span_id.as_slice()),
            "{}: {} has a parent outside the trace",
            span.service,
            span.name
        );
        assert!(
            span.links
                .iter()
                .all(|link| known.contains(&link.as_slice()))
        );
    }
}

/// Without a collector, a caller's trace context is still recorded with
/// its events (so a relay or projector that exports carries it on), and a
/// malformed one is ignored, never a reason to refuse the command.
#[tokio::test]
async fn a_callers_trace_context_is_kept_with_the_events_and_a_malformed_one_ignored() {
    let (store, _dir) = support::redb_store();
    let server = support::CommandService::start(std::sync::Arc::clone(&store)).await;
    let mut commands = server.client().await;
    let trace_id = uuid::Uuid::new_v4();
    let traceparent = format!("00-{}-0102030405060708-01", trace_id.simple());
    let increment = |counter_id: &str, traceparent: &str| {
        let mut request = Request::new(pb::IncrementCounterRequest {
            counter_id: counter_id.into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
        request
    };
    commands
        .increment_counter(increment("kept", &traceparent))
        .await
        .unwrap();
    let malformed = format!("00-{}-0102030405060708", "f".repeat(2000));
    commands
        .increment_counter(increment("ignored", &malformed))
        .await
        .unwrap();

    let mut reader = ReadServiceClient::new(server.channel().await);
    let events = reader
        .read_all(pb::ReadAllRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let envelopes: Vec<_> = events.into_iter().map(|e| e.event.unwrap()).collect();
    assert_eq!(envelopes.len(), 2);
    assert_eq!(envelopes[0].traceparent, traceparent);
    assert_eq!(envelopes[0].correlation_id, trace_id.to_string());
    assert_eq!(envelopes[1].traceparent, "");
    assert!(uuid::Uuid::parse_str(&envelopes[1].correlation_id).is_ok());
}
