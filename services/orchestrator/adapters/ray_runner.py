"""The orchestrator's `Runner` on the ray-executor service (EXECUTOR=ray): the same engine, agent calls on Ray.

`run()` hands the deliberation over with ExecuteDeliberation (idempotent on the deliberation id, so a retried
call starts nothing new), then waits for its end by polling GetDeliberationStatus: every 50 ms, slowing to 1 s,
and back to 50 ms whenever one of its agents answers (agent.response.* on NATS, which also feeds `on_progress`
so StreamDeliberation shows the agents' progress). The result comes back as `fleet.deliberation.v1.
DeliberationResult` and is read into the domain's `DeliberationResult` by the contract's one mapping.

The orchestrator publishes the deliberation's lifecycle events itself (it knows the plan), so it tells the
ray-executor not to (`caller_publishes_lifecycle` in ExecuteDeliberationRequest).

A ray-executor running as many deliberations as it may (RESOURCE_EXHAUSTED) is asked again until it takes this
one, for up to the task's timeout. Never a hang: the wait is bounded by the task's deadline plus a margin; a
ray-executor that forgot the deliberation (restarted), stays full or unreachable past those bounds gives a FAILED
result saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc

from fleet.ray_executor.v1 import ray_executor_pb2 as pb
from fleet.ray_executor.v1 import ray_executor_pb2_grpc
from services.common import events as ev
from services.common.auth import BearerToken, channel
from services.common.errors import Unavailable
from services.common.events import DeliberationStatus
from services.common.grpc_server import CORRELATION_HEADER
from services.common.logging import correlation_id
from services.common.settings import SettingsError
from services.deliberation.domain import AgentSpec, Council, DeliberationResult, Phase, ProgressEvent, Task
from services.deliberation.proto import agent_to_proto, constraints_to_proto, result_from_proto

log = logging.getLogger("fleet.orchestrator.ray")

AGENT_RESPONSES = ev.STREAMS[ev.Streams.AGENT_RESPONSES].subjects[0]  # every agent.response.* subject


class RayExecutorRunner:
    """A Runner (services/orchestrator/application.py) on the ray-executor at `address` (host:port)."""

    name = "ray"
    ATTEMPTS = 3

    def __init__(
        self,
        address: str,
        bus: Any = None,
        *,
        rpc_timeout: float = 10.0,
        poll_min: float = 0.05,
        poll_max: float = 1.0,
        margin_seconds: float = 30.0,
        token: BearerToken | None = None,
    ) -> None:
        if not address:
            raise SettingsError("RAY_EXECUTOR_ADDRESS (host:port of the ray-executor) is required when EXECUTOR=ray")
        self.address = address
        self.bus = bus
        self.rpc_timeout = rpc_timeout
        self.poll_min, self.poll_max = poll_min, poll_max
        self.margin_seconds = margin_seconds
        self.token = token

    async def run(
        self, task: Task, council: Council, architect: AgentSpec | None, deliberation_id: str, on_progress: Any
    ) -> DeliberationResult:
        metadata = ((CORRELATION_HEADER, correlation_id.get() or deliberation_id),)
        request = pb.ExecuteDeliberationRequest(
            deliberation_id=deliberation_id,
            task_id=task.task_id,
            task_description=task.description,
            role=str(task.role),
            constraints=constraints_to_proto(task.constraints),
            agents=[agent_to_proto(a) for a in council.agents],
            architect=agent_to_proto(architect) if architect else None,
            story_id=task.story_id,
            context=task.context,
            context_version=task.context_version,
            base_code=task.base_code,
            council_id=council.council_id,
            caller_publishes_lifecycle=True,
        )
        wake = asyncio.Event()
        events = await self._follow(deliberation_id, task, wake, on_progress)
        try:
            async with channel(self.address, self.token) as rpc:
                stub = ray_executor_pb2_grpc.RayExecutorServiceStub(rpc)
                refusal = await self._hand_over(stub, request, metadata, task.constraints.timeout_seconds)
                if refusal:
                    return self._failed(task, council, deliberation_id, refusal)
                return await self._wait(stub, task, council, deliberation_id, wake, metadata)
        finally:
            if events is not None:
                with contextlib.suppress(Exception):
                    await events.unsubscribe()

    async def _hand_over(self, stub: Any, request: Any, metadata: Any, patience: float) -> str:
        """ExecuteDeliberation until accepted (idempotent on the deliberation id: safe to repeat); "" when accepted,
        else why not. A ray-executor that is unreachable gets ATTEMPTS tries; one that is full (RESOURCE_EXHAUSTED:
        its MAX_ACTIVE_DELIBERATIONS are running) is asked again, backing off to 2 s, for up to the deliberation's
        own timeout: a burst of deliberations queues here instead of failing (bench-scale, EXECUTOR=ray)."""
        give_up = time.monotonic() + patience
        unreachable, wait = 0, 0.1
        while True:
            try:
                await stub.ExecuteDeliberation(request, timeout=self.rpc_timeout, metadata=metadata)
                return ""
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if time.monotonic() + wait > give_up:
                        return f"full for {patience:g}s ({e.details()})"
                    log.info("ray-executor full, %s waits %.1fs: %s", request.deliberation_id, wait, e.details())
                    await asyncio.sleep(wait)
                    wait = min(2.0, wait * 1.5)
                    continue
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                unreachable += 1
                if unreachable == self.ATTEMPTS:
                    raise Unavailable(f"ray-executor at {self.address} unreachable: {e.details()}") from e
                await asyncio.sleep(0.5 * unreachable)

    async def _wait(
        self, stub: Any, task: Task, council: Council, deliberation_id: str, wake: asyncio.Event, metadata: Any
    ) -> DeliberationResult:
        give_up = time.monotonic() + task.constraints.timeout_seconds + self.margin_seconds
        status_request = pb.GetDeliberationStatusRequest(deliberation_id=deliberation_id)
        interval, last_error = self.poll_min, ""
        while time.monotonic() < give_up:
            try:
                reply = await stub.GetDeliberationStatus(status_request, timeout=self.rpc_timeout, metadata=metadata)
                if reply.HasField("result") and (result := result_from_proto(reply.result)).status.ended:
                    return result
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return self._failed(task, council, deliberation_id, f"the ray-executor lost it: {e.details()}")
                last_error = f"{e.code().name}: {e.details()}"
                log.warning("polling %s on the ray-executor failed: %s", deliberation_id, last_error)
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            interval = self.poll_min if wake.is_set() else min(self.poll_max, interval * 1.5)
        why = f"no end from the ray-executor within the deadline plus {self.margin_seconds:g}s"
        return self._failed(task, council, deliberation_id, why + (f" (last error {last_error})" if last_error else ""))

    async def _follow(self, deliberation_id: str, task: Task, wake: asyncio.Event, on_progress: Any) -> Any:
        """Subscribe to the deliberation's agent answers: they wake the poll and become progress events."""
        if self.bus is None:
            return None
        marker = f'"{deliberation_id}"'.encode()

        async def seen(msg: Any) -> None:
            if marker not in msg.data:  # another deliberation's agent: skip without parsing
                return
            try:
                event = ev.parse_event(msg.data, msg.subject)
            except ev.InvalidEvent:
                return
            p = event.payload
            if getattr(p, "deliberation_id", None) != deliberation_id:
                return
            wake.set()
            failed = isinstance(p, ev.AgentResponseFailed)
            progress = ProgressEvent(
                deliberation_id,
                task.task_id,
                task.role,
                Phase(p.phase) if p.phase in Phase.__members__ else None,
                "agent_failed" if failed else "agent_completed",
                p.agent_id,
                p.error if failed else f"{p.prompt_tokens + p.completion_tokens} tokens",
                0 if failed else p.completion_tokens,
            )
            with contextlib.suppress(Exception):
                await on_progress(progress)

        try:
            return await self.bus.nc.subscribe(AGENT_RESPONSES, cb=seen)
        except Exception as e:  # progress is a bonus; the poll alone finds the end
            log.warning("no agent progress for %s: %s", deliberation_id, e)
            return None

    @staticmethod
    def _failed(task: Task, council: Council, deliberation_id: str, why: str) -> DeliberationResult:
        return replace(
            DeliberationResult.pending(deliberation_id, task, council.council_id, "ray"),
            status=DeliberationStatus.FAILED,
            error_message=f"ray-executor: {why}",
            finished_at=datetime.now(UTC),
        )
