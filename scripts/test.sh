#!/usr/bin/env bash
# Runs every test of scaleout, starting the services the tests need when they
# are not running (PostgreSQL and RabbitMQ, installed with apt-get on a fresh
# Debian machine, as is mmdebstrap for the image test; RabbitMQ is given a TLS
# listener on 5671 for the amqps:// tests).
#
#   scripts/test.sh            lints, then every test
#   scripts/test.sh --no-lint  tests only
#
# Environment: SCALEOUT_TEST_POSTGRES_URL overrides the PostgreSQL the tests use
# (default postgres://scaleout:scaleout@127.0.0.1:5432/scaleout, created here);
# SCALEOUT_TEST_RABBITMQ_URL the RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

lint=1
[[ "${1:-}" == "--no-lint" ]] && lint=0

step() { printf '\n==> %s\n' "$*"; }

step "services"
ensure_build_deps
ensure_postgres
ensure_rabbitmq
ensure_rabbitmq_tls
ensure_mmdebstrap
ensure_python_tools
export SCALEOUT_TEST_POSTGRES_URL="${SCALEOUT_TEST_POSTGRES_URL:-$POSTGRES_URL}"
export PATH="$PWD/target/py/bin:$PATH"

if (( lint )); then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "buf lint"
  buf lint
  step "cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Tests start the workspace's binaries as processes: `cargo test` builds
# only those of packages that have tests of their own.
step "cargo build"
cargo build --workspace --bins --locked

step "cargo test"
cargo test --workspace --locked 2>&1 | tee "$log"

step "pytest (generated Python client, compose checks, the image's runtime stage, end to end)"
(cd tests/python && pytest -q -p no:cacheprovider) 2>&1 | tee -a "$log"

# One closing line for the whole run, summed over every test binary and pytest.
awk '
  /^test result:/ { passed += $4; failed += $6 }
  !/^test result:/ && /(^|[ =])[0-9]+ (passed|failed)/ {
    for (i = 1; i < NF; i++) {
      if ($(i + 1) ~ /^passed/) passed += $i
      if ($(i + 1) ~ /^failed/) failed += $i
    }
  }
  END { printf "\n%d passed, %d failed\n", passed, failed }' "$log"
