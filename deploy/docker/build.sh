#!/usr/bin/env bash
# Builds every image of the fleet: deploy/docker/<name>.Dockerfile -> $IMAGE_REGISTRY/<name>:$IMAGE_TAG.
# That naming rule is the one map between images and Dockerfiles (the manifests use the same names; a test
# checks that every image they reference is built here). Run from anywhere; the build context is the repo root.
#   IMAGE_REGISTRY (default swe-ai-fleet)   IMAGE_TAG (default: the version in pyproject.toml)   PUSH=1 to push
set -euo pipefail
cd "$(dirname "$0")/../.."
DOCKER=${DOCKER:-docker}
REGISTRY=${IMAGE_REGISTRY:-swe-ai-fleet}
TAG=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}

if ! command -v "$DOCKER" >/dev/null 2>&1 || ! "$DOCKER" info >/dev/null 2>&1; then
  echo "no Docker engine answers here ('$DOCKER info' failed): NOTHING WAS BUILT."
  echo "Run 'make images' on a machine with a Docker engine (the Dockerfiles are in deploy/docker/)."
  exit 0
fi

built=()
for dockerfile in deploy/docker/*.Dockerfile; do
  name=$(basename "$dockerfile" .Dockerfile)
  image="$REGISTRY/$name:$TAG"
  echo "==> $image ($dockerfile)"
  "$DOCKER" build -f "$dockerfile" -t "$image" .
  if [ "${PUSH:-0}" = 1 ]; then "$DOCKER" push "$image"; fi
  built+=("$image")
done
printf 'built: %s\n' "${built[@]}"
