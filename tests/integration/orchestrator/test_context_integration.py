"""The orchestrator asks the real context service for the story's context before a deliberation."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import grpc
import httpx
import pytest

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.context.main import start as start_context
from services.local.processes import free_port
from services.orchestrator.main import start as start_orchestrator

pytestmark = pytest.mark.integration


async def result_of(stub, task_id: str, timeout: float = 60.0) -> pb.GetDeliberationResultResponse:
    """GetDeliberationResult once the deliberation of `task_id` has ended."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                reply = (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))).result
                if reply.status not in (dpb.DELIBERATION_STATUS_PENDING, dpb.DELIBERATION_STATUS_IN_PROGRESS):
                    return reply
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            await asyncio.sleep(0.1)


async def serve(orch_settings, **over):
    running = await start_orchestrator(orch_settings.model_copy(update=over), host="127.0.0.1")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    await stub.CreateCouncil(pb.CreateCouncilRequest(role="DEV", num_agents=3))
    await stub.CreateCouncil(pb.CreateCouncilRequest(role="ARCHITECT", num_agents=3))
    return running, channel, stub


async def test_an_approved_story_s_deliberation_gets_its_context(orch_settings, ctx_settings, bus, llm_server):
    context = await start_context(ctx_settings, host="127.0.0.1")
    running, channel, stub = await serve(orch_settings, context_address=f"127.0.0.1:{context.port}")
    try:
        await llm_server.acontrol(reset=True)
        story, title = f"S-{uuid.uuid4().hex[:8]}", f"Ledger export {uuid.uuid4().hex[:6]}"
        approval = ev.PlanApproved(
            story_id=story,
            plan_id="P-1",
            approved_by="po@example.com",
            timestamp=datetime.now(UTC),
            title=title,
            roles=[ev.Role.DEV],
            tasks=[ev.PlanTask(task_id=f"{story}-api", description="Export the ledger as CSV", role=ev.Role.DEV)],
        )
        # Both services consume this one event; the orchestrator may ask before the context service has the story.
        await bus.publish(ev.make_event(approval, ev.PO_UI))
        reply = await result_of(stub, f"{story}-api")
        assert reply.status == dpb.DELIBERATION_STATUS_COMPLETED, reply.error_message
        assert reply.story_id == story
        assert len(reply.context_version) >= 8 and reply.context_note == ""
        async with httpx.AsyncClient() as client:
            sent = (await client.get(f"{llm_server.url}/control/requests")).json()["requests"]
        prompts = [str(r["body"]["messages"]) for r in sent]
        assert prompts and all(title in p for p in prompts)  # the context is in every agent's shared prefix
    finally:
        await channel.close()
        await running.stop(0.5)
        await context.stop(0.5)


async def test_without_a_reachable_context_service_it_deliberates_on_the_task_and_says_so(orch_settings, bus):
    running, channel, stub = await serve(orch_settings, context_address=f"127.0.0.1:{free_port()}")
    try:
        request = pb.DeliberateRequest(
            task_id="T-ctx-down",
            task_description="Write a function that validates IBANs.",
            role="DEV",
            story_id="S-unknown",
            constraints=dpb.Constraints(timeout_seconds=60),
        )
        reply = (await stub.Deliberate(request)).result
        assert reply.status == dpb.DELIBERATION_STATUS_COMPLETED, reply.error_message
        assert reply.context_version == ""
        assert "unavailable" in reply.context_note and "deliberated on the task alone" in reply.context_note
        stored = (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-ctx-down"))).result
        assert stored.context_note == reply.context_note
    finally:
        await channel.close()
        await running.stop(0.5)


async def test_without_a_context_service_configured_the_result_says_so(orch_settings, bus):
    running, channel, stub = await serve(orch_settings, context_address="")
    try:
        request = pb.DeliberateRequest(
            task_id="T-no-ctx", task_description="Write a CSV parser.", role="DEV", story_id="S-1"
        )
        reply = (await stub.Deliberate(request)).result
        assert reply.status == dpb.DELIBERATION_STATUS_COMPLETED, reply.error_message
        assert "no context service configured" in reply.context_note
    finally:
        await channel.close()
        await running.stop(0.5)
