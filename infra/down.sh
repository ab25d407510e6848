#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Stop the services started by infra/up.sh (all, or the ones named).
# Only processes recorded in .infra/run/*.pid are touched. Idempotent.
#
#   infra/down.sh                 # everything
#   infra/down.sh keycloak        # a subset
#
# Data stays in .infra/ (delete that directory for a clean slate).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=services.sh
source "$INFRA_DIR/services.sh"

selected=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) echo "usage: infra/down.sh [service...]   services: ${ALL_SERVICES[*]}"; exit 0 ;;
    cassandra | nats | seaweedfs | keycloak | meilisearch) selected+=("$arg") ;;
    *) die "unknown service '$arg'" ;;
  esac
done
((${#selected[@]})) || selected=("${ALL_SERVICES[@]}")

[[ -d "$RUN_DIR" ]] || { log "nothing to stop"; exit 0; }

# Stop in parallel: Cassandra drains and flushes on TERM (several seconds),
# Keycloak shuts Quarkus down; no need to do that one after the other.
grace_of() {
  case "$1" in
    cassandra) echo 90 ;;
    keycloak) echo 45 ;;
    seaweedfs) echo 40 ;; # its filer waits up to 15 s for gRPC streams to close
    *) echo 20 ;;
  esac
}
pids=()
for svc in "${selected[@]}"; do
  stop_service "$svc" "$(grace_of "$svc")" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done

# Keep .infra/env in step with what is still running.
write_env
exit "$rc"
