"""Prometheus metrics shared by every service (each service adds its own beside its code)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger("fleet.metrics")

GRPC_REQUESTS = Counter("fleet_grpc_requests_total", "gRPC requests handled", ["method", "code"])
GRPC_LATENCY = Histogram("fleet_grpc_request_seconds", "gRPC request latency", ["method"])
EVENTS_PUBLISHED = Counter("fleet_events_published_total", "Events published", ["event_type"])
EVENTS_HANDLED = Counter(
    "fleet_events_handled_total", "Events taken by a consumer", ["consumer", "outcome"]
)  # outcome: ok, duplicate, retry, dead_letter
DEAD_LETTERS = Counter("fleet_dead_letters_total", "Events sent to the dead-letter stream", ["consumer"])


def start_metrics_server(port: int) -> None:
    """Serve /metrics on `port` (0 = disabled)."""
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
