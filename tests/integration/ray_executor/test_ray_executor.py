"""The ray-executor through real gRPC, NATS JetStream, a real Ray head and a loopback OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as opb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from fleet.ray_executor.v1 import ray_executor_pb2 as pb
from services.common import events as ev
from services.common.llm import VLLMClient
from services.deliberation.domain import DeliberationResult, make_council
from services.deliberation.engine import DeliberationEngine, InProcessExecutor
from services.deliberation.proto import agent_to_proto, result_from_proto
from services.local import infra as infra_module
from services.local.processes import free_port
from services.ray_executor.adapters.grpc_api import request_to_domain

pytestmark = [pytest.mark.integration, pytest.mark.ray]

COMPLETED = dpb.DELIBERATION_STATUS_COMPLETED
TERMINAL = {COMPLETED, dpb.DELIBERATION_STATUS_FAILED, dpb.DELIBERATION_STATUS_TIMEOUT}


def execute_request(deliberation_id: str, task_id: str = "T-ray-1", *, personas: dict[int, str] | None = None, **over):
    council = make_council("DEV", 3)
    agents = [agent_to_proto(a) for a in council.agents]
    for i, persona in (personas or {}).items():
        agents[i].persona = persona
    fields: dict[str, Any] = {
        "deliberation_id": deliberation_id,
        "task_id": task_id,
        "task_description": "Write a Python function that parses ISO dates, with tests.",
        "role": "DEV",
        "constraints": dpb.Constraints(requirements=["tests"], timeout_seconds=60),
        "agents": agents,
        "architect": agent_to_proto(make_council("ARCHITECT", 1).agents[0]),
        "council_id": council.council_id,
        **over,
    }
    return pb.ExecuteDeliberationRequest(**fields)


async def wait_end(rx, deliberation_id: str, timeout: float = 60) -> pb.GetDeliberationStatusResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await rx.GetDeliberationStatus(pb.GetDeliberationStatusRequest(deliberation_id=deliberation_id))
        if reply.status in TERMINAL:
            return reply
        await asyncio.sleep(0.05)
    raise AssertionError(f"{deliberation_id} did not end within {timeout}s")


async def expect_error(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


def field_violation(err: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field


class Recorder:
    """Every event on the given subjects (core NATS subscriptions see JetStream publishes), parsed."""

    def __init__(self) -> None:
        self.events: list[ev.Envelope[Any]] = []
        self.subs: list[Any] = []

    async def start(self, bus, *subjects: str) -> Recorder:
        async def seen(msg) -> None:
            self.events.append(ev.parse_event(msg.data, msg.subject))

        for s in subjects:
            self.subs.append(await bus.nc.subscribe(s, cb=seen))
        await bus.nc.flush()  # the server has the subscriptions before anything the test starts publishes
        return self

    def of(self, event_type: str, deliberation_id: str) -> list[Any]:
        return [
            e.payload
            for e in self.events
            if e.event_type == event_type and e.payload.deliberation_id == deliberation_id
        ]

    async def wait_for(self, event_type: str, deliberation_id: str, timeout: float = 5.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not self.of(event_type, deliberation_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.of(event_type, deliberation_id)

    async def stop(self) -> None:
        for s in self.subs:
            await s.unsubscribe()


async def ray_resources_released(ray, running, timeout: float = 10.0) -> None:
    """No call in flight on the pool, and Ray holds nothing beyond the pool's own reservation."""
    deadline = time.monotonic() + timeout
    total = ray.cluster_resources().get("CPU")
    while time.monotonic() < deadline:
        if running.pool.in_flight == 0 and ray.available_resources().get("CPU") == total - running.pool.reserved_cpus:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"still held: {running.pool.in_flight} calls, CPUs {ray.available_resources()} of {ray.cluster_resources()}"
    )


def comparable(r: DeliberationResult) -> dict[str, Any]:
    """The result without what legitimately differs between two runs: ids, timings, the executor's name."""
    d = r.to_dict()
    for key in ("started_at", "finished_at", "duration_ms", "executor", "deliberation_id"):
        d.pop(key)
    d["phase_durations_ms"] = sorted(d["phase_durations_ms"])
    return json.loads(json.dumps(d).replace(r.deliberation_id, "<id>"))


