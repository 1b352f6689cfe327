"""Plan approvals over real NATS: deliberations per role, events, idempotency, dead letters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from services.common import events as ev

from .test_orchestrator_api import create_all

pytestmark = pytest.mark.integration


def approval(roles=("DEV", "QA"), tasks=None, story="S-1", plan="P-1") -> ev.Envelope:
    payload = ev.PlanApproved(
        story_id=story,
        plan_id=plan,
        approved_by="po",
        timestamp=datetime.now(UTC),
        title="Date parsing utility",
        roles=list(roles) if roles else None,
        tasks=tasks,
    )
    return ev.make_event(payload, ev.PO_UI)


class Recorder:
    """Collects every event of the given subjects from the stream (an ordered consumer)."""

    def __init__(self) -> None:
        self.events: list[ev.Envelope] = []

    async def start(self, bus, subject: str) -> Recorder:
        async def on(msg):
            self.events.append(ev.parse_event(msg.data, msg.subject))

        self.sub = await bus.js.subscribe(subject, cb=on, ordered_consumer=True)
        return self

    def of(self, event_type: str) -> list[ev.Envelope]:
        return [e for e in self.events if e.event_type == event_type]

    async def wait(self, event_type: str, n: int, timeout: float = 60) -> list[ev.Envelope]:
        async with asyncio.timeout(timeout):
            while len(self.of(event_type)) < n:
                await asyncio.sleep(0.05)
        return self.of(event_type)


async def test_approval_runs_one_deliberation_per_role(stub, bus):
    await create_all(stub)
    rec = await Recorder().start(bus, "orchestration.>")
    sent = approval(roles=("DEV", "QA"))
    await bus.publish(sent)
    done = await rec.wait("orchestration.deliberation.completed", 2)
    assert {e.payload.role for e in done} == {"DEV", "QA"}
    assert all(e.correlation_id == sent.event_id and e.payload.story_id == "S-1" for e in done)
    assert {e.actor for e in rec.events} == {"po"}  # every event of these deliberations names who asked for them
    assert all(e.payload.winner_content and e.payload.selection_method in ("ARCHITECT", "FALLBACK") for e in done)
    assert len(rec.of("orchestration.deliberation.started")) == 2
    assert len(rec.of("orchestration.task.dispatched")) == 2
    reply = (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="S-1:P-1:DEV"))).result
    assert reply.status == dpb.DELIBERATION_STATUS_COMPLETED and reply.story_id == "S-1"
    assert reply.requested_by == "po"  # the plan's approver asked for it


async def test_explicit_tasks_are_deliberated_by_their_roles(stub, bus):
    await create_all(stub)
    rec = await Recorder().start(bus, "orchestration.deliberation.>")
    tasks = [ev.PlanTask(task_id="T-api", description="Design the REST API for dates", role="ARCHITECT")]
    await bus.publish(approval(roles=None, tasks=tasks))
    [done] = await rec.wait("orchestration.deliberation.completed", 1)
    assert done.payload.task_id == "T-api" and done.payload.role == "ARCHITECT"
    await asyncio.sleep(0.5)
    assert len(rec.of("orchestration.deliberation.completed")) == 1  # no other role was asked for


async def test_duplicate_and_redelivered_approvals_run_once(stub, bus):
    await create_all(stub)
    rec = await Recorder().start(bus, "orchestration.>")
    sent = approval(roles=("DEV",))
    await bus.publish(sent)
    await bus.publish(sent)  # same event id: dropped by the stream's duplicate window
    await bus.js.publish(sent.subject, sent.to_json())  # a copy past the window: caught by the seen-set
    await rec.wait("orchestration.deliberation.completed", 1)
    await asyncio.sleep(1.5)
    assert len(rec.of("orchestration.deliberation.started")) == 1
    assert len(rec.of("orchestration.deliberation.completed")) == 1


async def test_an_outcome_saved_but_not_announced_is_announced_when_the_approval_comes_back(orchestrator, stub, bus):
    """A replica killed between saving a result and announcing it: the redelivered approval runs nothing again but
    announces the outcome, under the outcome's own event id (so an announcement that did go out is not doubled)."""
    await create_all(stub)
    rec = await Recorder().start(bus, "orchestration.>")
    sent = approval(roles=("DEV",), story="S-9")
    await bus.publish(sent)
    (done,) = await rec.wait("orchestration.deliberation.completed", 1)
    assert done.event_id == f"{done.payload.deliberation_id}.outcome"

    app = orchestrator.app
    published: list[tuple[str, str]] = []
    real_publish = app.publish

    async def watched(payload, cid, actor, event_id):
        published.append((type(payload).__name__, event_id))
        await real_publish(payload, cid, actor, event_id)

    app.publish = watched
    await app.on_plan_approved(sent)  # the redelivery
    assert published == [("DeliberationCompleted", done.event_id)]  # announced again, nothing started
    await asyncio.sleep(1.0)
    assert len(rec.of("orchestration.deliberation.completed")) == 1  # the stream dropped the repeat
    assert len(rec.of("orchestration.deliberation.started")) == 1


async def test_bad_approval_is_dead_lettered_with_missing_fields_named(orchestrator, bus):
    await bus.js.publish(
        "planning.plan.approved",
        b'{"event_type": "planning.plan.approved", "producer": "x", "payload": {"story_id": "S-2", "roles": ["DEV"]}}',
    )
    sub = await bus.js.subscribe("deadletter.>", ordered_consumer=True)
    msg = await sub.next_msg(timeout=10)
    reason = msg.headers[ev.DeadLetterHeaders.REASON]
    assert msg.headers[ev.DeadLetterHeaders.CONSUMER] == "orchestrator-plan-approved"
    for missing in ("plan_id", "approved_by", "timestamp"):
        assert f"payload.{missing}: Field required" in reason


async def test_approval_for_a_role_without_council_is_recorded_failed(stub, bus):
    await stub.CreateCouncil(pb.CreateCouncilRequest(role="DEV"))
    rec = await Recorder().start(bus, "orchestration.deliberation.>")
    await bus.publish(approval(roles=("DEV", "DATA"), story="S-3"))
    [failed] = await rec.wait("orchestration.deliberation.failed", 1)
    assert failed.payload.role == "DATA" and "no council" in failed.payload.error
    await rec.wait("orchestration.deliberation.completed", 1)
