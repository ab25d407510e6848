#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs and starts the real services (Cassandra, NATS,
# SeaweedFS, Keycloak, and Meilisearch when available), then checks formatting and lints and runs
# every test against them. Services this script started are stopped again at the end; ones that
# were already running are left alone. CONFAB_KEEP_SERVICES=1 keeps them up either way.
set -euo pipefail
cd "$(dirname "$0")/.."

started_here=0
if ! bash infra/status.sh >/dev/null 2>&1; then
  started_here=1
fi
stop_services() {
  if [[ "$started_here" == 1 && "${CONFAB_KEEP_SERVICES:-0}" != 1 ]]; then
    bash infra/down.sh || true
  fi
}
trap stop_services EXIT

bash infra/up.sh
# shellcheck disable=SC1091
. .infra/env
# A missing service fails the tests instead of skipping them.
export CONFAB_REQUIRE_SERVICES=1

# A test run is a build from a clean tree more often than not, where incremental state only
# doubles the disk the build takes.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# A hung test must not eat the CI budget: the whole suite gets 50 minutes to run, about half
# again what it takes on a quiet host (a host busy with other work stretched it past 40). Building
# the tests comes first, outside that limit.
cargo test --workspace --locked --no-run
timeout --kill-after=30 3000 cargo test --workspace --locked 2>&1 | tee .infra/test-output.log

# The OpenAPI description confab serves must be valid OpenAPI 3.1.
cargo run --quiet --locked -- openapi > .infra/openapi.json
"${CONFAB_INFRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/confab-infra}/venv/bin/openapi-spec-validator" .infra/openapi.json

# The web client in a real Chromium (Debian's package, installed when missing).
timeout --kill-after=30 600 bash infra/browser-tests.sh 2>&1 | tee .infra/browser-output.log

# Fuzz every operation from that description against `confab serve` (bounded in time): no 5xx,
# no response the description does not allow.
bash infra/fuzz-api.sh

# Stop what this script started before the closing line, so that line is the last one printed.
stop_services
trap - EXIT

# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { passed += $4; failed += $6 }
     /^# pass / { passed += $3 } /^# fail / { failed += $3 }
     END { printf "confab: %d passed, %d failed\n", passed, failed }' \
  .infra/test-output.log .infra/browser-output.log
