#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs what the tests need, starts the servers
# the project runs itself, runs lint, types and pytest. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

log "python dependencies"
"$PY" -m pip install --quiet --disable-pip-version-check -e '.[test]'

# Compose files are validated with compose-go, the loader of Docker Compose itself (no Docker
# engine runs here); built from the Go module proxy when no `docker compose` client exists.
if ! docker compose version >/dev/null 2>&1 && [ ! -x deploy/compose-check/bin/compose-check ]; then
  log "building deploy/compose-check (compose-go)"
  (cd deploy/compose-check && go build -o bin/compose-check .)
fi

# Debian packages the tests use: kcat produces a message to the real broker like an operator
# would; a real Alertmanager receives our alerts (and amtool checks its config); promtool checks
# and unit-tests the Prometheus rules; headless Chromium renders the weekly report.
need_apt=()
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  log "debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The JavaScript OpenTelemetry SDK that tests/llmpulse/test_server.py sends GenAI spans with
# (versions pinned by its package-lock.json). Without Node the test says so and is skipped.
if command -v npm >/dev/null 2>&1; then
  if [ ! -d tests/llmpulse/otel_js/node_modules/@opentelemetry/exporter-trace-otlp-http ]; then
    log "npm packages (tests/llmpulse/otel_js)"
    npm ci --prefix tests/llmpulse/otel_js --no-audit --no-fund --loglevel=error \
      || npm install --prefix tests/llmpulse/otel_js --no-audit --no-fund --loglevel=error \
      || log "npm install failed: the JavaScript OTel SDK test will be skipped"
  fi
else
  log "no npm: the JavaScript OTel SDK test will be skipped"
fi

# A real Apache Kafka broker (jars from Maven Central), unless one is given.
if [ -z "${LLMPULSE_KAFKA_BOOTSTRAP:-}" ]; then
  log "kafka broker (deploy/kafka)"
  if ! bash deploy/kafka/kafka.sh status >/dev/null 2>&1; then
    bash deploy/kafka/kafka.sh start
    trap 'bash deploy/kafka/kafka.sh stop >/dev/null 2>&1 || true' EXIT
  fi
  export LLMPULSE_KAFKA_BOOTSTRAP=127.0.0.1:19092
fi

log "ruff"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
log "mypy (schemas, processors)"
"$PY" -m mypy

log "pytest"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  log "pytest collected no tests (exit 5): treated as success"
  rc=0
fi
[ "$rc" -eq 0 ] || exit "$rc"

# The benchmark harness at CI sizes (about a minute): proves every figure still runs; the figures
# are printed and kept, not asserted (a benchmark is not a timed test). Skipped when pytest was
# given arguments (a partial run), or with LLMPULSE_SKIP_BENCH=1.
if [ "$#" -eq 0 ] && [ -z "${LLMPULSE_SKIP_BENCH:-}" ]; then
  log "bench (CI sizes)"
  mkdir -p test-artifacts
  "$PY" -m bench --ci --out test-artifacts/bench-ci.json
fi
