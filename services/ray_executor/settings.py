"""Settings of the ray-executor (environment variables: the field names upper-cased)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import FleetSettings

DEFAULT_GRPC_PORT = 50056


class RayExecutorSettings(FleetSettings):
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="0 picks a free port (tests)")
    # The Ray cluster: host:port of a head's GCS (KubeRay in Kubernetes, `ray start --head` on loopback);
    # empty starts a local Ray inside this process with RAY_LOCAL_NUM_CPUS logical CPUs.
    ray_address: str = Field("", pattern=r"^$|^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+$")
    ray_namespace: str = Field("fleet", min_length=1)
    ray_local_num_cpus: int = Field(2, ge=1, le=1024)
    # Agent calls run on a pool of Ray actors (executor.py says why not one task per call). A call waits on vLLM:
    # a fraction of a CPU per actor, many calls at once in each.
    ray_agent_workers: int = Field(4, ge=1, le=1024, description="actors in the pool")
    ray_num_cpus_per_worker: float = Field(0.25, gt=0, le=64)
    ray_calls_per_worker: int = Field(32, ge=1, le=1000, description="concurrent calls per actor")
    # Ray restarts a dead actor and re-runs its calls (system failures; LLM errors are answers, never retried here).
    ray_max_retries: int = Field(3, ge=0, le=20)
    ray_start_timeout_seconds: float = Field(120.0, gt=0, description="connect + the pool's actors running")
    ray_log_to_driver: bool = False
    # The default vLLM endpoint and model (a request may name its own).
    vllm_url: str = Field("http://127.0.0.1:8000", pattern=r"^https?://", description="vLLM server root")
    vllm_model: str = Field("Qwen/Qwen3-0.6B", min_length=1)
    vllm_timeout_seconds: float = Field(120.0, gt=0)
    vllm_max_retries: int = Field(3, ge=0, le=10)
    # The default model's context window (prompt + answer tokens) that every prompt is fitted to; 0 = ask vLLM
    # (the max_model_len of GET /v1/models). A request naming another vLLM or model always asks it.
    vllm_context_window: int = Field(0, ge=0, le=10_000_000, description="0 = the max_model_len vLLM reports")
    # One agent call (all its HTTP attempts) is bounded by this and by the deliberation's deadline.
    agent_timeout_seconds: float = Field(180.0, gt=0)
    # Token streaming: vllm.streaming.<deliberation>.<agent> chunks published by the Ray workers.
    token_streaming: bool = True
    token_batch_ms: float = Field(100.0, ge=5, le=5000)
    # The sandbox service (host:port) that runs each proposal's code against the tests (CHECK); empty: code is not
    # executed, and no deliberation of a code task is verified.
    sandbox_address: str = Field("", description="host:port of the sandbox service")
    sandbox_timeout_seconds: float = Field(10.0, gt=0, le=60, description="wall-clock limit of one execution")
    max_active_deliberations: int = Field(64, ge=1, le=10_000)
    finished_jobs_kept: int = Field(1000, ge=1, le=1_000_000)