# --- tests ---------------------------------------------------------------------------------------------------


async def test_health_status_and_empty_jobs(ray_executor, rx, ray_head):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ray_executor.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="fleet.ray_executor.v1.RayExecutorService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    status = await rx.GetStatus(pb.GetStatusRequest())
    assert status.status == "SERVING" and status.ray_address == ray_head.address
    assert (status.total, status.active, status.completed, status.failed) == (0, 0, 0, 0)
    assert not (await rx.GetActiveJobs(pb.GetActiveJobsRequest())).jobs


async def test_deliberation_on_ray_has_the_in_process_result_and_publishes_its_events(
    rx, bus, llm, ray_driver, ray_executor
):
    recorder = await Recorder().start(bus, "agent.>", "orchestration.>")
    request = execute_request("delib-ray-shape")
    accepted = await rx.ExecuteDeliberation(request)
    assert accepted.deliberation_id == "delib-ray-shape"
    assert accepted.status in (dpb.DELIBERATION_STATUS_PENDING, dpb.DELIBERATION_STATUS_IN_PROGRESS)
    active = (await rx.GetActiveJobs(pb.GetActiveJobsRequest())).jobs
    assert [(j.deliberation_id, j.task_id, j.role, j.agents) for j in active] == [
        ("delib-ray-shape", "T-ray-1", "DEV", 3)
    ]
    assert abs(active[0].started_at / 1000 - time.time()) < 30
    again = await rx.ExecuteDeliberation(request)  # idempotent: nothing new starts
    assert again.deliberation_id == "delib-ray-shape"

    reply = await wait_end(rx, "delib-ray-shape")
    assert reply.status == COMPLETED, reply.error_message
    on_ray = result_from_proto(reply.result)
    assert on_ray.executor == "ray" and reply.result.executor == "ray"
    assert [r.rank for r in on_ray.results] == [1, 2, 3] and on_ray.winner_id
    assert all(len(r.proposal.revisions) == 2 for r in on_ray.results)

    # The same deliberation in-process: the very same result, up to ids and timings.
    same = request_to_domain(execute_request("delib-local-shape"))
    async with VLLMClient(llm.url, "test-model") as client:
        in_process = await DeliberationEngine(InProcessExecutor(client)).run(
            same.task, same.council, same.architect, same.deliberation_id
        )
    assert comparable(on_ray) == comparable(in_process)

    # Events: every agent call dispatched and answered (by the Ray executor), the lifecycle once each.
    completed = await recorder.wait_for("orchestration.deliberation.completed", "delib-ray-shape")
    await recorder.stop()
    dispatched = recorder.of("agent.request.dispatched", "delib-ray-shape")
    answered = recorder.of("agent.response.completed", "delib-ray-shape")
    assert dispatched and all(d.executor == "ray" for d in dispatched)
    assert sorted(d.request_id for d in dispatched) == sorted(a.request_id for a in answered)
    assert len(recorder.of("orchestration.deliberation.started", "delib-ray-shape")) == 1
    assert len(completed) == 1 and completed[0].winner_id == on_ray.winner_id

    stats = await rx.GetStatus(pb.GetStatusRequest())
    assert (stats.total, stats.active, stats.completed, stats.failed) == (1, 0, 1, 0)
    assert stats.average_duration_ms == pytest.approx(reply.result.duration_ms, abs=1)
    assert not (await rx.GetActiveJobs(pb.GetActiveJobsRequest())).jobs
    await ray_resources_released(ray_driver, ray_executor)


