#!/usr/bin/env bash
# The base image of every deploy/docker/*.Dockerfile, python:3.11-slim-bookworm, where no registry is reachable:
# built from Debian bookworm's own packages (debootstrap: python3 3.11, venv, ca-certificates, tzdata) and imported
# into the engine under that name. The air-gapped path: only a Debian mirror is needed (DEBIAN_MIRROR, default
# deb.debian.org; an internal mirror works the same). `make base-image` runs it; a no-op when an image of that name
# is already there (pulled from a registry or built earlier): `BASE_IMAGE_REBUILD=1` builds it again.
#
# Not the Docker Hub image: Python is Debian's 3.11.2 at /usr/bin/python3 (`python` via python-is-python3), not
# 3.11.x under /usr/local. The Dockerfiles use only `python -m venv`, apt-get and useradd, which both have.
# The host's extra CA certificates (/usr/local/share/ca-certificates/*.crt, e.g. a proxy that re-signs TLS) are
# copied in when there are any, so pip and apt inside the builds trust what the host trusts; the script says so.
#   CONTAINER_ENGINE (podman | docker; default: the one that answers)   BASE_IMAGE (default python:3.11-slim-bookworm)
set -euo pipefail
ENGINE=${CONTAINER_ENGINE:-podman}
IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${BASE_IMAGE_REBUILD:-0}" != 1 ] && "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present ($ENGINE), not rebuilt"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "building the base image needs root (debootstrap): run 'sudo make base-image', or pull $IMAGE" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

start=$(date +%s)
rootfs=$(mktemp -d /var/tmp/fleet-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "base image $IMAGE: not present; building it from Debian packages (debootstrap bookworm from $MIRROR, ~1-2 min)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
  bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"

shopt -s nullglob
extra=(/usr/local/share/ca-certificates/*.crt)
if [ ${#extra[@]} -gt 0 ]; then
  echo "copying this host's extra CA certificates into the base image: ${extra[*]}"
  echo "  (the host trusts them, e.g. a TLS-re-signing proxy: without them pip and apt in the builds would fail)"
  cp "${extra[@]}" "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null
else
  echo "no extra CA certificates on this host (/usr/local/share/ca-certificates/*.crt): only Debian's"
fi
# The suites the Docker Hub image has: bookworm, its updates and security (for the Dockerfiles' apt-get installs).
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
  "$MIRROR" "$MIRROR" "$SECURITY_MIRROR" >"$rootfs/etc/apt/sources.list"
# What the slim image also does: no apt caches and package lists in the image.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

tar -C "$rootfs" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: built in $(( $(date +%s) - start )) s ($("$ENGINE" run --rm "$IMAGE" python3 --version))"
