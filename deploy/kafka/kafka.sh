#!/usr/bin/env bash
# llmpulse dev/CI Kafka: a real Apache Kafka 4.x single-node KRaft broker,
# fetched from Maven Central with Maven and run directly with java (no Docker).
#
# Usage: kafka.sh fetch|start|stop|restart|status|reset|env
#
# Environment (all optional):
#   KAFKA_PORT=19092  KAFKA_SASL_PORT=19093  KAFKA_CONTROLLER_PORT=19094
#   KAFKA_DATA_DIR=<this dir>/data    KAFKA_RUN_DIR=<this dir>/run
#   KAFKA_CLUSTER_ID=<22-char base64>  KAFKA_VERSION=<pom default>
#   KAFKA_SASL_USER=llmpulse  KAFKA_SASL_PASSWORD=llmpulse-secret
#   KAFKA_START_TIMEOUT=90    KAFKA_HEAP_OPTS="-Xmx512m -Xms256m"
#   KAFKA_JVM_OPTS=...        KAFKA_MAVEN_REPO=<local repo, default ~/.m2/repository>
#   JAVA=java  MVN=mvn  PYTHON=python3   (MAVEN_OPTS is honoured by mvn itself)
set -euo pipefail

HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"

KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-19093}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19094}"
KAFKA_DATA_DIR="${KAFKA_DATA_DIR:-$HERE/data}"
KAFKA_RUN_DIR="${KAFKA_RUN_DIR:-$HERE/run}"
# Fixed cluster id (base64url of the 16 bytes "llmpulse-dev-kaf").
KAFKA_CLUSTER_ID="${KAFKA_CLUSTER_ID:-bGxtcHVsc2UtZGV2LWthZg}"
KAFKA_SASL_USER="${KAFKA_SASL_USER:-llmpulse}"
KAFKA_SASL_PASSWORD="${KAFKA_SASL_PASSWORD:-llmpulse-secret}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}"
JAVA="${JAVA:-java}"
MVN="${MVN:-mvn}"
PYTHON="${PYTHON:-python3}"

