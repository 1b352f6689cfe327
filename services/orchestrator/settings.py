"""Settings of the orchestrator (environment variables: the field names upper-cased)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.auth import ROLES
from services.common.settings import FleetSettings

DEFAULT_GRPC_PORT = 50055


class RoleCaps(BaseModel):
    """One role's spending caps (services/orchestrator/caps.py); 0 = unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deliberations_per_minute: int = Field(0, ge=0, le=100_000)
    tokens_per_day: int = Field(0, ge=0, le=10**12)


# Roles not named in SPENDING_CAPS keep these. Admins and services (the fleet's own callers) are not capped.
DEFAULT_SPENDING_CAPS = {
    "deliberator": RoleCaps(deliberations_per_minute=10, tokens_per_day=2_000_000),
    "product-owner": RoleCaps(deliberations_per_minute=10, tokens_per_day=2_000_000),
    "admin": RoleCaps(),
    "service": RoleCaps(),
}


class OrchestratorSettings(FleetSettings):
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="0 picks a free port")
    vllm_url: str = Field("http://127.0.0.1:8000", pattern=r"^https?://", description="vLLM server root")
    vllm_model: str = Field("Qwen/Qwen3-0.6B", min_length=1)
    vllm_timeout_seconds: float = Field(120.0, gt=0)
    vllm_max_retries: int = Field(3, ge=0, le=10)
    # The served model's context window (prompt + answer tokens) that every prompt is fitted to; 0 = ask vLLM
    # (the max_model_len of GET /v1/models).
    vllm_context_window: int = Field(0, ge=0, le=10_000_000, description="0 = the max_model_len vLLM reports")
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
    # Per caller (token subject), for Deliberate and StreamDeliberation: JSON {"<role>": {"deliberations_per_minute":
    # n, "tokens_per_day": n}} over DEFAULT_SPENDING_CAPS (what it leaves out keeps its default); a caller gets the
    # most generous cap among its roles (0 = unlimited). Ignored with authentication off.
    spending_caps: dict[str, RoleCaps] = Field(default_factory=lambda: dict(DEFAULT_SPENDING_CAPS))

    @field_validator("spending_caps", mode="before")
    @classmethod
    def _over_defaults(cls, caps: object) -> object:
        """A role named keeps the defaults of the caps it leaves out; roles not named keep theirs."""
        if not isinstance(caps, dict):
            return caps
        unknown = sorted(set(caps) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown roles {unknown} (known: {', '.join(ROLES)})")
        merged: dict[str, object] = {role: c.model_dump() for role, c in DEFAULT_SPENDING_CAPS.items()}
        for role, given in caps.items():
            base = merged.get(role, {})
            merged[role] = {**base, **given} if isinstance(given, dict) and isinstance(base, dict) else given
        return merged
