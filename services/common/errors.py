"""Domain errors shared by every service.

Each error carries the gRPC status code it maps to; the gRPC bootstrap's interceptor turns them into
statuses with details, so a known failure never reaches a client as a bare INTERNAL.
"""

from __future__ import annotations

import grpc


class FleetError(Exception):
    """Base of every known failure. `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).__name__


class InvalidArgument(FleetError):
    """Bad input. `field` names the offending field (dotted path) so the caller can fix it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFound(FleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(FleetError):
    """A dependency (NATS, Valkey, the graph, vLLM, another service) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(FleetError):
    """A budget (tokens, queue) is used up."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
