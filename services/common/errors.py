"""Domain errors shared by every service (no transport here: the domains that raise them import no I/O).

Each error names the kind of failure as the gRPC status it maps to (`code`, e.g. "INVALID_ARGUMENT"); the gRPC
bootstrap's interceptor (services/common/grpc_server.py) turns them into statuses with details, so a known failure
never reaches a client as a bare INTERNAL, and the HTTP API maps the same kinds to its problems.
"""

from __future__ import annotations

from collections.abc import Mapping


class FleetError(Exception):
    """Base of every known failure. `code` is the gRPC status it maps to; `reason` and `metadata` go in its
    google.rpc.ErrorInfo."""

    code: str = "INTERNAL"  # the grpc.StatusCode name

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).__name__
        self.metadata = dict(metadata or {})


class InvalidArgument(FleetError):
    """Bad input. `field` names the offending field (dotted path) so the caller can fix it."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFound(FleetError):
    code = "NOT_FOUND"


class AlreadyExists(FleetError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(FleetError):
    code = "FAILED_PRECONDITION"


class Unavailable(FleetError):
    """A dependency (NATS, Valkey, the graph, vLLM, another service) cannot be reached."""

    code = "UNAVAILABLE"


class DeadlineExceeded(FleetError):
    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(FleetError):
    """A budget (tokens, queue) is used up."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(FleetError):
    """No credential, or one that does not verify (missing, malformed, expired, wrong issuer or audience)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(FleetError):
    """An authenticated caller without the role the method needs."""

    code = "PERMISSION_DENIED"
