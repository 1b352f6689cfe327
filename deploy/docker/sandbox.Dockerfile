# syntax=docker/dockerfile:1
# Sandbox image: `fleet serve sandbox`, gRPC on 50057 (GRPC_PORT), /metrics on 9090 (METRICS_PORT). It runs
# untrusted code (agents' proposals) against pytest tests: the base interpreter (SANDBOX_PYTHON unset: the service
# finds it and checks it at start) with pytest's distribution from the venv on its path, isolated by bubblewrap
# (SANDBOX_ISOLATION=bwrap) where the node allows it, else by the pod itself (SANDBOX_ISOLATION=pod, what
# deploy/k8s/base sets: see deploy/k8s/README.md, "The sandbox").
# Build from the repository root: `make images` (or docker build -f deploy/docker/sandbox.Dockerfile .).
# The builder stage is the same in every deploy/docker/*.Dockerfile (a test keeps them identical).

# ---- builder: stubs generated from specs/, the project installed into a venv --------------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# grpcio-tools pinned like the dev extra in pyproject.toml (a test compares them); pip pinned too (reproducible builds).
RUN python -m venv /opt/protoc && /opt/protoc/bin/pip install grpcio-tools==1.85.1
COPY pyproject.toml README.md ./
COPY scripts/gen_protos.sh scripts/
COPY specs/ specs/
RUN PY=/opt/protoc/bin/python ./scripts/gen_protos.sh
COPY services/ services/
RUN python -m venv /opt/fleet && /opt/fleet/bin/pip install pip==26.3 && /opt/fleet/bin/pip install . \
    && /opt/fleet/bin/python -c "import fleet.orchestrator.v1.orchestrator_pb2_grpc, services.cli"
COPY deploy/docker/fleet_wait.py /opt/fleet/bin/fleet-wait
RUN chmod 0755 /opt/fleet/bin/fleet-wait

# ---- sandbox venv: without Ray and kubernetes-validate (~350 MB the sandbox never imports; a unit test checks
# that `fleet serve sandbox` imports without them), with pytest (the dev extra's version), which the service
# hands to the executions ----------------------------------------------------------------------------------------
FROM builder AS sandbox
RUN /opt/fleet/bin/pip uninstall -y ray kubernetes-validate \
    && /opt/fleet/bin/pip install "pytest~=9.0" \
    && /opt/fleet/bin/python -c "import pytest, fleet.sandbox.v1.sandbox_pb2_grpc, services.cli, services.sandbox.main"

# ---- runtime: non-root, the venv and bubblewrap --------------------------------------------------------
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fleet && useradd --system --uid 10001 --gid 10001 --create-home fleet
COPY --from=sandbox /opt/fleet /opt/fleet
ENV PATH=/opt/fleet/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/fleet
EXPOSE 50057 9090
CMD ["fleet", "serve", "sandbox"]