async def test_token_chunks_arrive_in_order_and_reassemble_to_each_answer(rx, bus, llm):
    await llm.acontrol(tokens_per_second=400)  # answers of ~100-200 words stream over several 100 ms batches
    reply = await wait_end(rx, (await rx.ExecuteDeliberation(execute_request("delib-ray-tokens"))).deliberation_id)
    assert reply.status == COMPLETED, reply.error_message

    async def stored(subject: str) -> list[ev.Envelope[Any]]:
        """Everything the stream keeps on `subject`, in stream order."""
        sub = await bus.js.subscribe(subject, ordered_consumer=True)
        out = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1.0)
                out.append(ev.parse_event(msg.data, msg.subject))
        except Exception:  # nats TimeoutError: the stream has nothing more
            pass
        await sub.unsubscribe()
        return out

    chunks = await stored("vllm.streaming.delib-ray-tokens.>")
    answers = {
        (e.payload.agent_id, e.payload.phase): e.payload.content
        for e in await stored("agent.response.completed")
        if e.payload.deliberation_id == "delib-ray-tokens"
    }
    assert all(e.subject == f"vllm.streaming.delib-ray-tokens.{e.payload.agent_id}" for e in chunks)
    by_call: dict[tuple[str, str], list[ev.TokenChunk]] = {}
    for e in chunks:
        by_call.setdefault((e.payload.agent_id, e.payload.phase), []).append(e.payload)
    assert set(by_call) == set(answers), "one chunk sequence per agent call"
    batched = 0
    for key, seq in by_call.items():
        assert [c.seq for c in seq] == list(range(len(seq))), key
        assert seq[0].kind == "start" and seq[-1].kind == "end", key
        assert {c.kind for c in seq[1:-1]} <= {"tokens"}, key
        text = "".join(c.text for c in seq)  # chunks keep every space; the catalog trims the event's content
        assert text.strip() == answers[key] and text.startswith(answers[key]), key
        words = len(answers[key].split())
        batched += len(seq) - 2 >= 2 and len(seq) - 2 < words
    assert batched >= 3, "long answers come in several batches, each holding many tokens"
    # The GENERATE chunks are the proposals as they were first written.
    for r in reply.result.results:
        text = "".join(c.text for c in by_call[(r.proposal.author_id, "GENERATE")])
        assert text.strip() == r.proposal.revisions[0].content


async def test_an_agent_whose_llm_call_fails_is_reported_failed_while_the_others_finish(rx, bus, llm):
    await llm.acontrol(fail_when_contains="PERSONA-THAT-FAILS", fail_status=400)
    recorder = await Recorder().start(bus, "agent.response.>")
    request = execute_request("delib-ray-fail", personas={1: "PERSONA-THAT-FAILS: an agent whose calls are refused."})
    reply = await wait_end(rx, (await rx.ExecuteDeliberation(request)).deliberation_id)
    await recorder.stop()
    assert reply.status == COMPLETED, reply.error_message
    authors = {r.proposal.author_id for r in reply.result.results}
    assert authors == {"agent-dev-001", "agent-dev-003"}
    failed = {(f.agent_id, f.phase) for f in reply.result.failures}
    assert ("agent-dev-002", "GENERATE") in failed
    assert all(agent == "agent-dev-002" for agent, _ in failed)
    events = recorder.of("agent.response.failed", "delib-ray-fail")
    generate = [e for e in events if e.phase == "GENERATE"]
    assert [(e.agent_id, e.error_kind) for e in generate] == [("agent-dev-002", "llm")]
    assert "HTTP 400" in generate[0].error
    ok = {(e.agent_id, e.phase) for e in recorder.of("agent.response.completed", "delib-ray-fail")}
    assert {("agent-dev-001", "GENERATE"), ("agent-dev-003", "GENERATE")} <= ok


