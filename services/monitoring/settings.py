"""Settings of the monitoring service (environment variables: the field names upper-cased)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import FleetSettings

DEFAULT_MONITORING_PORT = 8080
HOST_PORT = r"^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):[0-9]{1,5}$"


class MonitoringSettings(FleetSettings):
    # One port for the page, the JSON API, the probes and /metrics (METRICS_PORT is not used here).
    monitoring_port: int = Field(DEFAULT_MONITORING_PORT, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    monitoring_host: str = Field("0.0.0.0", min_length=1, description="address the HTTP server binds")
    orchestrator_address: str = Field(
        "127.0.0.1:50055", pattern=HOST_PORT, description="host:port of the orchestrator's gRPC API; empty: none"
    )
    orchestrator_timeout_seconds: float = Field(3.0, gt=0, le=60, description="deadline of each orchestrator call")
    orchestrator_poll_seconds: float = Field(5.0, gt=0, le=300, description="how often the orchestrator is probed")
    # The live feed: the last N events of each subject family are kept and replayed to new browser clients.
    monitoring_history_size: int = Field(500, ge=10, le=100_000, description="events kept per subject family")
    monitoring_client_queue_size: int = Field(
        1000, ge=10, le=100_000, description="events queued per browser client before it is dropped"
    )
    monitoring_check_seconds: float = Field(2.0, gt=0, le=60, description="how often the feed's consumers are checked")
    monitoring_deliberations_kept: int = Field(500, ge=10, le=100_000, description="deliberation summaries kept")
