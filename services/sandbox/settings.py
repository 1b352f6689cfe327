"""Settings of the sandbox (environment variables: the field names upper-cased).

Only logging, metrics and its own knobs: the sandbox reads no NATS, Valkey, graph or LLM settings and holds no
credentials, so none can leak into what it runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import ServiceSettings

DEFAULT_GRPC_PORT = 50057


class SandboxSettings(ServiceSettings):
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="0 picks a free port (tests)")
    # bwrap: every execution in bubblewrap namespaces (no network, read-only system, private tmpfs work dir).
    # pod: no bwrap, for Kubernetes pods where it cannot create namespaces; the pod itself is the boundary.
    sandbox_isolation: Literal["bwrap", "pod"] = "bwrap"
    sandbox_concurrency: int = Field(
        3, ge=1, le=64, description="executions running at once (slots): 3 runs a council's CHECK at once"
    )
    sandbox_queue: int = Field(32, ge=0, le=10_000, description="executions waiting for a slot; more are refused")
    sandbox_max_timeout_seconds: float = Field(60.0, gt=0, le=600, description="the most a request may ask for")
    # The most address space one execution may ask for: concurrency x this must fit the pod's memory limit (a
    # container over its limit is killed whole, the service with it).
    sandbox_max_memory_mb: int = Field(1024, ge=64, le=4096, description="the most memory_mb a request may ask for")
    # The interpreter that runs the code inside; "" tries this service's own interpreter, /usr/local/bin/python3
    # and /usr/bin/python3 and keeps the first that runs a passing pytest test in the sandbox at start.
    sandbox_python: str = Field("", pattern=r"^$|^/")
    # Run as root, the service gives each slot its own uid (this + the slot's index), so the process limit
    # counts that execution's processes alone (root itself is exempt from it).
    sandbox_uid_base: int = Field(200_000, ge=1000, le=2**31 - 1000)