async def test_the_deadline_cancels_ray_calls_and_their_llm_calls(rx, llm, ray_driver, ray_executor):
    await llm.acontrol(delay_ms=20_000)
    request = execute_request("delib-ray-deadline", constraints=dpb.Constraints(timeout_seconds=1.5))
    t0 = time.monotonic()
    reply = await wait_end(rx, (await rx.ExecuteDeliberation(request)).deliberation_id, timeout=15)
    assert time.monotonic() - t0 < 15  # the LLM's 20 s were not waited out
    assert reply.status == dpb.DELIBERATION_STATUS_TIMEOUT
    assert "deadline of 1.5s exceeded during the GENERATE phase" in reply.error_message
    await ray_resources_released(ray_driver, ray_executor)
    deadline = time.monotonic() + 10
    while (await llm.astats())["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stats = await llm.astats()
    assert stats["in_flight"] == 0 and stats["calls"] == 3, stats  # the HTTP calls were aborted, not left running
    status = await rx.GetStatus(pb.GetStatusRequest())
    assert (status.completed, status.failed) == (0, 1)


async def test_the_per_agent_timeout_fails_each_agent_not_the_service(rx_settings, bus, ray_driver, llm):
    from services.ray_executor.main import start

    await llm.acontrol(delay_ms=20_000)
    running = await start(rx_settings.model_copy(update={"agent_timeout_seconds": 1.0}), host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            from fleet.ray_executor.v1 import ray_executor_pb2_grpc

            stub = ray_executor_pb2_grpc.RayExecutorServiceStub(ch)
            t0 = time.monotonic()
            reply = await wait_end(
                stub, (await stub.ExecuteDeliberation(execute_request("delib-agent-t"))).deliberation_id
            )
            assert time.monotonic() - t0 < 15  # the LLM's 20 s were not waited out
            await ray_resources_released(ray_driver, running)
    finally:
        await running.stop(0.5)
    assert reply.status == dpb.DELIBERATION_STATUS_FAILED
    assert reply.error_message.startswith("all 3 agents failed in GENERATE: timed out after 1s")
    assert {(f.agent_id, f.phase) for f in reply.result.failures} == {
        (f"agent-dev-00{i}", "GENERATE") for i in (1, 2, 3)
    }


async def test_invalid_requests_and_unknown_deliberations(rx):
    cases = [
        (execute_request(""), "deliberation_id"),
        (execute_request("has.a.dot"), "deliberation_id"),
        (execute_request("d-1", task_id=" "), "task_id"),
        (execute_request("d-1", task_description=""), "task_description"),
        (execute_request("d-1", role="CEO"), "role"),
        (execute_request("d-1", agents=[]), "agents"),
        (execute_request("d-1", agents=[dpb.Agent(agent_id="a b")]), "agents[0].agent_id"),
        (execute_request("d-1", agents=[dpb.Agent(agent_id="a"), dpb.Agent(agent_id="a")]), "agents"),
        (execute_request("d-1", architect=dpb.Agent(agent_id="arch", temperature=5)), "architect.temperature"),
        (execute_request("d-1", constraints=dpb.Constraints(timeout_seconds=-1)), "constraints.timeout_seconds"),
        (execute_request("d-1", constraints=dpb.Constraints(rounds=9)), "constraints.rounds"),
        (execute_request("d-1", vllm_url="ftp://x"), "vllm_url"),
    ]
    for request, field in cases:
        err = await expect_error(rx.ExecuteDeliberation(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert field_violation(err) == field, (field, err.details())
    err = await expect_error(
        rx.GetDeliberationStatus(pb.GetDeliberationStatusRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert field_violation(err) == "deliberation_id"
    err = await expect_error(
        rx.GetDeliberationStatus(pb.GetDeliberationStatusRequest(deliberation_id="delib-nobody")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "delib-nobody" in err.details()
    assert (await rx.GetStatus(pb.GetStatusRequest())).total == 0

    await rx.ExecuteDeliberation(execute_request("delib-taken", task_id="T-a"))
    await expect_error(
        rx.ExecuteDeliberation(execute_request("delib-taken", task_id="T-b")), grpc.StatusCode.ALREADY_EXISTS
    )
    await wait_end(rx, "delib-taken")


async def test_orchestrator_with_executor_ray_runs_on_the_ray_executor(settings, llm, ray_executor, bus):
    from services.orchestrator.main import start
    from services.orchestrator.settings import OrchestratorSettings

    orch_settings = OrchestratorSettings(
        **settings.model_dump(),
        grpc_port=0,
        vllm_url="http://127.0.0.1:9",  # unused: agent calls go to the ray-executor, which has its own
        vllm_model="test-model",
        executor="ray",
        ray_executor_address=f"127.0.0.1:{ray_executor.port}",
    )
    recorder = await Recorder().start(bus, "orchestration.>", "agent.request.>")
    orchestrator = await start(orch_settings, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as ch:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            for role in ("DEV", "ARCHITECT"):
                await stub.CreateCouncil(opb.CreateCouncilRequest(role=role, num_agents=3))
            request = opb.DeliberateRequest(
                task_id="T-orch-ray",
                task_description="Write a Python function that parses ISO dates, with tests.",
                role="DEV",
                constraints=dpb.Constraints(requirements=["tests"], timeout_seconds=60),
            )
            progress, final = [], None
            async for item in stub.StreamDeliberation(opb.StreamDeliberationRequest(deliberation=request)):
                if item.HasField("progress"):
                    progress.append(item.progress)
                else:
                    final = item.result
            assert final is not None and final.status == COMPLETED, final
            assert final.executor == "ray" and [r.rank for r in final.results] == [1, 2, 3]
            assert final.selection.method == dpb.SELECTION_METHOD_ARCHITECT
            assert {(p.kind, p.phase) for p in progress} >= {
                ("agent_completed", "GENERATE"),
                ("agent_completed", "SCORE"),
            }
            assert all(p.completion_tokens > 0 for p in progress if p.kind == "agent_completed")
            stored = (await stub.GetDeliberationResult(opb.GetDeliberationResultRequest(task_id="T-orch-ray"))).result
            assert stored.status == COMPLETED and stored.executor == "ray"
            assert stored.deliberation_id == final.deliberation_id and stored.winner_id == final.winner_id
            status = await stub.GetStatus(opb.GetStatusRequest(include_stats=True))
            assert status.stats.executor == "ray"
    finally:
        await orchestrator.stop(0.5)
    did = final.deliberation_id
    assert len(await recorder.wait_for("orchestration.deliberation.completed", did)) == 1
    await asyncio.sleep(0.3)  # a second completion (the ray-executor's) would have arrived by now
    await recorder.stop()
    assert len(recorder.of("orchestration.deliberation.completed", did)) == 1, "the orchestrator publishes it, once"
    assert len(recorder.of("orchestration.deliberation.started", did)) == 1
    assert {d.executor for d in recorder.of("agent.request.dispatched", did)} == {"ray"}
    assert ray_executor.app.stats().completed == 1


async def test_fleet_serve_ray_executor(settings, ray_head, llm, tmp_path: Path):
    port, metrics = free_port(), free_port()
    env = {
        **os.environ,
        **infra_module.RAY_ENV,
        "GRPC_PORT": str(port),
        "METRICS_PORT": str(metrics),
        "RAY_ADDRESS": ray_head.address,
        "NATS_URL": settings.nats_url,
        "VALKEY_URL": settings.valkey_url,
        "VLLM_URL": llm.url,
        "LOG_FORMAT": "text",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "fleet"), "serve", "ray-executor"], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            from fleet.ray_executor.v1 import ray_executor_pb2_grpc

            status = await ray_executor_pb2_grpc.RayExecutorServiceStub(ch).GetStatus(pb.GetStatusRequest())
            assert status.ray_address == ray_head.address
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics}/metrics")).text
        assert "fleet_ray_active_deliberations 0.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]


async def test_a_full_ray_executor_makes_the_orchestrator_wait_for_a_slot_not_fail(
    rx_settings, settings, llm, bus, ray_driver, caplog
):
    """A ray-executor that may run one deliberation at a time, two asked at once: the second is refused
    (RESOURCE_EXHAUSTED) until the first ends, then taken; both complete (it used to end FAILED, "crashed")."""
    from services.orchestrator.main import start
    from services.orchestrator.settings import OrchestratorSettings
    from services.ray_executor.main import start as start_ray_executor

    caplog.set_level(logging.INFO, logger="fleet.orchestrator.ray")
    await llm.acontrol(delay_ms=300)
    ray_executor = await start_ray_executor(rx_settings.model_copy(update={"max_active_deliberations": 1}))
    orchestrator = await start(
        OrchestratorSettings(
            **settings.model_dump(),
            grpc_port=0,
            executor="ray",
            ray_executor_address=f"127.0.0.1:{ray_executor.port}",
        ),
        host="127.0.0.1",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as ch:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            await stub.CreateCouncil(opb.CreateCouncilRequest(role="QA", num_agents=2))

            async def deliberate(task_id: str) -> Any:
                request = opb.DeliberateRequest(
                    task_id=task_id,
                    task_description="Test the ISO date parser.",
                    role="QA",
                    constraints=dpb.Constraints(rounds=0, timeout_seconds=60),
                )
                return (await stub.Deliberate(request, timeout=120)).result

            first, second = await asyncio.gather(deliberate("T-full-1"), deliberate("T-full-2"))
    finally:
        await orchestrator.stop(0.5)
        await ray_executor.stop(0.5)
    assert [first.status, second.status] == [COMPLETED, COMPLETED], (first.error_message, second.error_message)
    assert ray_executor.app.stats().completed == 2
    waited = {r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("ray-executor full, ")}
    assert waited and waited <= {first.deliberation_id, second.deliberation_id}, waited  # one waited for the other


async def test_orchestrator_fails_the_deliberation_when_the_ray_executor_is_unreachable(settings, bus):
    from services.orchestrator.main import start
    from services.orchestrator.settings import OrchestratorSettings

    orch_settings = OrchestratorSettings(
        **settings.model_dump(),
        grpc_port=0,
        executor="ray",
        ray_executor_address=f"127.0.0.1:{free_port()}",  # nobody listens there
    )
    orchestrator = await start(orch_settings, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as ch:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            await stub.CreateCouncil(opb.CreateCouncilRequest(role="QA", num_agents=2))
            t0 = time.monotonic()
            reply = (
                await stub.Deliberate(
                    opb.DeliberateRequest(task_id="T-unreachable", task_description="Test the parser.", role="QA")
                )
            ).result
            assert time.monotonic() - t0 < 15
    finally:
        await orchestrator.stop(0.5)
    assert reply.status == dpb.DELIBERATION_STATUS_FAILED
    assert "ray-executor at 127.0.0.1:" in reply.error_message and "unreachable" in reply.error_message


async def test_a_ray_call_past_its_deadline_or_cancelled_at_it_leaves_nothing_running_at_the_llm(ray_driver, llm):
    """Issue 17 on a real actor: a call that reaches the worker after its deadline sends nothing; calls cancelled by
    the driver at the very moment the worker's own deadline fires (two cancels of one coroutine) are aborted."""
    from dataclasses import replace

    from services.deliberation.domain import Phase
    from services.deliberation.engine import AgentCall
    from services.deliberation.llm import ChatMessage, LLMRequest
    from services.ray_executor.executor import AgentPool, CallSpec, RayExecutor

    def call(rid: str) -> AgentCall:
        request = LLMRequest(messages=(ChatMessage("user", "Write add(a, b)."),), request_id=rid, max_tokens=64)
        return AgentCall(rid, "delib-cancel", "agent-dev-001", Phase.GENERATE, request)

    await llm.acontrol(delay_ms=20_000)
    pool = AgentPool(1, num_cpus=0.25)
    await pool.ready()
    try:
        spec = CallSpec(llm.url, "test-model", llm_timeout=30, llm_max_retries=0, call_timeout=30)
        (late,) = await RayExecutor(pool, replace(spec, deadline=time.time() - 1)).run([call("late")])
        assert late.error_kind == "timeout" and "deadline passed before the call started" in (late.error or "")
        assert (await llm.astats())["calls"] == 0
        rounds = 4
        for i in range(rounds):
            executor = RayExecutor(pool, replace(spec, deadline=time.time() + 0.5))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):  # the engine's deadline: the same instant as the worker's own
                    await executor.run([call(f"at-deadline-{i}"), call(f"at-deadline-{i}-b")])
            executor.close()
        deadline = time.monotonic() + 10  # half the LLM's delay: only aborted requests are gone by then
        while (stats := await llm.astats())["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert stats["in_flight"] == 0 and stats["by_status"] == {"499": 2 * rounds}, stats
    finally:
        pool.shutdown()
