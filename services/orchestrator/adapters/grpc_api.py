"""The orchestrator's gRPC API: request validation, and the deliberation contract's one mapping
(services/deliberation/proto.py) for what goes in and out."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict

import grpc

from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common.auth import current_principal
from services.common.errors import InvalidArgument
from services.common.events import Role
from services.deliberation.domain import Council, ProgressEvent, Task
from services.deliberation.proto import agent_to_proto, constraints_from_proto, progress_to_proto, result_to_proto
from services.orchestrator.application import Orchestrator

USAGE_OTHERS = 20  # other callers' usage in GetStatus


def task_from_request(r: pb.DeliberateRequest) -> Task:
    if not r.task_id.strip():
        raise InvalidArgument("task_id", "is required")
    if not r.task_description.strip():
        raise InvalidArgument("task_description", "is required")
    if r.num_agents < 0:
        raise InvalidArgument("num_agents", f"must be >= 0, got {r.num_agents}")
    role = Role.parse(r.role)
    return Task(
        task_id=r.task_id.strip(),
        description=r.task_description,
        role=role,
        constraints=constraints_from_proto(r.constraints, role),
        story_id=r.story_id,
        base_code=r.base_code,
    )


def council_to_proto(c: Council, include_agents: bool = True) -> pb.Council:
    return pb.Council(
        council_id=c.council_id,
        role=str(c.role),
        num_agents=len(c.agents),
        agents=[agent_to_proto(a) for a in c.agents] if include_agents else [],
    )


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, app: Orchestrator) -> None:
        self.app = app

    async def Deliberate(
        self, request: pb.DeliberateRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeliberateResponse:
        result = await self.app.deliberate_for(
            current_principal.get(),
            task_from_request(request),
            num_agents=request.num_agents,
            phase=request.phase or "BUILD",
        )
        return pb.DeliberateResponse(result=result_to_proto(result))

    async def StreamDeliberation(self, request: pb.StreamDeliberationRequest, context: grpc.aio.ServicerContext):
        r = request.deliberation
        task = task_from_request(r)
        queue: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        run = asyncio.create_task(  # a refusal (spending caps) ends it before anything is streamed
            self.app.deliberate_for(
                current_principal.get(), task, num_agents=r.num_agents, phase=r.phase or "BUILD", on_progress=queue.put
            )
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
            yield pb.StreamDeliberationResponse(result=result_to_proto(result))
        finally:
            if not run.done():  # the client went away: the deliberation still ends and is recorded
                with contextlib.suppress(Exception):
                    await asyncio.shield(run)

    async def GetDeliberationResult(
        self, request: pb.GetDeliberationResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliberationResultResponse:
        result = await self.app.result_for_task(request.task_id.strip())
        return pb.GetDeliberationResultResponse(result=result_to_proto(result))

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
        # The caller's own usage; with the stats, the other callers of the last day too (bounded).
        usage = await self.app.usage(current_principal.get(), others=USAGE_OTHERS if request.include_stats else 0)
        reply.usage.extend(pb.CallerUsage(**asdict(u)) for u in usage)
        return reply
