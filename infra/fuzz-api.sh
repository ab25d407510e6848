#!/usr/bin/env bash
# Fuzzes the HTTP API from the OpenAPI description it serves, with Schemathesis, against
# `confab serve` (embedded stack, dev identity) on a free loopback port, for a bounded time.
# Fails on any 5xx and on any response the description does not allow: its status, its content
# type, its headers or its body's schema.
#
# Settings (environment):
#   CONFAB_FUZZ_SECONDS  time budget of the Schemathesis run (default 150)
#   CONFAB_FUZZ_SEED     Schemathesis's seed (default: random; the run prints the one it used)
#   CONFAB_FUZZ_REPORT   directory for the JUnit and NDJSON reports (default .infra/fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
. infra/lib.sh

SCHEMATHESIS_VERSION="${CONFAB_INFRA_SCHEMATHESIS_VERSION:-4.32.5}"
# A venv of its own: Schemathesis's dependencies must not move those of the services' venv.
FUZZ_VENV="$CACHE_DIR/fuzz-venv"
SECONDS_BUDGET="${CONFAB_FUZZ_SECONDS:-150}"
REPORT_DIR="${CONFAB_FUZZ_REPORT:-$STATE_DIR/fuzz}"

want="schemathesis==$SCHEMATHESIS_VERSION"
if [[ ! -x "$FUZZ_VENV/bin/schemathesis" || "$(cat "$FUZZ_VENV/.installed" 2>/dev/null)" != "$want" ]]; then
  need_cmd python3
  log "fuzz: installing $want into $FUZZ_VENV"
  "$FUZZ_VENV/bin/python" -c '' 2>/dev/null || python3 -m venv "$FUZZ_VENV" \
    || die "python3 -m venv failed (is the python3-venv module installed?)"
  "$FUZZ_VENV/bin/python" -m pip install -q --disable-pip-version-check "$want" \
    || die "pip install $want failed"
  printf '%s\n' "$want" >"$FUZZ_VENV/.installed"
fi

cargo build --quiet --locked --bin confab
confab="$REPO_DIR/target/debug/confab"

work=$(mktemp -d)
confab_pid=""
cleanup() {
  if [[ -n "$confab_pid" ]]; then
    kill "$confab_pid" 2>/dev/null || true
    wait "$confab_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Only what this script sets: no CONFAB_ setting of the caller's environment leaks in.
# shellcheck disable=SC2046  # one `-u NAME` word pair per variable
serve_env=(env $(env | awk -F= '/^CONFAB_/ { printf "-u %s ", $1 }')
  CONFAB_DATA_DIR="$work/data"
  CONFAB_API__LISTEN=127.0.0.1:0
  CONFAB_IDENTITY__MODE=dev
  CONFAB_SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  CONFAB_TELEMETRY__LOG_FILTER=warn)
"${serve_env[@]}" "$confab" serve >"$work/stdout" 2>"$work/stderr" &
confab_pid=$!
base=""
for _ in $(seq 1 300); do
  base=$(sed -n 's/.* listening on \(http:[^ ]*\).*/\1/p' "$work/stdout" | head -n 1)
  [[ -n "$base" ]] && break
  kill -0 "$confab_pid" 2>/dev/null || { cat "$work/stderr" >&2; die "confab serve exited"; }
  sleep 0.1
done
[[ -n "$base" ]] || die "confab serve did not start listening within 30 s"
token=$("${serve_env[@]}" "$confab" dev-token fuzzer --hours 1)
other=$("${serve_env[@]}" "$confab" dev-token fuzzed --hours 1)
# A chat of the fuzzer's, with a message in it, so some generated requests find real things.
other_id=$(curl -sf -H "Authorization: Bearer $other" "$base/v1/me" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
chat=$(curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"kind\":\"group\",\"name\":\"fuzz\",\"members\":[\"$other_id\"]}" "$base/v1/chats")
chat_id=$(sed -n 's/^{"id":"\([^"]*\)".*/\1/p' <<<"$chat")
[[ -n "$chat_id" ]] || die "could not create a chat: $chat"
curl -sf -o /dev/null -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"kind":"message","text":"hello"}' "$base/v1/chats/$chat_id/signals" \
  || die "could not send a message"

seed="${CONFAB_FUZZ_SEED:-$RANDOM$RANDOM}"
mkdir -p "$REPORT_DIR"
log "fuzz: Schemathesis $SCHEMATHESIS_VERSION against $base for ${SECONDS_BUDGET}s (seed $seed)"
started=$(now_s)
status=0
# The event streams never end by design (SSE, WebSocket), and logging out everywhere would end
# the fuzzer's own session, leaving every later request a 401: the tests cover those. Run from the
# scratch directory, where Schemathesis leaves its own state.
(cd "$work" && "$FUZZ_VENV/bin/schemathesis" run "$base/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --exclude-path /v1/events --exclude-path /v1/ws --exclude-path /v1/me/logout-all \
  --max-time "$SECONDS_BUDGET" \
  --request-timeout 10 \
  --seed "$seed" \
  --workers 2 \
  --report junit,ndjson --report-dir "$REPORT_DIR" \
  --generation-database none \
  --no-color) || status=$?
log "fuzz: finished in $(($(now_s) - started))s with status $status"
if ! kill -0 "$confab_pid" 2>/dev/null; then
  cat "$work/stderr" >&2
  die "confab serve died during the run"
fi
if grep -q -i 'panicked' "$work/stderr"; then
  grep -i -A5 'panicked' "$work/stderr" >&2
  die "confab serve panicked during the run"
fi
exit "$status"
