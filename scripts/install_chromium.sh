#!/usr/bin/env bash
# Debian's Chromium for the browser tests (driven by playwright through /usr/bin/chromium; never `playwright install`).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "chromium missing and no root: the browser tests will be skipped (apt-get install chromium)"; exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
echo "installing Debian chromium for the browser tests (~1 min)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