# Make relative overrides independent of the caller's cwd later on.
case "$KAFKA_DATA_DIR" in /*) ;; *) KAFKA_DATA_DIR="$PWD/$KAFKA_DATA_DIR" ;; esac
case "$KAFKA_RUN_DIR" in /*) ;; *) KAFKA_RUN_DIR="$PWD/$KAFKA_RUN_DIR" ;; esac

LIB_DIR="$HERE/target/lib"
STAMP="$HERE/target/lib.stamp"
PID_FILE="$KAFKA_RUN_DIR/kafka.pid"
OUT_FILE="$KAFKA_RUN_DIR/kafka.out"
LOG_DIR="$KAFKA_RUN_DIR/logs"
PROPS="$KAFKA_RUN_DIR/server.properties"
LOG_OFFSET=0
META="$KAFKA_DATA_DIR/kraft-combined-logs/meta.properties"

say() { printf 'kafka.sh: %s\n' "$*"; }
die() { printf 'kafka.sh: error: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH. $2"
}

now_ms() { date +%s%3N; }
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%02d' $((d / 1000)) $(((d % 1000) / 10)); }

bootstrap_line() {
  echo "KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
  echo "KAFKA_SASL_BOOTSTRAP=127.0.0.1:$KAFKA_SASL_PORT"
  echo "KAFKA_SASL_USER=$KAFKA_SASL_USER"
  echo "KAFKA_SASL_PASSWORD=$KAFKA_SASL_PASSWORD"
}

# ---------------------------------------------------------------- fetch
jar_count() { find "$LIB_DIR" -maxdepth 1 -name '*.jar' | wc -l; }

wanted_stamp() { echo "kafka.version=${KAFKA_VERSION:-pom-default}"; }

needs_fetch() {
  [[ -d "$LIB_DIR" && -f "$STAMP" ]] || return 0
  [[ "$HERE/pom.xml" -nt "$STAMP" ]] && return 0
  [[ "$(cat "$STAMP")" == "$(wanted_stamp)" ]] || return 0
  compgen -G "$LIB_DIR/kafka_2.13-*.jar" >/dev/null || return 0
  return 1
}

do_fetch() {
  need "$MVN" "Install Apache Maven 3.8+ (Debian: apt-get install maven)."
  need "$JAVA" "Install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)."
  local args=(-B -q -f "$HERE/pom.xml")
  [[ -n "${KAFKA_VERSION:-}" ]] && args+=("-Dkafka.version=$KAFKA_VERSION")
  [[ -n "${KAFKA_MAVEN_REPO:-}" ]] && args+=("-Dmaven.repo.local=$KAFKA_MAVEN_REPO")
  say "fetching Kafka jars with Maven into ${LIB_DIR#"$HERE"/} ..."
  local t0; t0=$(now_ms)
  rm -rf "$LIB_DIR" "$STAMP"
  mkdir -p "$HERE/target"
  if ! "$MVN" "${args[@]}" package </dev/null >"$HERE/target/mvn.out" 2>&1; then
    sed 's/\x1b\[[0-9;]*m//g' "$HERE/target/mvn.out" >&2
    die "mvn failed (Maven Central reachable? retry: $MVN -B -f $HERE/pom.xml package)"
  fi
  compgen -G "$LIB_DIR/kafka_2.13-*.jar" >/dev/null || die "mvn ran but $LIB_DIR has no kafka_2.13 jar"
  wanted_stamp >"$STAMP"
  say "fetched $(jar_count) jars, $(du -sh "$LIB_DIR" | cut -f1) in $(secs_since "$t0")s"
}

cmd_fetch() {
  if needs_fetch; then
    do_fetch
  else
    say "jars up to date: $(jar_count) jars, $(du -sh "$LIB_DIR" | cut -f1) in ${LIB_DIR#"$HERE"/}"
  fi
}

# ---------------------------------------------------------------- helpers
read_pid() { if [[ -f "$PID_FILE" ]]; then tr -dc '0-9' <"$PID_FILE"; fi; }

# True if $1 is a live process that is our Kafka broker (guards pid reuse).
is_broker_pid() {
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 0   # no procfs: trust kill -0
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'kafka\.Kafka'
}

running_pid() {
  local pid; pid="$(read_pid)"
  if is_broker_pid "$pid"; then echo "$pid"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

classpath() { echo "$LIB_DIR/*"; }

render_props() {
  local tpl; tpl="$(cat "$HERE/server.properties")"
  local v
  for v in KAFKA_PORT KAFKA_SASL_PORT KAFKA_CONTROLLER_PORT KAFKA_DATA_DIR KAFKA_SASL_USER KAFKA_SASL_PASSWORD; do
    tpl="${tpl//"\${$v}"/${!v}}"
  done
  printf '%s\n' "$tpl" >"$PROPS"
}

format_storage() {
  if [[ -f "$META" ]]; then
    say "storage already formatted ($(grep -h '^cluster.id=' "$META" || true))"
    return
  fi
  say "formatting storage in $KAFKA_DATA_DIR (cluster id $KAFKA_CLUSTER_ID, SCRAM user $KAFKA_SASL_USER)"
  mkdir -p "$KAFKA_DATA_DIR"
  "$JAVA" -Xmx256m -cp "$(classpath)" \
    -Dlog4j2.configurationFile="$HERE/log4j2.xml" -Dkafka.logs.dir="$LOG_DIR" \
    kafka.tools.StorageTool format \
    --config "$PROPS" --cluster-id "$KAFKA_CLUSTER_ID" --ignore-formatted \
    --add-scram "SCRAM-SHA-256=[name=$KAFKA_SASL_USER,password=$KAFKA_SASL_PASSWORD]" \
    --add-scram "SCRAM-SHA-512=[name=$KAFKA_SASL_USER,password=$KAFKA_SASL_PASSWORD]" \
    </dev/null >"$KAFKA_RUN_DIR/format.out" 2>&1 \
    || { cat "$KAFKA_RUN_DIR/format.out" >&2; die "storage format failed"; }
  [[ -f "$META" ]] || { cat "$KAFKA_RUN_DIR/format.out" >&2; die "storage format did not write $META"; }
}

# Wait until a Metadata request on the PLAINTEXT listener lists our broker.
# Uses aiokafka when importable; otherwise a raw ApiVersions request (stdlib).
# Exit codes: 0 ready, 1 timeout, 2 broker process died.
wait_ready() {
  local timeout="$1" pid="${2:-0}"
  need "$PYTHON" "Python 3 is needed for the readiness check (set PYTHON=...)."
  "$PYTHON" - "127.0.0.1:$KAFKA_PORT" "$timeout" "$pid" <<'PY'
import asyncio, os, socket, struct, sys, time

bootstrap, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
host, port = bootstrap.rsplit(":", 1)
deadline = time.monotonic() + timeout

def alive():
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

try:
    import logging
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    from aiokafka.client import AIOKafkaClient

    async def probe():
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                metadata_max_age_ms=1000, connections_max_idle_ms=5000)
        try:
            await client.bootstrap()
            return len(client.cluster.brokers()) > 0
        finally:
            await client.close()

    def check():
        try:
            return asyncio.run(asyncio.wait_for(probe(), 4))
        except Exception:
            return False
except ImportError:
    def check():  # ApiVersions v0 on a raw socket: error_code 0 => serving requests
        try:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                body = struct.pack(">hhih", 18, 0, 1, 6) + b"ready?"
                s.sendall(struct.pack(">i", len(body)) + body)
                hdr = s.recv(4)
                if len(hdr) < 4:
                    return False
                resp = b""
                n = struct.unpack(">i", hdr)[0]
                while len(resp) < n:
                    chunk = s.recv(n - len(resp))
                    if not chunk:
                        return False
                    resp += chunk
                return struct.unpack(">h", resp[4:6])[0] == 0
        except OSError:
            return False

while True:
    if not alive():
        sys.exit(2)
    if check():
        sys.exit(0)
    if time.monotonic() >= deadline:
        sys.exit(1)
    time.sleep(0.25)
PY
}

show_log_tail() {
  echo "---- tail $OUT_FILE ----" >&2
  tail -n 30 "$OUT_FILE" >&2 2>/dev/null || true
  if [[ -f "$LOG_DIR/server.log" ]]; then
    echo "---- errors logged by this start in $LOG_DIR/server.log ----" >&2
    tail -c +$((LOG_OFFSET + 1)) "$LOG_DIR/server.log" | grep -E '^\[[^]]*\] (ERROR|FATAL) ' | tail -n 20 >&2 || true
  fi
}

# ---------------------------------------------------------------- start
cmd_start() {
  local pid rc t0
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    t0=$(now_ms)
    rc=0; wait_ready "$KAFKA_START_TIMEOUT" "$pid" || rc=$?
    if [[ $rc -eq 0 ]]; then
      say "already running (pid $pid), ready"
      bootstrap_line
      return 0
    fi
    die "broker pid $pid is running but not answering metadata on 127.0.0.1:$KAFKA_PORT after $(secs_since "$t0")s (see $OUT_FILE, $LOG_DIR/server.log; try: $0 stop)"
  fi
  rm -f "$PID_FILE"

  need "$JAVA" "Install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)."
  needs_fetch && do_fetch

  local p
  for p in "$KAFKA_PORT" "$KAFKA_SASL_PORT" "$KAFKA_CONTROLLER_PORT"; do
    port_open "$p" && die "port 127.0.0.1:$p is already in use by another process (set KAFKA_PORT / KAFKA_SASL_PORT / KAFKA_CONTROLLER_PORT)"
  done

  mkdir -p "$KAFKA_RUN_DIR" "$LOG_DIR" "$KAFKA_DATA_DIR"
  render_props
  t0=$(now_ms)
  format_storage

  LOG_OFFSET=$(stat -c %s "$LOG_DIR/server.log" 2>/dev/null || echo 0)
  say "starting broker (PLAINTEXT :$KAFKA_PORT, SASL_PLAINTEXT :$KAFKA_SASL_PORT, CONTROLLER :$KAFKA_CONTROLLER_PORT)"
  # shellcheck disable=SC2086  # heap/JVM opts are intentionally word-split
  nohup setsid "$JAVA" $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS \
    -Dkafka.logs.dir="$LOG_DIR" \
    -Dlog4j2.configurationFile="$HERE/log4j2.xml" \
    -cp "$(classpath)" kafka.Kafka "$PROPS" \
    </dev/null >"$OUT_FILE" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"

  rc=0; wait_ready "$KAFKA_START_TIMEOUT" "$pid" || rc=$?
  case $rc in
    0) say "ready in $(secs_since "$t0")s (pid $pid, logs: $LOG_DIR/server.log)"
       bootstrap_line ;;
    2) show_log_tail; rm -f "$PID_FILE"; die "broker exited during startup" ;;
    *) show_log_tail
       # a broker recovers every log segment before it answers: a data directory grown by many
       # benchmark runs (12 GB took over 90 s here) is slow, not broken
       die "broker (pid $pid) not ready after ${KAFKA_START_TIMEOUT}s; still running ($(du -sh "$KAFKA_DATA_DIR" 2>/dev/null | cut -f1) of data to recover). Wait and check with: $0 status; or raise KAFKA_START_TIMEOUT; or stop it ($0 stop) and remove $KAFKA_DATA_DIR to start empty" ;;
  esac
}

# ---------------------------------------------------------------- stop
cmd_stop() {
  local pid; pid="$(read_pid)"
  if [[ -z "$pid" ]] || ! is_broker_pid "$pid"; then
    rm -f "$PID_FILE"
    say "not running"
    return 0
  fi
  local t0; t0=$(now_ms)
  say "stopping broker pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "still alive after 30s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$PID_FILE"
  say "stopped in $(secs_since "$t0")s"
}

# ---------------------------------------------------------------- status
cmd_status() {
  local pid; pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    local ports="" p
    for p in "$KAFKA_PORT" "$KAFKA_SASL_PORT" "$KAFKA_CONTROLLER_PORT"; do
      if port_open "$p"; then ports+=" $p:open"; else ports+=" $p:closed"; fi
    done
    say "running (pid $pid; 127.0.0.1 ports$ports)"
    bootstrap_line
    return 0
  fi
  say "not running"
  return 1
}

cmd_reset() {
  cmd_stop
  if [[ -d "$KAFKA_DATA_DIR" ]]; then
    rm -rf -- "$KAFKA_DATA_DIR"
    say "deleted data dir $KAFKA_DATA_DIR"
  fi
}

usage() {
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Serialise concurrent start/stop/reset/fetch calls (e.g. parallel test jobs).
lock() {
  command -v flock >/dev/null 2>&1 || return 0
  mkdir -p "$KAFKA_RUN_DIR"
  exec 9>"$KAFKA_RUN_DIR/.lock"
  flock -w 300 9 || die "could not take $KAFKA_RUN_DIR/.lock within 300s"
}

case "${1:-}" in
  fetch|start|stop|restart|reset) lock ;;
esac

case "${1:-}" in
  fetch)   cmd_fetch ;;
  start)   cmd_start ;;
  stop)    cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status)  cmd_status ;;
  reset)   cmd_reset ;;
  env)     bootstrap_line ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
