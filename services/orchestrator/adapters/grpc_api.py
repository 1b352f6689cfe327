"""The orchestrator's gRPC API: request validation and proto <-> domain conversion (only here)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.events import Role
from services.deliberation.domain import (
    AgentSpec,
    Council,
    Criterion,
    DeliberationResult,
    ProgressEvent,
    Task,
    TaskConstraints,
)
from services.orchestrator.application import Orchestrator


def task_from_request(r: pb.DeliberateRequest) -> Task:
    if not r.task_id.strip():
        raise InvalidArgument("task_id", "is required")
    if not r.task_description.strip():
        raise InvalidArgument("task_description", "is required")
    if r.rounds < 0:
        raise InvalidArgument("rounds", f"must be >= 0, got {r.rounds}")
    if r.num_agents < 0:
        raise InvalidArgument("num_agents", f"must be >= 0, got {r.num_agents}")
    role = Role.parse(r.role)
    c = r.constraints
    for name in ("timeout_seconds", "max_tokens", "token_budget", "top_k"):
        if getattr(c, name) < 0:
            raise InvalidArgument(f"constraints.{name}", f"must be >= 0, got {getattr(c, name)}")
    defaults = TaskConstraints.for_role(role)
    constraints = TaskConstraints(
        rubric=tuple(Criterion(x.name, x.description) for x in c.rubric) or defaults.rubric,
        requirements=tuple(c.requirements),
        timeout_seconds=c.timeout_seconds or defaults.timeout_seconds,
        token_budget=c.token_budget or defaults.token_budget,
        max_tokens=c.max_tokens or defaults.max_tokens,
        rounds=r.rounds or defaults.rounds,
        top_k=c.top_k or defaults.top_k,
    )
    return Task(
        task_id=r.task_id.strip(),
        description=r.task_description,
        role=role,
        constraints=constraints,
        story_id=r.story_id,
    )


STATUS = {s.removeprefix("DELIBERATION_STATUS_"): v for s, v in dpb.DeliberationStatus.items()}
METHOD = {s.removeprefix("SELECTION_METHOD_"): v for s, v in dpb.SelectionMethod.items()}


def result_fields(r: DeliberationResult) -> dict[str, Any]:
    """The fields DeliberateResponse, GetDeliberationResultResponse and DeliberationResult share."""
    return {
        "task_id": r.task_id,
        "status": STATUS[str(r.status)],
        "results": [
            dpb.RankedProposal(
                rank=rp.rank,
                score=rp.score,
                peer_score=rp.peer_score,
                check_score=rp.check_score,
                proposal=dpb.Proposal(
                    proposal_id=rp.proposal.proposal_id,
                    author_id=rp.proposal.author_id,
                    author_role=str(rp.proposal.author_role),
                    content=rp.proposal.content,
                    revisions=[
                        dpb.Revision(number=v.number, content=v.content, reason=v.reason) for v in rp.proposal.revisions
                    ],
                ),
                checks=[
                    dpb.CheckResult(
                        name=ch.name,
                        passed=ch.passed,
                        applicable=ch.applicable,
                        detail=ch.detail,
                        findings=[
                            dpb.Finding(message=f.message, severity=f.severity, line=f.line or 0, block=f.block or 0)
                            for f in ch.findings
                        ],
                    )
                    for ch in rp.checks
                ],
                votes=[
                    dpb.Vote(
                        voter_id=v.voter_id,
                        proposal_id=v.proposal_id,
                        position=v.position,
                        scores=dict(v.scores),
                        reason=v.reason,
                    )
                    for v in rp.votes
                ],
            )
            for rp in r.results
        ],
        "winner_id": r.winner_id,
        "duration_ms": int(r.duration_ms),
        "deliberation_id": r.deliberation_id,
        "role": str(r.role),
        "council_id": r.council_id,
        "selection": dpb.Selection(
            winner_id=r.selection.winner_id,
            method=METHOD[str(r.selection.method)],
            rationale=r.selection.rationale,
            selected_by=r.selection.selected_by,
        )
        if r.selection
        else None,
        "critiques": [
            dpb.Critique(
                round=c.round,
                proposal_id=c.proposal_id,
                critic_id=c.critic_id,
                author_id=c.author_id,
                verdict=c.verdict,
                summary=c.summary,
                issues=list(c.issues),
            )
            for c in r.critiques
        ],
        "usage": [
            dpb.TokenUsage(
                agent_id=u.agent_id,
                phase=str(u.phase),
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
            )
            for u in r.usage
        ],
        "phase_durations": [dpb.PhaseDuration(phase=str(p), duration_ms=ms) for p, ms in r.phase_durations_ms.items()],
        "failures": [dpb.AgentFailure(agent_id=f.agent_id, phase=str(f.phase), error=f.error) for f in r.failures],
        "error_message": r.error_message,
        "context_version": r.context_version,
        "context_note": r.context_note,
        "total_tokens": r.total_tokens,
        "executor": r.executor,
        "story_id": r.story_id,
    }


def agent_to_proto(a: AgentSpec) -> dpb.Agent:
    return dpb.Agent(agent_id=a.agent_id, role=str(a.role), persona=a.persona, temperature=a.temperature, seed=a.seed)


def council_to_proto(c: Council, include_agents: bool = True) -> pb.Council:
    return pb.Council(
        council_id=c.council_id,
        role=str(c.role),
        num_agents=len(c.agents),
        agents=[agent_to_proto(a) for a in c.agents] if include_agents else [],
    )


def progress_to_proto(p: ProgressEvent) -> dpb.ProgressEvent:
    return dpb.ProgressEvent(
        deliberation_id=p.deliberation_id,
        task_id=p.task_id,
        role=str(p.role),
        phase=str(p.phase or ""),
        kind=p.kind,
        agent_id=p.agent_id or "",
        detail=p.detail,
    )


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, app: Orchestrator) -> None:
        self.app = app

    async def Deliberate(
        self, request: pb.DeliberateRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeliberateResponse:
        task = task_from_request(request)
        result = await self.app.deliberate(task, num_agents=request.num_agents, phase=request.phase or "BUILD")
        return pb.DeliberateResponse(**result_fields(result))

    async def StreamDeliberation(self, request: pb.StreamDeliberationRequest, context: grpc.aio.ServicerContext):
        r = request.deliberation
        task = task_from_request(r)
        queue: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        run = asyncio.create_task(
            self.app.deliberate(task, num_agents=r.num_agents, phase=r.phase or "BUILD", on_progress=queue.put)
        )
        try:
            while not (run.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield pb.StreamDeliberationResponse(progress=progress_to_proto(getter.result()))
                else:
                    getter.cancel()
            result = run.result()
            yield pb.StreamDeliberationResponse(result=dpb.DeliberationResult(**result_fields(result)))
        finally:
            if not run.done():  # the client went away: the deliberation still ends and is recorded
                with contextlib.suppress(Exception):
                    await asyncio.shield(run)

    async def GetDeliberationResult(
        self, request: pb.GetDeliberationResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliberationResultResponse:
        result = await self.app.result_for_task(request.task_id.strip())
        return pb.GetDeliberationResultResponse(**result_fields(result))

    async def CreateCouncil(
        self, request: pb.CreateCouncilRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCouncilResponse:
        if request.num_agents < 0:
            raise InvalidArgument("num_agents", f"must be >= 0, got {request.num_agents}")
        council = await self.app.create_council(request.role, request.num_agents)
        return pb.CreateCouncilResponse(
            council_id=council.council_id,
            agent_ids=[a.agent_id for a in council.agents],
            council=council_to_proto(council),
        )

    async def ListCouncils(
        self, request: pb.ListCouncilsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCouncilsResponse:
        councils = await self.app.list_councils(request.role_filter)
        return pb.ListCouncilsResponse(councils=[council_to_proto(c, request.include_agents) for c in councils])

    async def DeleteCouncil(
        self, request: pb.DeleteCouncilRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCouncilResponse:
        council = await self.app.delete_council(request.role)
        return pb.DeleteCouncilResponse(council_id=council.council_id, agents_removed=len(council.agents))

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        s = await self.app.status()
        reply = pb.GetStatusResponse(
            status=(s.degraded and f"DEGRADED: {s.degraded}") or "SERVING", uptime_seconds=s.uptime_seconds
        )
        if request.include_stats:
            reply.stats.CopyFrom(
                pb.Stats(
                    total_deliberations=sum(v for k, v in s.by_status.items() if k != "IN_PROGRESS"),
                    deliberations_by_status=s.by_status,
                    average_duration_ms=s.average_duration_ms,
                    active_councils=s.active_councils,
                    deliberations_by_role=s.by_role,
                    in_flight=s.in_flight,
                    executor=s.executor,
                )
            )
        return reply
