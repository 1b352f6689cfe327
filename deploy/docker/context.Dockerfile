# syntax=docker/dockerfile:1
# Context image: `fleet serve context`, gRPC on 50054 (GRPC_PORT), /metrics on 9090 (METRICS_PORT).
# Build from the repository root: `make images` (or docker build -f deploy/docker/context.Dockerfile .).
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

# ---- slim: the venv without Ray, kubernetes-validate and ruff (~370 MB the context service never imports or runs);
# the build and a unit test check that it imports without them
FROM builder AS slim
RUN /opt/fleet/bin/pip uninstall -y ray kubernetes-validate ruff \
    && /opt/fleet/bin/python -c "import services.cli, services.context.main"

# ---- runtime: non-root, only the venv -----------------------------------------------------------------
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 fleet && useradd --system --uid 10001 --gid 10001 --create-home fleet
COPY --from=slim /opt/fleet /opt/fleet
ENV PATH=/opt/fleet/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/fleet
EXPOSE 50054 9090
CMD ["fleet", "serve", "context"]
