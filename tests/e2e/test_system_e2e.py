"""The system end to end, through public interfaces only: the generated gRPC stubs and the event catalog.

Against the fleet of `conftest.fleet` (one the session starts with the real vLLM, or the one the environment
names, e.g. in Kubernetes). The fault tests at the end kill and restart processes of the local fleet.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.context.v1 import context_pb2
from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from services.common import events as ev
from services.common.bus import EventBus
from services.common.settings import FleetSettings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

COMPLETED = dpb.DELIBERATION_STATUS_COMPLETED
ENDED = (COMPLETED, dpb.DELIBERATION_STATUS_FAILED, dpb.DELIBERATION_STATUS_TIMEOUT)
TASK = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


class Events:
    """Every catalog event on the orchestrator's and agents' subjects, as a dashboard would see them."""

    def __init__(self) -> None:
        self.seen: list[ev.Envelope] = []
        self._changed = asyncio.Event()

    async def start(self, nats_url: str) -> Events:
        self.nc = await nats.connect(nats_url, connect_timeout=5)
        for stream in (ev.Streams.ORCHESTRATOR_EVENTS, ev.Streams.AGENT_RESPONSES, ev.Streams.CONTEXT):
            for subject in ev.STREAMS[stream].subjects:
                await self.nc.subscribe(subject, cb=self._on)
        await self.nc.flush()  # subscribed at the server before the test publishes anything
        return self

    async def _on(self, msg) -> None:
        self.seen.append(ev.parse_event(msg.data, msg.subject))
        self._changed.set()

    def of(
        self, kind: type | tuple[type, ...], where: Callable[[ev.Payload], bool] = lambda p: True
    ) -> list[ev.Payload]:
        return [e.payload for e in self.seen if isinstance(e.payload, kind) and where(e.payload)]

    async def wait(
        self, kind: type | tuple[type, ...], where: Callable[[ev.Payload], bool], count: int = 1, timeout=600
    ):
        async with asyncio.timeout(timeout):
            while len(found := self.of(kind, where)) < count:
                self._changed.clear()
                await self._changed.wait()
        return found

    async def close(self) -> None:
        await self.nc.close()


@pytest.fixture
async def events(fleet):
    log = await Events().start(fleet.endpoints["nats"])
    yield log
    await log.close()


async def approve(nats_url: str, story: str, tasks: list[ev.PlanTask], roles: list[ev.Role]) -> ev.Envelope:
    payload = ev.PlanApproved(
        story_id=story,
        plan_id="P-1",
        approved_by="e2e@swe-ai-fleet",
        timestamp=datetime.now(UTC),
        title=f"e2e story {story}",
        roles=roles,
        tasks=tasks,
    )
    bus = await EventBus.connect(FleetSettings(nats_url=nats_url, metrics_port=0), ev.PO_UI)
    try:
        event = ev.make_event(payload, ev.PO_UI, correlation_id=story)
        await bus.publish(event)
        return event
    finally:
        await bus.close()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def result_when_ended(orchestrator, task_id: str, timeout: float = 600) -> dpb.DeliberationResult:
    async with asyncio.timeout(timeout):
        while True:
            try:
                reply = (
                    await orchestrator.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))
                ).result
                if reply.status in ENDED:
                    return reply
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
            await asyncio.sleep(1)


# --- the five checks -------------------------------------------------------------------------------------------


async def test_the_orchestrator_is_healthy(fleet, orchestrator):
    async with grpc.aio.insecure_channel(fleet.endpoints["orchestrator"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fleet.orchestrator.v1.OrchestratorService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    status = await orchestrator.GetStatus(pb.GetStatusRequest(include_stats=True), timeout=10)
    assert status.status == "SERVING" and status.uptime_seconds >= 0
    assert status.stats.active_councils == 5


async def test_every_role_has_a_council_of_three(orchestrator):
    reply = await orchestrator.ListCouncils(pb.ListCouncilsRequest(include_agents=True), timeout=10)
    assert sorted(c.role for c in reply.councils) == sorted(ev.Role)
    for council in reply.councils:
        assert council.council_id == f"council-{council.role.lower()}" and council.num_agents == 3
        assert [a.agent_id for a in council.agents] == [f"agent-{council.role.lower()}-{i:03d}" for i in (1, 2, 3)]
        assert all(a.role == council.role for a in council.agents)


async def test_a_plan_approval_is_deliberated_and_its_decision_lands_in_the_graph(fleet, events, orchestrator, context):
    story, task_id = new_id("S-e2e"), new_id("T-e2e")
    tasks = [ev.PlanTask(task_id=task_id, role=ev.Role.DEV, description=TASK, requirements=["docstring"])]
    approval = await approve(fleet.endpoints["nats"], story, tasks, [ev.Role.DEV])

    mine = lambda p: p.story_id == story  # noqa: E731
    [started] = await events.wait(ev.DeliberationStarted, mine)
    assert started.task_id == task_id and started.role == ev.Role.DEV and started.num_agents == 3
    [done] = await events.wait((ev.DeliberationCompleted, ev.DeliberationFailed), mine)  # a failure ends it too
    assert isinstance(done, ev.DeliberationCompleted), done
    assert done.deliberation_id == started.deliberation_id and done.winner_id.startswith("agent-dev-")
    answered = events.of(ev.AgentResponseCompleted, lambda p: p.deliberation_id == started.deliberation_id)
    assert {p.phase for p in answered} >= {"GENERATE", "SCORE"}
    assert not events.of(ev.DeliberationFailed, mine)

    result = (await orchestrator.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))).result
    assert result.status == COMPLETED and result.story_id == story and result.winner_id == done.winner_id

    # The context service consumed the same approval and the completed deliberation: the decision is in the graph.
    decision = f"DEC-{done.deliberation_id}"
    request = context_pb2.GetContextRequest(story_id=story, role="DEV", phase="BUILD", token_budget=4000)
    async with asyncio.timeout(60):
        while decision not in (reply := await context.GetContext(request)).context:
            await asyncio.sleep(0.5)
    assert task_id in reply.context and reply.version and reply.token_count > 0
    assert approval.payload.title in reply.context


async def test_deliberate_returns_ranked_proposals_with_a_winner(orchestrator):
    task_id = new_id("T-e2e-rpc")
    request = pb.DeliberateRequest(
        task_id=task_id,
        task_description=TASK,
        role="DEV",
        constraints=dpb.Constraints(requirements=["docstring"], timeout_seconds=600, rounds=1),
    )
    reply = (await orchestrator.Deliberate(request, timeout=660)).result
    assert reply.status == COMPLETED, reply.error_message
    assert [r.rank for r in reply.results] == [1, 2, 3]
    assert reply.results[0].score >= reply.results[-1].score
    assert reply.winner_id in {r.proposal.author_id for r in reply.results}
    assert reply.selection.rationale and reply.selection.method in (
        dpb.SELECTION_METHOD_ARCHITECT,
        dpb.SELECTION_METHOD_FALLBACK,
    )
    for r in reply.results:
        assert r.proposal.content and r.proposal.author_role == "DEV"
        assert {c.name for c in r.checks} >= {"python.syntax", "policy.secrets"}
        assert all(v.voter_id != r.proposal.author_id for v in r.votes)

    again = (await orchestrator.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))).result
    assert again.status == COMPLETED and again.deliberation_id == reply.deliberation_id
    assert again.winner_id == reply.winner_id and len(again.results) == 3

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await orchestrator.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=new_id("T-never")))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# --- faults ---------------------------------------------------------------------------------------------------


async def test_vllm_stopped_mid_deliberation_fails_it_with_a_reason_and_the_next_one_succeeds(
    local_fleet, events, orchestrator
):
    task_id = new_id("T-e2e-vllm")
    request = pb.DeliberateRequest(
        task_id=task_id, task_description=TASK, role="DEV", constraints=dpb.Constraints(timeout_seconds=300)
    )
    running = asyncio.ensure_future(orchestrator.Deliberate(request, timeout=360))  # a grpc call, not a coroutine
    [started] = await events.wait(ev.DeliberationStarted, lambda p: p.task_id == task_id)
    await events.wait(ev.AgentResponseCompleted, lambda p: p.deliberation_id == started.deliberation_id)
    await asyncio.to_thread(local_fleet.kill, "vllm")  # mid-deliberation: some agents have answered, most not
    reply = (await running).result
    assert reply.status in (dpb.DELIBERATION_STATUS_FAILED, dpb.DELIBERATION_STATUS_TIMEOUT)
    assert reply.error_message, "a failed deliberation says why"
    stored = (await orchestrator.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))).result
    assert stored.status == reply.status and stored.error_message == reply.error_message

    await asyncio.to_thread(local_fleet.restart, "vllm")
    request = pb.DeliberateRequest(
        task_id=new_id("T-e2e-back"),
        task_description=TASK,
        role="DEV",
        constraints=dpb.Constraints(timeout_seconds=600),
    )
    again = (await orchestrator.Deliberate(request, timeout=660)).result
    assert again.status == COMPLETED, again.error_message


async def test_approvals_in_flight_survive_an_orchestrator_killed_by_sigkill(local_fleet, events, orchestrator):
    story = new_id("S-e2e-kill")
    task_ids = [new_id("T-e2e-kill") for _ in range(3)]
    for task_id in task_ids:
        tasks = [ev.PlanTask(task_id=task_id, role=ev.Role.DEV, description=TASK)]
        await approve(local_fleet.endpoints["nats"], story, tasks, [ev.Role.DEV])
    await events.wait(ev.DeliberationStarted, lambda p: p.story_id == story)

    await asyncio.to_thread(local_fleet.kill, "orchestrator")
    await asyncio.to_thread(local_fleet.restart, "orchestrator")

    for task_id in task_ids:  # every approval processed: none lost
        result = await result_when_ended(orchestrator, task_id, timeout=600)
        assert result.status == COMPLETED, (task_id, result.error_message)
    # ... and exactly once: one outcome per task, whoever published it and however often it was redelivered
    await asyncio.sleep(2)
    outcomes = events.of(ev.DeliberationCompleted, lambda p: p.story_id == story)
    assert sorted(p.task_id for p in outcomes) == sorted(task_ids), [(p.task_id, p.deliberation_id) for p in outcomes]
