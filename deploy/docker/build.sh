#!/usr/bin/env bash
# Builds the images of the fleet: deploy/docker/<name>.Dockerfile -> $IMAGE_REGISTRY/<name>:$IMAGE_TAG.
# That naming rule is the one map between images and Dockerfiles (the manifests use the same names; a test
# checks that every image they reference is built here). Run from anywhere; the build context is the repo root.
#   build.sh [NAME...]   only those images (e.g. `build.sh orchestrator sandbox`); default: every Dockerfile but
#                        vllm-cpu (3.8 GB, ~10 min), which is built when named or with VLLM_CPU=1
#   CONTAINER_ENGINE     docker | podman (or a path); default: docker when a Docker engine answers, else podman
#                        (DOCKER= is the older name of the same setting)
#   IMAGE_REGISTRY (default swe-ai-fleet)   IMAGE_TAG (default: the version in pyproject.toml)   PUSH=1 to push
# With podman: deploy/podman/containers.conf and storage.conf (unless CONTAINERS_CONF / CONTAINERS_STORAGE_CONF say
# otherwise), host networking for the builds, and the base image never pulled (`make base-image` builds it from
# Debian packages where no registry is reachable; `podman pull python:3.11-slim-bookworm` where one is).
set -euo pipefail
cd "$(dirname "$0")/../.."
ENGINE=${CONTAINER_ENGINE:-${DOCKER:-}}
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then ENGINE=podman
  else
    echo "no container engine here (no Docker engine answers, no podman): NOTHING WAS BUILT." >&2
    echo "Install podman with ./scripts/install_container_tools.sh (what 'make images' runs), or start Docker." >&2
    exit 1
  fi
fi
if ! command -v "$ENGINE" >/dev/null 2>&1; then
  echo "container engine '$ENGINE' not found: NOTHING WAS BUILT." >&2
  echo "Install podman with ./scripts/install_container_tools.sh (what 'make images' runs), or start Docker." >&2
  exit 1
fi
flags=()
if [ "$(basename "$ENGINE")" = podman ]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
  export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$PWD/deploy/podman/storage.conf}
  flags=(--pull=never --network host)
elif ! "$ENGINE" info >/dev/null 2>&1; then
  echo "the Docker engine does not answer ('$ENGINE info' failed): NOTHING WAS BUILT." >&2
  echo "Start it, or build with podman: CONTAINER_ENGINE=podman make images" >&2
  exit 1
fi
REGISTRY=${IMAGE_REGISTRY:-swe-ai-fleet}
TAG=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for dockerfile in deploy/docker/*.Dockerfile; do
    name=$(basename "$dockerfile" .Dockerfile)
    if [ "$name" = vllm-cpu ] && [ "${VLLM_CPU:-0}" != 1 ]; then
      echo "skipping vllm-cpu (3.8 GB, ~10 min; for deploy/k8s/overlays/cpu): VLLM_CPU=1 to build it too"
      continue
    fi
    names+=("$name")
  done
fi

built=()
for name in "${names[@]}"; do
  dockerfile="deploy/docker/$name.Dockerfile"
  [ -f "$dockerfile" ] || { echo "no $dockerfile (images: $(cd deploy/docker && ls ./*.Dockerfile | sed 's|./||; s|.Dockerfile||' | xargs))" >&2; exit 1; }
  image="$REGISTRY/$name:$TAG"
  echo "==> $image ($dockerfile, $ENGINE)"
  start=$(date +%s)
  "$ENGINE" build "${flags[@]}" -f "$dockerfile" -t "$image" .
  if [ "${PUSH:-0}" = 1 ]; then "$ENGINE" push "$image"; fi
  built+=("$image ($(( $(date +%s) - start )) s)")
done
printf 'built: %s\n' "${built[@]}"
