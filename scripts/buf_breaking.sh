#!/usr/bin/env bash
# Breaking-change check of specs/ against the main branch (skipped, saying so, when main has no specs yet).
set -euo pipefail
BUF=${1:-buf}
cd "$(dirname "$0")/.."
if ! git rev-parse --verify --quiet main >/dev/null; then
  echo "buf breaking: no main branch here; skipped"; exit 0
fi
if ! git cat-file -e main:specs/buf.yaml 2>/dev/null; then
  echo "buf breaking: main has no specs/ yet; skipped"; exit 0
fi
"$BUF" breaking specs --against ".git#branch=main,subdir=specs"
echo "buf breaking: no breaking change against main"
