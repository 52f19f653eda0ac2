//! What a projector counts, rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::contention::Contention;

/// Counters shared by a projector's workers.
#[derive(Debug, Default)]
pub struct ProjectorMetrics {
    /// Deliveries applied and acked.
    pub handled: AtomicU64,
    /// Deliveries every document had applied already: acked and skipped.
    pub duplicates: AtomicU64,
    /// Writes that lost a CAS race and were read and folded again.
    pub cas_conflicts: AtomicU64,
    /// Deliveries handed back to the bus for a later attempt.
    pub retries: AtomicU64,
    /// Deliveries parked in the dead-letter queue.
    pub parked: AtomicU64,
    /// Events the log follower applied: in the embedded platform all of
    /// them; beside a bus, those whose delivery was lost or parked.
    pub log_applied: AtomicU64,
    /// Events the log follower found applied already.
    pub log_skipped: AtomicU64,
    /// Events read from the log to fill a gap a document had.
    pub gap_fills: AtomicU64,
    /// Workers paused right now because a dependency does not answer, or
    /// waiting to be restarted.
    pub paused: AtomicU64,
    /// Workers restarted after they ended unexpectedly (a panic).
    pub worker_restarts: AtomicU64,
    /// Milliseconds from an event's commit to its projection, last seen.
    pub lag_ms: AtomicU64,
    /// Log events folded into new generations by rebuilds in this process.
    pub rebuild_events: AtomicU64,
    /// Log events a rebuild in this process has still to fold, as last seen.
    pub rebuild_remaining: AtomicU64,
    /// The documents that lose the most CAS races (and, in the embedded
    /// platform, the streams that lose the most command races).
    pub contention: Arc<Contention>,
}

impl ProjectorMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether any worker is waiting out an outage: the projector is not
    /// serving then, whatever its dependencies answer to a ping.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed) > 0
    }

    /// Counts a worker as paused until the returned guard is dropped.
    pub fn pause(&self) -> PausedWorker<'_> {
        Self::add(&self.paused, 1);
        PausedWorker(self)
    }

    /// The counters in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 13] = [
            (
                "scaleout_projector_handled_total",
                "counter",
                "Deliveries applied and acked.",
                &self.handled,
            ),
            (
                "scaleout_projector_duplicates_total",
                "counter",
                "Deliveries already applied, skipped.",
                &self.duplicates,
            ),
            (
                "scaleout_projector_cas_conflicts_total",
                "counter",
                "Document writes that lost a CAS race.",
                &self.cas_conflicts,
            ),
            (
                "scaleout_projector_retries_total",
                "counter",
                "Deliveries handed back for a later attempt.",
                &self.retries,
            ),
            (
                "scaleout_projector_parked_total",
                "counter",
                "Deliveries dead-lettered.",
                &self.parked,
            ),
            (
                "scaleout_projector_log_applied_total",
                "counter",
                "Events the log follower applied (a delivery lost, parked or not used).",
                &self.log_applied,
            ),
            (
                "scaleout_projector_log_skipped_total",
                "counter",
                "Events the log follower found applied already.",
                &self.log_skipped,
            ),
            (
                "scaleout_projector_gap_fills_total",
                "counter",
                "Events read from the log to fill a document's gap.",
                &self.gap_fills,
            ),
            (
                "scaleout_projector_paused_workers",
                "gauge",
                "Workers waiting out a dependency that does not answer.",
                &self.paused,
            ),
            (
                "scaleout_projector_worker_restarts_total",
                "counter",
                "Workers restarted after ending unexpectedly.",
                &self.worker_restarts,
            ),
            (
                "scaleout_projector_lag_milliseconds",
                "gauge",
                "Commit-to-projection lag of the last event.",
                &self.lag_ms,
            ),
            (
                "scaleout_projector_rebuild_events_total",
                "counter",
                "Log events folded into new read model generations.",
                &self.rebuild_events,
            ),
            (
                "scaleout_projector_rebuild_remaining_events",
                "gauge",
                "Log events a running rebuild has still to fold.",
                &self.rebuild_remaining,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out.push_str(&self.contention.render());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_in_prometheus_text_format() {
        let metrics = ProjectorMetrics::default();
        ProjectorMetrics::add(&metrics.handled, 3);
        let text = metrics.render();
        assert!(text.contains(
            "# TYPE scaleout_projector_handled_total counter\nscaleout_projector_handled_total 3\n"
        ));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 13);
    }
}

/// A worker counted as paused while this lives (see [`ProjectorMetrics::pause`]).
#[derive(Debug)]
pub struct PausedWorker<'a>(&'a ProjectorMetrics);

impl Drop for PausedWorker<'_> {
    fn drop(&mut self) {
        self.0.paused.fetch_sub(1, Ordering::Relaxed);
    }
}
