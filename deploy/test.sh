#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs what the tests need, starts the servers
# the project runs itself, runs lint, types and pytest. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

log "python dependencies"
"$PY" -m pip install --quiet --disable-pip-version-check -e '.[test]'

# Debian packages the tests use: docker-compose validates the compose file (no engine needed).
need_apt=()
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if ((${#need_apt[@]})); then
  log "debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
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
exit "$rc"
