"""The sandbox's contract in Python: proto <-> `services.common.execution` (the one mapping, used by the sandbox
service's gRPC adapter and by every client) and `SandboxClient`, the gRPC client the deliberation's executing
checks and `fleet eval` use (`SANDBOX_ADDRESS`)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.rpc import error_details_pb2, status_pb2

from fleet.sandbox.v1 import sandbox_pb2 as pb
from fleet.sandbox.v1 import sandbox_pb2_grpc
from services.common.auth import BearerToken, channel
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.common.execution import Execution, ExecutionResult, Outcome, TestCase, TestCounts

log = logging.getLogger("fleet.sandbox.client")

SERVICE_NAME = "fleet.sandbox.v1.Sandbox"
_OUTCOME = {o: pb.Outcome.Value(f"OUTCOME_{o}") for o in Outcome}
_OUTCOME_BACK = {v: o for o, v in _OUTCOME.items()}


# --- mapping ------------------------------------------------------------------------------------------------------


def execution_to_proto(e: Execution) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(
        language=e.language,
        files=e.files,
        test_files=e.test_files,
        entrypoint=e.entrypoint,
        timeout_seconds=e.timeout_seconds,
        memory_mb=e.memory_mb,
    )


def execution_from_proto(m: pb.ExecuteRequest) -> Execution:
    """Not validated: the service calls `validate()` (defaults and bounds) on it."""
    return Execution(
        files=dict(m.files),
        test_files=dict(m.test_files),
        entrypoint=m.entrypoint,
        timeout_seconds=m.timeout_seconds,
        memory_mb=m.memory_mb,
        language=m.language,
    )


def result_to_proto(r: ExecutionResult) -> pb.ExecuteResponse:
    t = r.tests
    return pb.ExecuteResponse(
        outcome=_OUTCOME[r.outcome],
        exit_code=r.exit_code,
        tests=pb.TestCounts(
            passed=t.passed,
            failed=t.failed,
            errors=t.errors,
            skipped=t.skipped,
            cases=[pb.TestCase(name=c.name, outcome=c.outcome, message=c.message) for c in t.cases],
        ),
        stdout=r.stdout,
        stderr=r.stderr,
        truncated=r.truncated,
        duration_ms=r.duration_ms,
        reason=r.reason,
        isolation=r.isolation,
    )


def result_from_proto(m: pb.ExecuteResponse) -> ExecutionResult:
    t = m.tests
    return ExecutionResult(
        outcome=_OUTCOME_BACK.get(m.outcome, Outcome.ERROR),
        exit_code=m.exit_code,
        tests=TestCounts(
            t.passed,
            t.failed,
            t.errors,
            t.skipped,
            tuple(TestCase(c.name, c.outcome, c.message) for c in t.cases),  # type: ignore[arg-type]
        ),
        stdout=m.stdout,
        stderr=m.stderr,
        truncated=m.truncated,
        duration_ms=m.duration_ms,
        reason=m.reason,
        isolation=m.isolation,
    )


# --- the client ---------------------------------------------------------------------------------------------------


def _invalid(e: grpc.aio.AioRpcError) -> InvalidArgument:
    """The service's `InvalidArgument` again, naming the field it named (google.rpc.BadRequest in the details)."""
    raw = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        bad = error_details_pb2.BadRequest()
        for detail in status_pb2.Status.FromString(raw).details:
            if detail.Unpack(bad) and bad.field_violations:
                return InvalidArgument(bad.field_violations[0].field, bad.field_violations[0].description)
    return InvalidArgument("execution", e.details() or "refused")


class SandboxClient:
    """`Execute` over gRPC. A sandbox that cannot be reached is `Unavailable`; one whose slots and queue are full is
    `ResourceExhausted` (after `busy_retries` short waits); a refused request is `InvalidArgument`."""

    def __init__(
        self, address: str, *, margin_seconds: float = 10.0, busy_retries: int = 3, token: BearerToken | None = None
    ) -> None:
        self.address = address
        self.margin_seconds = margin_seconds  # on top of the execution's own limit (queueing, start-up)
        self.busy_retries = busy_retries
        self._channel = channel(address, token)
        self._stub = sandbox_pb2_grpc.SandboxStub(self._channel)

    async def execute(self, execution: Execution) -> ExecutionResult:
        request = execution_to_proto(execution)
        timeout = (execution.timeout_seconds or 60.0) + self.margin_seconds
        delay = 0.2
        for attempt in range(self.busy_retries + 1):
            try:
                return result_from_proto(await self._stub.Execute(request, timeout=timeout))
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < self.busy_retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise ResourceExhausted(f"sandbox at {self.address} is busy: {e.details()}") from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _invalid(e) from None
                raise Unavailable(f"sandbox at {self.address}: {code.name}: {e.details()}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
