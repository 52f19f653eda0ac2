//! How every benchmark measures and reports: each scenario runs several
//! times with its baseline interleaved (baseline, scenario, baseline, …) so
//! that drift on a shared machine hits both alike, and each row gives the
//! median with the spread (min–max) of the repetitions, as Markdown.
//!
//! Markdown goes to stdout (`scripts/bench.sh` gathers it into one table);
//! progress goes to stderr. Knobs: `BENCH_SECS` (time-bound scenarios, 5),
//! `BENCH_EVENTS` (count-bound scenarios, 50,000), `BENCH_REPS` (3), and
//! `BENCH_FILTER` (run only the scenarios whose name contains it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?}: a whole number, please")),
        Err(_) => default,
    }
}

/// How long a time-bound scenario runs.
pub fn run_for() -> Duration {
    Duration::from_secs(knob("BENCH_SECS", 5))
}

/// How many events a count-bound scenario moves.
pub fn events() -> usize {
    knob("BENCH_EVENTS", 50_000) as usize
}

/// How many times each scenario and its baseline run.
pub fn repetitions() -> usize {
    knob("BENCH_REPS", 3).max(1) as usize
}

/// Whether `scenario` is one `BENCH_FILTER` asks for (all when unset).
fn selected(scenario: &str) -> bool {
    std::env::var("BENCH_FILTER").map_or(true, |filter| scenario.contains(&filter))
}

/// One run of one scenario.
#[derive(Clone, Debug)]
pub struct Sample {
    ops: usize,
    elapsed: Duration,
    /// Sorted; empty where only throughput was measured.
    latencies: Vec<Duration>,
}

impl Sample {
    /// `ops` operations took `elapsed` in all.
    pub fn throughput(ops: usize, elapsed: Duration) -> Self {
        Self {
            ops,
            elapsed,
            latencies: Vec::new(),
        }
    }

    /// One latency per operation, over `elapsed` in all.
    pub fn latencies(latencies: Vec<Duration>, elapsed: Duration) -> Self {
        Self::throughput(latencies.len(), elapsed).with_latencies(latencies)
    }

    /// The latencies to report, whatever they measure (the catch-up after
    /// a fault, say); `ops` stays as it was.
    pub fn with_latencies(mut self, mut latencies: Vec<Duration>) -> Self {
        latencies.sort_unstable();
        self.latencies = latencies;
        self
    }

    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.latencies.len();
        let rank = ((n as f64 * p).ceil() as usize).clamp(1, n.max(1));
        self.latencies.get(rank - 1).copied()
    }
}

/// Runs `writers` closed-loop tasks for [`run_for`]; each calls `op(writer)`.
pub async fn closed_loop<F, Fut>(writers: usize, op: F) -> Sample
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let run = run_for();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for writer in 0..writers {
        let op = Arc::clone(&op);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while start.elapsed() < run {
                let began = Instant::now();
                op(writer).await;
                latencies.push(began.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(latencies) = tasks.join_next().await {
        all.extend(latencies.unwrap());
    }
    Sample::latencies(all, start.elapsed())
}

/// The median and the extremes of some repetitions.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        let median = if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        };
        Some(Self {
            median,
            min: values[0],
            max: values[values.len() - 1],
        })
    }

    fn cell(&self, digits: usize, unit: &str) -> String {
        format!(
            "{:.digits$}{unit} ({:.digits$}–{:.digits$})",
            self.median, self.min, self.max
        )
    }
}

fn rates(samples: &[Sample]) -> Option<Spread> {
    Spread::of(samples.iter().map(Sample::per_second).collect())
}

fn millis(samples: &[Sample], p: f64) -> Option<Spread> {
    Spread::of(
        samples
            .iter()
            .filter_map(|s| s.percentile(p))
            .map(|d| d.as_secs_f64() * 1e3)
            .collect(),
    )
}

fn or_dash(cell: Option<String>) -> String {
    cell.unwrap_or_else(|| "—".into())
}

/// The Markdown table of one benchmark, printed row by row as rows finish.
pub struct Report;

impl Report {
    /// Prints the benchmark's heading and the table's header.
    pub fn start(bench: &str, about: &str) -> Self {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("### {bench}: {about}\n");
        println!(
            "{cores} cores; medians of {} repetitions, (min–max) across them; baselines interleaved; \
             {} s or {} events per run.\n",
            repetitions(),
            run_for().as_secs(),
            events(),
        );
        println!(
            "| scenario | per second | p50 ms | p99 ms | baseline | baseline per second | ratio |"
        );
        println!("|---|---|---|---|---|---|---|");
        Self
    }

    /// Runs `baseline` and `measured` in turn, [`repetitions`] times, and
    /// prints their row; the ratio is taken per repetition (measured over
    /// the baseline run just before it).
    pub async fn compare(
        &mut self,
        scenario: &str,
        baseline_name: &str,
        mut baseline: impl AsyncFnMut() -> Sample,
        mut measured: impl AsyncFnMut() -> Sample,
    ) {
        if !selected(scenario) {
            return;
        }
        let (mut baselines, mut samples) = (Vec::new(), Vec::new());
        for rep in 1..=repetitions() {
            let base = baseline().await;
            eprintln!("  {scenario} [{rep}] baseline {:.0}/s", base.per_second());
            let sample = measured().await;
            eprintln!("  {scenario} [{rep}] {:.0}/s", sample.per_second());
            baselines.push(base);
            samples.push(sample);
        }
        let ratios = Spread::of(
            samples
                .iter()
                .zip(&baselines)
                .map(|(m, b)| m.per_second() / b.per_second())
                .collect(),
        );
        self.row(
            scenario,
            &samples,
            baseline_name,
            rates(&baselines).map(|s| s.cell(0, "")),
            ratios.map(|s| s.cell(2, "×")),
        );
    }

    /// A scenario measured on its own (latency under a fixed load, say).
    pub async fn alone(&mut self, scenario: &str, mut measured: impl AsyncFnMut() -> Sample) {
        if !selected(scenario) {
            return;
        }
        let mut samples = Vec::new();
        for rep in 1..=repetitions() {
            let sample = measured().await;
            eprintln!("  {scenario} [{rep}] {:.0}/s", sample.per_second());
            samples.push(sample);
        }
        self.row(scenario, &samples, "—", None, None);
    }

    fn row(
        &self,
        scenario: &str,
        samples: &[Sample],
        baseline_name: &str,
        baseline: Option<String>,
        ratio: Option<String>,
    ) {
        println!(
            "| {scenario} | {} | {} | {} | {baseline_name} | {} | {} |",
            or_dash(rates(samples).map(|s| s.cell(0, ""))),
            or_dash(millis(samples, 0.50).map(|s| s.cell(2, ""))),
            or_dash(millis(samples, 0.99).map(|s| s.cell(2, ""))),
            or_dash(baseline),
            or_dash(ratio),
        );
    }

    /// Ends the table.
    pub fn finish(self) {
        println!();
    }
}
