//! The W3C trace context one command's work carries from the request to
//! its events, the bus and the projectors, so that a collector shows it as
//! one trace.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

/// The metadata key (gRPC) and header (AMQP) a trace context travels in.
pub const TRACEPARENT: &str = "traceparent";

/// Whether spans are exported: set once by [`super::init`].
pub(super) static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans; without it, the per-stage spans are
/// never built, so work done only to give them a parent can be skipped.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A W3C `traceparent`: the trace a piece of work belongs to and the span
/// that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
}

/// A `traceparent` that is not `00-<32 hex>-<16 hex>-<2 hex>` with
/// non-zero ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a W3C traceparent: {0:?}")]
pub struct InvalidTraceParent(String);

impl TraceParent {
    /// The trace `correlation_id` names (they are the same 128 bits), with
    /// `span_id` as its parent: how events recorded before traces were
    /// stored, or by a process that exports none, still join their trace.
    pub fn of_correlation(correlation_id: Uuid, span_id: u64) -> Self {
        Self {
            trace_id: TraceId::from_bytes(*correlation_id.as_bytes()),
            span_id: SpanId::from_bytes(span_id.max(1).to_be_bytes()),
            sampled: true,
        }
    }

    /// The trace id read as a correlation id, for work that names none.
    pub fn correlation_id(&self) -> Uuid {
        Uuid::from_bytes(self.trace_id.to_bytes())
    }

    /// The trace context of `span`, when it is recorded for export.
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let span = context.span();
        let context = span.span_context();
        context.is_valid().then(|| Self {
            trace_id: context.trace_id(),
            span_id: context.span_id(),
            sampled: context.is_sampled(),
        })
    }

    /// Makes this the parent of `span`, which must not have children yet.
    pub fn adopt(&self, span: &tracing::Span) {
        if span.is_disabled() {
            return;
        }
        let parent = opentelemetry::Context::new().with_remote_span_context(self.span_context());
        // Fails only for a span already started, which none is here.
        let _ = span.set_parent(parent);
    }

    /// Links `span` to this context: a write that folds several events
    /// belongs to the first one's trace and links the others'.
    pub fn link(&self, span: &tracing::Span) {
        span.add_link(self.span_context());
    }

    fn span_context(&self) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(self.trace_id, self.span_id, flags, true, TraceState::NONE)
    }
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    /// Version `00`, and any later version's first four fields, as the
    /// specification asks; ids of all zeros are invalid.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidTraceParent(text.chars().take(64).collect());
        let mut fields = text.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(invalid());
        };
        let hex = |field: &str, len: usize| {
            field.len() == len
                && field
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let later_version = version != "00" && version != "ff";
        if !hex(version, 2)
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
            || (version == "00" && fields.next().is_some())
            || !(version == "00" || later_version)
        {
            return Err(invalid());
        }
        let trace_id = TraceId::from_hex(trace).map_err(|_| invalid())?;
        let span_id = SpanId::from_hex(span).map_err(|_| invalid())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| invalid())?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return Err(invalid());
        }
        Ok(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = u8::from(self.sampled);
        write!(f, "00-{}-{}-{flags:02x}", self.trace_id, self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed: TraceParent = text.parse().unwrap();
        assert_eq!(parsed.to_string(), text);
        assert!(parsed.sampled);
        assert_eq!(
            parsed.correlation_id().simple().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let unsampled: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
            .parse()
            .unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let parsed: TraceParent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
            .parse()
            .unwrap();
        assert!(parsed.sampled);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for text in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(
                text.parse::<TraceParent>().is_err(),
                "{text:?} was accepted"
            );
        }
    }

    #[test]
    fn a_correlation_id_names_its_trace() {
        let correlation = Uuid::now_v7();
        let parent = TraceParent::of_correlation(correlation, 7);
        assert_eq!(parent.correlation_id(), correlation);
        assert_eq!(
            parent.to_string(),
            format!("00-{}-0000000000000007-01", correlation.simple())
        );
    }
}
