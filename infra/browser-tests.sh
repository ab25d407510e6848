#!/usr/bin/env bash
# The web client's tests in a real Chromium: installs Debian's `chromium` package when it is not
# there, Playwright (`playwright-core`, pinned by e2e/package-lock.json) from npm, and runs
# e2e/tests against a `confab serve` of the debug build. CONFAB_SCREENSHOTS=<dir> keeps
# screenshots of the main screens.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[browser-tests %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
# The emoji font, so reactions show in screenshots as people see them.
if [[ ! -x "$CHROMIUM" || ! -d /usr/share/fonts/truetype/noto ]]; then
  log "installing Debian's chromium and fonts-noto-color-emoji"
  sudo_cmd=()
  if [[ "$(id -u)" != 0 ]]; then sudo_cmd=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  packages=(chromium fonts-noto-color-emoji)
  if ! "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null; then
    "${sudo_cmd[@]}" apt-get update >/dev/null
    "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null
  fi
fi

(cd e2e && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
if [[ ! -x target/debug/confab ]]; then
  cargo build --locked --quiet
fi
export CHROMIUM
export CONFAB_BIN="${CONFAB_BIN:-$PWD/target/debug/confab}"
log "running the browser tests"
cd e2e && exec node --test --test-concurrency=1 --test-reporter=tap tests/
