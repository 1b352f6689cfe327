"""Every orchestrator RPC and error code through real gRPC, NATS, Valkey and an OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.local.processes import free_port

pytestmark = pytest.mark.integration
COMPLETED = dpb.DELIBERATION_STATUS_COMPLETED


def field_violation(err: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field


async def expect_error(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


async def create_all(stub) -> None:
    for role in ev.Role:
        await stub.CreateCouncil(pb.CreateCouncilRequest(role=role, num_agents=3))


def deliberate_request(task_id: str = "T-1", role: str = "DEV", **over) -> pb.DeliberateRequest:
    fields = {
        "task_id": task_id,
        "task_description": "Write a Python function that parses ISO dates, with tests.",
        "role": role,
        "constraints": dpb.Constraints(requirements=["tests"], timeout_seconds=60),
        **over,
    }
    return pb.DeliberateRequest(**fields)


async def test_health_serving(orchestrator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="fleet.orchestrator.v1.OrchestratorService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_councils_lifecycle_and_errors(stub):
    created = await stub.CreateCouncil(pb.CreateCouncilRequest(role="DEV", num_agents=3))
    assert created.council_id == "council-dev"
    assert list(created.agent_ids) == ["agent-dev-001", "agent-dev-002", "agent-dev-003"]
    await expect_error(stub.CreateCouncil(pb.CreateCouncilRequest(role="DEV")), grpc.StatusCode.ALREADY_EXISTS)
    err = await expect_error(stub.CreateCouncil(pb.CreateCouncilRequest(role="CEO")), grpc.StatusCode.INVALID_ARGUMENT)
    assert field_violation(err) == "role" and "CEO" in err.details()
    await stub.CreateCouncil(pb.CreateCouncilRequest(role="qa", num_agents=2))

    listed = await stub.ListCouncils(pb.ListCouncilsRequest(include_agents=True))
    assert [(c.role, c.num_agents) for c in listed.councils] == [("DEV", 3), ("QA", 2)]
    agents = listed.councils[0].agents
    assert len({a.persona for a in agents}) == 3 and len({a.temperature for a in agents}) > 1
    only_qa = await stub.ListCouncils(pb.ListCouncilsRequest(role_filter="QA"))
    assert [c.council_id for c in only_qa.councils] == ["council-qa"] and not only_qa.councils[0].agents
    err = await expect_error(
        stub.ListCouncils(pb.ListCouncilsRequest(role_filter="X")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert field_violation(err) == "role_filter"

    deleted = await stub.DeleteCouncil(pb.DeleteCouncilRequest(role="QA"))
    assert deleted.council_id == "council-qa" and deleted.agents_removed == 2
    await expect_error(stub.DeleteCouncil(pb.DeleteCouncilRequest(role="QA")), grpc.StatusCode.NOT_FOUND)


async def test_deliberate_returns_ranked_proposals_with_a_winner(stub, bus):
    await create_all(stub)
    seen: list[str] = []

    async def record(msg):
        seen.append(msg.subject)

    sub = await bus.nc.subscribe("orchestration.>", cb=record)
    await bus.nc.flush()  # subscribed at the server before the deliberation publishes
    reply = (await stub.Deliberate(deliberate_request())).result
    await sub.unsubscribe()
    assert reply.status == COMPLETED, reply.error_message
    assert [r.rank for r in reply.results] == [1, 2, 3]
    assert reply.winner_id in {r.proposal.author_id for r in reply.results}
    assert reply.selection.method in (dpb.SELECTION_METHOD_ARCHITECT, dpb.SELECTION_METHOD_FALLBACK)
    assert reply.selection.rationale
    for r in reply.results:
        assert r.proposal.author_role == "DEV" and r.proposal.content
        assert len(r.proposal.revisions) == 2  # the original and one revision after the review round
        assert r.votes and all(v.voter_id != r.proposal.author_id for v in r.votes)
        assert {c.name for c in r.checks} >= {"python.syntax", "policy.secrets"}
    assert len(reply.critiques) == 3 and all(c.critic_id != c.author_id for c in reply.critiques)
    assert reply.total_tokens > 0 and {p.phase for p in reply.phase_durations} >= {"GENERATE", "SCORE"}
    assert reply.executor == "in-process"
    assert "orchestration.deliberation.completed" in seen and "orchestration.task.dispatched" in seen

    again = (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-1"))).result
    assert again.status == COMPLETED and again.deliberation_id == reply.deliberation_id
    assert again.winner_id == reply.winner_id and len(again.results) == 3


async def test_deliberate_input_errors(stub):
    await create_all(stub)
    cases = [
        (deliberate_request(role="CEO"), "role"),
        (deliberate_request(task_id=" "), "task_id"),
        (pb.DeliberateRequest(task_id="T", role="DEV"), "task_description"),
        (deliberate_request(num_agents=7), "num_agents"),
        (deliberate_request(phase="LUNCH"), "phase"),
        (deliberate_request(constraints=dpb.Constraints(timeout_seconds=-1)), "constraints.timeout_seconds"),
    ]
    for request, field in cases:
        err = await expect_error(stub.Deliberate(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert field_violation(err) == field, err.details()


async def test_deliberate_without_a_council_is_a_failed_precondition(stub):
    await expect_error(stub.Deliberate(deliberate_request()), grpc.StatusCode.FAILED_PRECONDITION)


async def test_unknown_task_is_not_found(stub):
    err = await expect_error(
        stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="nope")), grpc.StatusCode.NOT_FOUND
    )
    assert "nope" in err.details()


async def test_llm_down_fails_the_deliberation_with_the_reason(orch_settings, bus):
    from services.orchestrator.main import start

    down = orch_settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{free_port()}", "vllm_max_retries": 0})
    running = await start(down, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            await create_all(stub)
            reply = (await stub.Deliberate(deliberate_request(task_id="T-down"))).result
            assert reply.status == dpb.DELIBERATION_STATUS_FAILED
            assert "unavailable" in reply.error_message.lower() and "127.0.0.1" in reply.error_message
            stored = (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-down"))).result
            assert stored.status == dpb.DELIBERATION_STATUS_FAILED and stored.error_message == reply.error_message
    finally:
        await running.stop(0.5)


async def test_deadline_ends_as_timeout_with_partial_results(stub, llm_server):
    import httpx

    await create_all(stub)
    async with httpx.AsyncClient() as http:
        await http.post(f"{llm_server.url}/control", json={"delay_ms": 1500})
        try:
            request = deliberate_request(task_id="T-slow", constraints=dpb.Constraints(timeout_seconds=2.5))
            reply = (await stub.Deliberate(request)).result
        finally:
            await http.post(f"{llm_server.url}/control", json={"reset": True, "delay_ms": 20})
    assert reply.status == dpb.DELIBERATION_STATUS_TIMEOUT
    assert reply.error_message and reply.duration_ms < 7500  # every phase at 1.5 s a call would take longer
    assert reply.results  # the proposals generated before the deadline are kept


async def test_stream_deliberation_reports_progress_then_the_result(stub):
    await create_all(stub)
    kinds, answered, result = [], [], None
    async for update in stub.StreamDeliberation(pb.StreamDeliberationRequest(deliberation=deliberate_request("T-s"))):
        if update.HasField("progress"):
            kinds.append((update.progress.phase, update.progress.kind))
            if (update.progress.phase, update.progress.kind) == ("GENERATE", "agent_completed"):
                answered.append(update.progress.completion_tokens)
        else:
            result = update.result
    assert result is not None and result.status == COMPLETED
    phases = [p for p, k in kinds if k == "phase_started"]
    assert phases[:3] == ["GENERATE", "CHECK", "CRITIQUE"] and "SELECT" in phases  # checked before reviewed
    assert any(k == "agent_completed" for _, k in kinds)
    assert len(answered) == 3 and all(tokens > 0 for tokens in answered)  # each answer's own tokens, as a number


async def test_status_counts_deliberations(stub):
    await create_all(stub)
    await stub.Deliberate(deliberate_request("T-a"))
    await stub.Deliberate(deliberate_request("T-b", role="QA"))
    reply = await stub.GetStatus(pb.GetStatusRequest(include_stats=True))
    assert reply.status == "SERVING" and reply.uptime_seconds >= 0
    s = reply.stats
    assert s.total_deliberations == 2 and s.deliberations_by_status["COMPLETED"] == 2
    assert dict(s.deliberations_by_role) == {"DEV": 1, "QA": 1}
    assert s.active_councils == 5 and s.average_duration_ms > 0 and s.executor == "in-process"


async def test_a_second_orchestrator_process_answers_for_the_first(stub, orch_settings, tmp_path):
    """Results live in Valkey: `fleet serve orchestrator` in another process returns what this one ran."""
    await create_all(stub)
    first = (await stub.Deliberate(deliberate_request("T-shared"))).result
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": orch_settings.nats_url,
        "VALKEY_URL": orch_settings.valkey_url,
        "GRPC_PORT": str(port),
        "METRICS_PORT": "0",
        "VLLM_URL": orch_settings.vllm_url,
    }
    log = (tmp_path / "second.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "orchestrator"], env=env, stdout=log, stderr=log
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 30)
            second = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            reply = (await second.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-shared"))).result
            assert reply.deliberation_id == first.deliberation_id and reply.status == COMPLETED
            assert [r.proposal.content for r in reply.results] == [r.proposal.content for r in first.results]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, (tmp_path / "second.log").read_text()[-2000:]
