"""Settings of the orchestrator (environment variables: the field names upper-cased)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import FleetSettings

DEFAULT_GRPC_PORT = 50055


class OrchestratorSettings(FleetSettings):
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="0 picks a free port")
    vllm_url: str = Field("http://127.0.0.1:8000", pattern=r"^https?://", description="vLLM server root")
    vllm_model: str = Field("Qwen/Qwen3-0.6B", min_length=1)
    vllm_timeout_seconds: float = Field(120.0, gt=0)
    vllm_max_retries: int = Field(3, ge=0, le=10)
    # Where agent calls run: in this process (asyncio) or on Ray through the ray-executor service.
    executor: Literal["in-process", "ray"] = "in-process"
    ray_executor_address: str = Field("", description="host:port of the ray-executor (EXECUTOR=ray)")
    context_address: str = Field("", description="host:port of the context service; empty: no context")
    context_token_budget: int = Field(2048, ge=256)
    # The sandbox service (host:port) that runs each proposal's code against the tests (CHECK); empty: code is not
    # executed, and no deliberation of a code task is verified.
    sandbox_address: str = Field("", description="host:port of the sandbox service")
    sandbox_timeout_seconds: float = Field(10.0, gt=0, le=60, description="wall-clock limit of one execution")
    # Plan approvals handled at once (each runs its roles' deliberations concurrently).
    approval_concurrency: int = Field(4, ge=1, le=64)
    default_num_agents: int = Field(3, ge=1, le=10)
    # Defaults for a task's constraints when a request leaves them at zero.
    deliberation_timeout_seconds: float = Field(600.0, gt=0)
    deliberation_token_budget: int = Field(200_000, ge=0)
    max_tokens_per_call: int = Field(512, ge=16)
