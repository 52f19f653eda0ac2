//! Logs (human-readable text by default, JSON on request) and, when a
//! collector is configured, traces exported over OTLP.
//!
//! Spans come in two weights. The request and command spans are `info`:
//! they carry the correlation and causation ids into every log line written
//! under them. The per-stage spans (decide, append, publish, project, write,
//! read) are `debug` and only the trace exporter enables them, so without a
//! collector they are never built.

pub mod trace;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Tracer};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, TelemetryArgs};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid --log-filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// What exports traces, flushed when the process ends.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// The longest a process waits at exit for its last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl Telemetry {
    /// Exports the spans still buffered; a collector that does not answer
    /// costs at most [`FLUSH_TIMEOUT`].
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch processor's thread sends through the tonic channel,
        // which needs this runtime running while it flushes.
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "the last spans were not exported");
        }
    }
}

/// Installs the global subscriber for `service` (its `service.name` unless
/// `OTEL_SERVICE_NAME` says otherwise). Call it inside the Tokio runtime:
/// the exporter's channel lives there.
pub fn init(args: &TelemetryArgs, service: &'static str) -> Result<Telemetry, TelemetryError> {
    let logs = EnvFilter::try_new(&args.log_filter)?;
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal());
    let fmt = match args.log_format {
        LogFormat::Text => fmt.with_filter(logs).boxed(),
        LogFormat::Json => fmt.json().with_filter(logs).boxed(),
    };
    let (traces, provider) = match &args.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let provider = exporter(endpoint, args.trace_sample_ratio, service)?;
            let layer = spans(&provider).with_filter(traced());
            trace::EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry().with(fmt).with(traces).init();
    Ok(Telemetry { provider })
}

/// What the trace exporter records: the kernel's spans and events down to
/// `debug`, everything else from `info`, except the OpenTelemetry crates'
/// own (exporting those would feed the exporter with itself).
pub fn traced() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("scaleout", LevelFilter::DEBUG)
        .with_target("opentelemetry", LevelFilter::OFF)
}

/// The layer that turns spans into OpenTelemetry spans for `provider`,
/// recording what a trace shows and no more: no per-poll busy/idle timing,
/// thread, source location or target attributes, and no OpenTelemetry
/// context switched on every poll (nothing here reads it).
pub fn spans<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, Tracer>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("scaleout"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_context_activation(false)
}

/// A tracer provider that batches spans to the OTLP/gRPC collector at
/// `endpoint`, sampling `ratio` of the traces started here.
pub fn exporter(
    endpoint: &str,
    ratio: f64,
    service: &'static str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(name).build())
        .build())
}
