"""The ray-executor's gRPC API: request validation and proto <-> domain conversion (only here).

The deliberation's messages cross through the contract's one mapping (services/deliberation/proto.py).
"""

from __future__ import annotations

import re

import grpc

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.ray_executor.v1 import ray_executor_pb2 as pb
from fleet.ray_executor.v1 import ray_executor_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.events import ID_PATTERN, Role
from services.common.logging import correlation_id
from services.deliberation.domain import (
    MAX_AGENTS,
    AgentSpec,
    Council,
    Task,
)
from services.deliberation.proto import constraints_from_proto, result_to_proto
from services.ray_executor.application import DeliberationRequest, Job, RayExecutorService

_ID = re.compile(ID_PATTERN)


def _id(value: str, name: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument(name, "is required")
    if not _ID.match(value):
        raise InvalidArgument(name, f"must match {ID_PATTERN} (no dots or spaces), got {value!r}")
    return value


def _agent(a: dpb.Agent, name: str, default_role: Role) -> AgentSpec:
    agent_id = _id(a.agent_id, f"{name}.agent_id")
    role = Role.parse(a.role, f"{name}.role") if a.role.strip() else default_role
    if not 0.0 <= a.temperature <= 2.0:
        raise InvalidArgument(f"{name}.temperature", f"must be 0..2, got {a.temperature}")
    return AgentSpec(agent_id, role, a.persona, a.temperature, a.seed or None)


def request_to_domain(r: pb.ExecuteDeliberationRequest) -> DeliberationRequest:
    deliberation_id = _id(r.deliberation_id, "deliberation_id")
    task_id = r.task_id.strip()
    if not task_id:
        raise InvalidArgument("task_id", "is required")
    if not r.task_description.strip():
        raise InvalidArgument("task_description", "is required")
    role = Role.parse(r.role)
    if not r.agents:
        raise InvalidArgument("agents", "at least one agent is required")
    if len(r.agents) > MAX_AGENTS:
        raise InvalidArgument("agents", f"at most {MAX_AGENTS}, got {len(r.agents)}")
    agents = tuple(_agent(a, f"agents[{i}]", role) for i, a in enumerate(r.agents))
    if len({a.agent_id for a in agents}) != len(agents):
        raise InvalidArgument("agents", "agent ids must be unique")
    architect = _agent(r.architect, "architect", Role.ARCHITECT) if r.HasField("architect") else None
    if r.vllm_url and not r.vllm_url.startswith(("http://", "https://")):
        raise InvalidArgument("vllm_url", f"must be an http(s) URL, got {r.vllm_url!r}")
    constraints = constraints_from_proto(r.constraints, role)
    task = Task(
        task_id=task_id,
        description=r.task_description,
        role=role,
        constraints=constraints,
        story_id=r.story_id,
        context=r.context,
        context_version=r.context_version,
        base_code=r.base_code,
    )
    council = Council(r.council_id.strip() or f"council-{role.value.lower()}", role, agents)
    return DeliberationRequest(
        deliberation_id=deliberation_id,
        task=task,
        council=council,
        architect=architect,
        vllm_url=r.vllm_url,
        model=r.model,
        correlation_id=correlation_id.get(),
        publish_lifecycle=not r.caller_publishes_lifecycle,
    )


STATUS = {s.removeprefix("DELIBERATION_STATUS_"): v for s, v in dpb.DeliberationStatus.items()}


def _status(job: Job) -> int:
    return STATUS[str(job.status)]


class RayExecutorServicer(ray_executor_pb2_grpc.RayExecutorServiceServicer):
    def __init__(self, app: RayExecutorService) -> None:
        self.app = app

    async def ExecuteDeliberation(
        self, request: pb.ExecuteDeliberationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecuteDeliberationResponse:
        job = await self.app.execute(request_to_domain(request))
        return pb.ExecuteDeliberationResponse(deliberation_id=job.deliberation_id, status=_status(job))

    async def GetDeliberationStatus(
        self, request: pb.GetDeliberationStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliberationStatusResponse:
        job = self.app.job(_id(request.deliberation_id, "deliberation_id"))
        reply = pb.GetDeliberationStatusResponse(
            deliberation_id=job.deliberation_id, status=_status(job), error_message=job.error_message
        )
        if job.result is not None:
            reply.result.CopyFrom(result_to_proto(job.result))
        return reply

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        s = self.app.stats()
        return pb.GetStatusResponse(
            status="SERVING",
            total=s.total,
            active=s.active,
            completed=s.completed,
            failed=s.failed,
            average_duration_ms=s.average_duration_ms,
            uptime_seconds=s.uptime_seconds,
            ray_address=s.ray_address,
        )

    async def GetActiveJobs(
        self, request: pb.GetActiveJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetActiveJobsResponse:
        return pb.GetActiveJobsResponse(
            jobs=[
                pb.ActiveJob(
                    deliberation_id=j.deliberation_id,
                    task_id=j.request.task.task_id,
                    role=str(j.request.task.role),
                    phase=j.phase,
                    started_at=int(j.accepted_at * 1000),
                    agents=len(j.request.council.agents),
                )
                for j in self.app.active()
            ]
        )
