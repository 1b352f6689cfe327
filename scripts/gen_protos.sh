#!/usr/bin/env bash
# Generates the Python stubs of every proto in specs/ into gen/ (the `fleet` package every server,
# client and test imports). Deterministic: running it twice changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf gen/fleet
mkdir -p gen
mapfile -t protos < <(cd specs && find fleet -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I specs --python_out=gen --pyi_out=gen --grpc_python_out=gen "${protos[@]}"
# Packages for every generated folder.
find gen/fleet -type d | while read -r d; do
  [ -f "$d/__init__.py" ] || printf '"""Generated from specs/ by `make protos`; do not edit."""\n' > "$d/__init__.py"
done
echo "stubs generated in gen/fleet for ${#protos[@]} proto files"
