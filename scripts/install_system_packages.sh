#!/usr/bin/env bash
# System packages the tests need, from apt when missing: Debian's Chromium for the browser tests (driven by
# playwright through /usr/bin/chromium; never `playwright install`), kubectl (`kubectl kustomize` renders the
# Kubernetes manifests in tests/unit/deploy) and bubblewrap (`bwrap`: the sandbox service's isolation).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v kubectl >/dev/null || missing+=(kubectl)
command -v bwrap >/dev/null || missing+=(bubblewrap)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "missing ${missing[*]} and no root to install them (apt-get install ${missing[*]}): their tests will fail"; exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
echo "installing ${missing[*]} from apt for the tests (~1 min)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
