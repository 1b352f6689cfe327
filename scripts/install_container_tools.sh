#!/usr/bin/env bash
# The container engine the image targets use where no Docker engine answers: Debian's podman (4.3 on bookworm),
# buildah, runc (crun fails on hosts with hybrid cgroups; deploy/podman/containers.conf selects runc) and
# debootstrap (`make base-image`: the python:3.11-slim-bookworm stand-in built from Debian packages when no
# registry is reachable). Called by `make images`, `make base-image` and `make test-images`; a no-op (milliseconds)
# when everything is there. Without root or sudo it stops and names the apt-get command instead of going on.
set -euo pipefail
missing=()
for tool in podman buildah runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
# fuse-overlayfs/slirp4netns come with podman; uidmap (newuidmap) only matters for rootless use.
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "missing ${missing[*]} and no root to install them: run 'apt-get install -y ${missing[*]}' as root" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "missing ${missing[*]} and no apt-get here: install them with this system's package manager" >&2
  exit 1
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
echo "installing ${missing[*]} from apt for the container images (~1 min)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
