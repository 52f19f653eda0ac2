#!/usr/bin/env bash
# Runs the benchmarks, starting PostgreSQL and RabbitMQ as scripts/test.sh
# does, and gathers their Markdown tables into target/bench/report.md.
#
#   scripts/bench.sh                  every benchmark
#   scripts/bench.sh append bus       only those named
#
# `cqrs-es` (scaleout beside cqrs-es + postgres-es) lives in a workspace of
# its own, benches/cqrs-es, so that its dependencies are built only here; it
# shares the workspace's target directory.
#
# Each scenario runs BENCH_SECS (5) or BENCH_EVENTS (50,000), BENCH_REPS (3)
# times, its baseline interleaved; see benches/common/report.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

benches=("$@")
(( ${#benches[@]} )) || benches=(append bus projector log load rebuild e2e cqrs-es)

ensure_build_deps
ensure_postgres
ensure_rabbitmq
export SCALEOUT_TEST_POSTGRES_URL="${SCALEOUT_TEST_POSTGRES_URL:-$POSTGRES_URL}"

# Runs cargo for one benchmark: `cargo bench --locked <args> <its target>`.
bench() {
  local name=$1
  shift
  if [[ "$name" == cqrs-es ]]; then
    CARGO_TARGET_DIR="$PWD/target" cargo bench --locked "$@" --manifest-path benches/cqrs-es/Cargo.toml
  else
    cargo bench --locked "$@" --bench "$name"
  fi
}

for name in "${benches[@]}"; do bench "$name" --no-run; done
mkdir -p target/bench
report=target/bench/report.md
printf '# scaleout benchmarks, %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$report"
for name in "${benches[@]}"; do
  printf '\n==> %s\n' "$name" >&2
  bench "$name" | tee -a "$report"
done
printf '\n%s\n' "$report" >&2
