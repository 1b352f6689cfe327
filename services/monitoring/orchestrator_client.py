"""The orchestrator's gRPC API as the dashboard reads it: councils, deliberation results, status.

Proto messages become the JSON models below here and nowhere else. The client remembers whether the
orchestrator answered last time (the page's banner) and fails fast while it is down: short deadlines and a
short reconnect backoff, so the page recovers within seconds of the orchestrator's return.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, Field, field_validator

from fleet.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.common.errors import FleetError, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("fleet.monitoring.orchestrator")

# Codes meaning "the orchestrator cannot answer now" (as opposed to "it answered: no").
DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class OrchestratorUnavailable(Unavailable):
    dependency = "orchestrator"


# --- JSON models (mirroring specs/fleet/orchestrator/v1 and specs/fleet/deliberation/v1) -------------------------


def _strip(value: Any, prefix: str) -> Any:
    return value.removeprefix(prefix) if isinstance(value, str) else value


class Agent(BaseModel):
    agent_id: str = ""
    role: str = ""
    persona: str = ""
    temperature: float = 0.0
    seed: int = 0


class Council(BaseModel):
    council_id: str = ""
    role: str = ""
    num_agents: int = 0
    agents: list[Agent] = Field(default_factory=list)


class Councils(BaseModel):
    councils: list[Council]


class Stats(BaseModel):
    total_deliberations: int = 0
    deliberations_by_status: dict[str, int] = Field(default_factory=dict)
    average_duration_ms: float = 0.0
    active_councils: int = 0
    deliberations_by_role: dict[str, int] = Field(default_factory=dict)
    in_flight: int = 0
    executor: str = ""


class OrchestratorStatus(BaseModel):
    status: str = Field("", description='"SERVING" or "DEGRADED: <why>"')
    uptime_seconds: int = 0
    stats: Stats | None = None


class Revision(BaseModel):
    number: int = 0
    content: str = ""
    reason: str = ""


class Proposal(BaseModel):
    proposal_id: str = ""
    author_id: str = ""
    author_role: str = ""
    content: str = ""
    revisions: list[Revision] = Field(default_factory=list)


class Finding(BaseModel):
    message: str = ""
    severity: str = ""
    line: int = 0
    block: int = 0


class CheckResult(BaseModel):
    name: str = ""
    passed: bool = False
    applicable: bool = False
    findings: list[Finding] = Field(default_factory=list)
    detail: str = ""


class Vote(BaseModel):
    voter_id: str = ""
    proposal_id: str = ""
    position: int = 0
    scores: dict[str, int] = Field(default_factory=dict)
    reason: str = ""


class RankedProposal(BaseModel):
    rank: int = 0
    score: float = 0.0
    proposal: Proposal = Field(default_factory=Proposal)
    checks: list[CheckResult] = Field(default_factory=list)
    votes: list[Vote] = Field(default_factory=list)
    peer_score: float = 0.0
    check_score: float = 0.0


class Selection(BaseModel):
    winner_id: str = ""
    method: str = Field("", description="ARCHITECT, FALLBACK or UNKNOWN")
    rationale: str = ""
    selected_by: str = ""

    @field_validator("method", mode="before")
    @classmethod
    def _short_method(cls, value: Any) -> Any:
        return _strip(value, "SELECTION_METHOD_")


class Critique(BaseModel):
    round: int = 0
    proposal_id: str = ""
    critic_id: str = ""
    author_id: str = ""
    verdict: str = ""
    summary: str = ""
    issues: list[str] = Field(default_factory=list)


class TokenUsage(BaseModel):
    agent_id: str = ""
    phase: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PhaseDuration(BaseModel):
    phase: str = ""
    duration_ms: float = 0.0


class AgentFailure(BaseModel):
    agent_id: str = ""
    phase: str = ""
    error: str = ""


class DeliberationResult(BaseModel):
    task_id: str = ""
    status: str = Field("", description="UNKNOWN, PENDING, IN_PROGRESS, COMPLETED, FAILED or TIMEOUT")
    results: list[RankedProposal] = Field(default_factory=list, description="ranked proposals, best first")
    winner_id: str = ""
    duration_ms: int = 0
    deliberation_id: str = ""
    role: str = ""
    council_id: str = ""
    selection: Selection | None = None
    critiques: list[Critique] = Field(default_factory=list)
    usage: list[TokenUsage] = Field(default_factory=list)
    phase_durations: list[PhaseDuration] = Field(default_factory=list)
    failures: list[AgentFailure] = Field(default_factory=list)
    error_message: str = ""
    context_version: str = ""
    context_note: str = Field("", description="why the council had no context from the context service, if it had none")
    total_tokens: int = 0
    executor: str = ""
    story_id: str = ""

    @field_validator("status", mode="before")
    @classmethod
    def _short_status(cls, value: Any) -> Any:
        return _strip(value, "DELIBERATION_STATUS_")


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


# --- the client ---------------------------------------------------------------------------------------------------


class OrchestratorClient:
    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.ok = False
        self.detail = "not contacted yet" if address else "not configured (ORCHESTRATOR_ADDRESS is empty)"
        self.since = datetime.now(UTC)
        self.last_status: OrchestratorStatus | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: orchestrator_pb2_grpc.OrchestratorServiceStub | None = None

    def _connect(self) -> orchestrator_pb2_grpc.OrchestratorServiceStub | None:
        """The stub, its channel made on first use: a grpc.aio channel belongs to the loop it was made in."""
        if self._stub is None and self.address:
            self._channel = grpc.aio.insecure_channel(
                self.address,
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 300),
                    ("grpc.min_reconnect_backoff_ms", 300),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
            self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)
        return self._stub

    def _mark(self, ok: bool, detail: str) -> None:
        if ok != self.ok:
            self.since = datetime.now(UTC)
            log.log(logging.INFO if ok else logging.WARNING, "orchestrator at %s: %s", self.address, detail)
        self.ok, self.detail = ok, detail

    def unavailable_message(self) -> str:
        if not self.address:
            return f"orchestrator {self.detail}"
        return f"orchestrator unavailable at {self.address}: {self.detail}"

    async def _call(self, method: str, request: Message) -> Any:
        stub = self._connect()
        if stub is None:
            raise OrchestratorUnavailable(self.unavailable_message())
        try:
            response = await getattr(stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            if code in DOWN:
                self._mark(False, f"{code.name} {details}".strip())
                raise OrchestratorUnavailable(self.unavailable_message()) from None
            self._mark(True, "serving")
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(details or "not found") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument("request", details) from None
            raise FleetError(f"orchestrator {method} failed: {code.name} {details}".strip()) from None
        self._mark(True, "serving")
        return response

    async def councils(self, role: str = "") -> Councils:
        req = orchestrator_pb2.ListCouncilsRequest(role_filter=role, include_agents=True)
        return Councils.model_validate(to_dict(await self._call("ListCouncils", req)))

    async def deliberation(self, task_id: str) -> DeliberationResult:
        req = orchestrator_pb2.GetDeliberationResultRequest(task_id=task_id)
        return DeliberationResult.model_validate(to_dict(await self._call("GetDeliberationResult", req)))

    async def status(self) -> OrchestratorStatus:
        resp = await self._call("GetStatus", orchestrator_pb2.GetStatusRequest(include_stats=True))
        self.last_status = OrchestratorStatus.model_validate(to_dict(resp))
        return self.last_status

    async def poll(self, interval: float) -> None:
        """Probe the orchestrator forever, so the page's banner knows without anyone asking."""
        while True:
            try:
                await self.status()
            except FleetError:
                pass  # recorded by _call: the banner shows it
            except Exception as e:  # a bug, not the orchestrator: say so, keep probing
                self._mark(False, f"probe failed: {type(e).__name__} {e}")
                log.exception("orchestrator probe failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
