#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Print whether each service is up or down. Exit status 0 when every service
# managed here is up (an absent Meilisearch does not count), 1 otherwise.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=services.sh
source "$INFRA_DIR/services.sh"

rc=0
row() { printf '%-12s %-5s %-8s %s\n' "$@"; }
row SERVICE STATE PID ENDPOINT
for svc in "${ALL_SERVICES[@]}"; do
  pid=$(service_pid "$svc" 2>/dev/null || true)
  case "$svc" in
    cassandra) ep="cql $BIND_HOST:$CQL_PORT (storage :$CASSANDRA_STORAGE_PORT, jmx :$CASSANDRA_JMX_PORT)" ;;
    nats) ep="nats://$BIND_HOST:$NATS_PORT (monitor :$NATS_MONITOR_PORT)" ;;
    seaweedfs) ep="s3 http://$BIND_HOST:$S3_PORT bucket $S3_BUCKET (master :$WEED_MASTER_PORT, volume :$WEED_VOLUME_PORT, filer :$WEED_FILER_PORT)" ;;
    keycloak) ep="$KC_ISSUER (management :$KEYCLOAK_MGMT_PORT)" ;;
    meilisearch) ep=$(meili_url) ;;
  esac
  if [[ "$svc" == meilisearch && "$(meili_mode)" == absent ]]; then
    row "$svc" absent - "no ../shared/bin/meilisearch, none on PATH, MEILI_URL unset"
    continue
  fi
  if [[ "$svc" == meilisearch && "$(meili_mode)" == external ]]; then
    pid=external
  fi
  if "${svc}_alive" >/dev/null 2>&1; then
    row "$svc" up "${pid:--}" "$ep"
  else
    row "$svc" down "${pid:--}" "$ep${pid:+ (process running, not answering)}"
    rc=1
  fi
done
echo "logs: ${LOG_DIR#"$REPO_DIR"/}/<service>.log"
exit "$rc"
