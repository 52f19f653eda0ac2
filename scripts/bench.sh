#!/usr/bin/env bash
# Runs the benchmarks, starting PostgreSQL and RabbitMQ as scripts/test.sh
# does, and gathers their Markdown tables into target/bench/report.md.
#
#   scripts/bench.sh                  every benchmark
#   scripts/bench.sh append bus       only those named
#
# Each scenario runs BENCH_SECS (5) or BENCH_EVENTS (50,000), BENCH_REPS (3)
# times, its baseline interleaved; see benches/common/report.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

benches=("$@")
(( ${#benches[@]} )) || benches=(append bus projector log load rebuild e2e)

ensure_build_deps
ensure_postgres
ensure_rabbitmq
export SCALEOUT_TEST_POSTGRES_URL="${SCALEOUT_TEST_POSTGRES_URL:-$POSTGRES_URL}"

cargo bench --locked --no-run "${benches[@]/#/--bench=}"
mkdir -p target/bench
report=target/bench/report.md
printf '# scaleout benchmarks, %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$report"
for bench in "${benches[@]}"; do
  printf '\n==> %s\n' "$bench" >&2
  cargo bench --locked --bench "$bench" | tee -a "$report"
done
printf '\n%s\n' "$report" >&2
