"""Settings from environment variables (pydantic-settings), validated at start with a clear message.

Variable names are the field names upper-cased (NATS_URL, VALKEY_URL, GRPC_PORT, ...): the same names in
code, manifests, the CLI and the tests. Each service extends `FleetSettings` (or, without the bus,
`ServiceSettings`) with what it alone reads.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(SystemExit):
    """Raised (and exits the process) when an environment variable is missing or wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ServiceSettings(BaseSettings):
    """What every service reads: logging and metrics (no endpoints, no credentials)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", validate_default=True)

    log_level: str = Field("INFO", pattern=r"^(?i:DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: str = Field("json", pattern=r"^(json|text)$")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it")
    # Who may call (services/common/auth.py). An empty issuer turns authentication off: development only.
    auth_issuer: str = Field("", description="OIDC issuer whose bearer tokens are accepted; empty: no authentication")
    auth_audience: str = Field("swe-ai-fleet", min_length=1, description="the `aud` every token must carry")
    auth_roles_claim: str = Field("roles", pattern=r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$")
    auth_leeway_seconds: float = Field(30.0, ge=0, le=600, description="clock skew allowed on exp/nbf")
    auth_jwks_file: str = Field(
        "",
        description="the issuer's JWKS read from this file instead of fetched (a service without egress: the sandbox)",
    )


class FleetSettings(ServiceSettings):
    """What every service on the event bus reads (all but the sandbox, which holds no credentials)."""

    nats_url: str = Field("nats://127.0.0.1:4222", pattern=r"^(nats|tls)://", description="NATS server URL(s)")
    valkey_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss|valkey|valkeys|unix)://")
    # Event delivery (every durable consumer): bounded redelivery with backoff, then the dead-letter stream.
    consumer_max_deliver: int = Field(5, ge=1, le=100)
    consumer_ack_wait_seconds: float = Field(30.0, gt=0)
    consumer_backoff_seconds: list[float] = Field(default_factory=lambda: [1.0, 5.0, 15.0, 30.0])
    idempotency_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)
    # Stream limits applied by `fleet streams init`.
    stream_max_age_days: float = Field(7.0, gt=0)
    stream_max_bytes: int = Field(1 << 30, gt=0)
    stream_replicas: int = Field(1, ge=1, le=5)
    # The service's own bearer token for its calls to the others (the sandbox calls no one: it holds none).
    auth_token_file: str = Field("", description="this service's bearer token (a file, re-read when it changes)")


S = TypeVar("S", bound=BaseSettings)

# Every Ray process (the head and every driver connecting to it) needs these: loopback-only
# clusters, and no token auth picked up by surprise from ~/.ray/auth_token. A deployment that uses token auth sets
# RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN) itself. A driver reads them when `ray` is first imported: a process
# that imported ray before they were set hangs in ray.init (waiting for the GCS's cluster id).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings from the environment; a bad variable raises SettingsError naming it."""
    try:
        return cls(**overrides)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            name = "_".join(str(p) for p in err["loc"][:1]).upper() or "(settings)"
            got = err.get("input")
            lines.append(f"  {name}: {err['msg']} (got {got!r})")
        raise SettingsError(f"invalid configuration for {cls.__name__}:\n" + "\n".join(lines)) from None


def env_vars(cls: type[BaseSettings]) -> list[str]:
    """The environment variables a settings class reads (for docs and the manifest cross-checks)."""
    return sorted(name.upper() for name in cls.model_fields)
