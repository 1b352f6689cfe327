"""`fleet demo`: approve a sample plan on a running fleet, follow its deliberations live, fetch their results.

Only public interfaces are used, as a user's tools would: the approval is published to `planning.plan.approved`
(the catalog's model, the shared bus adapter), progress is read from the orchestrator's and agents' events on
NATS, and the results come from the orchestrator's `GetDeliberationResult` over gRPC.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import grpc
import nats

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.common.bus import EventBus
from services.common.errors import FleetError
from services.common.settings import FleetSettings

WATCHED = (ev.Streams.ORCHESTRATOR_EVENTS, ev.Streams.AGENT_RESPONSES)  # what the demo reports progress from


SLUGIFY_TESTS = """from solution import slugify


def test_lowercases_and_joins_words_with_dashes():
    assert slugify("Hello World") == "hello-world"


def test_drops_punctuation():
    assert slugify("Hello, World!") == "hello-world"


def test_collapses_spaces():
    assert slugify("  many   spaces  ") == "many-spaces"
"""


def sample_plan(approved_by: str = "demo@swe-ai-fleet") -> ev.PlanApproved:
    """A small plan for two councils: DEV writes a function against visible tests, then QA writes tests for DEV's
    winning code (QA's task depends on DEV's: it starts when DEV's completed, and its tests run against that code)."""
    story = f"DEMO-{uuid.uuid4().hex[:6]}"
    return ev.PlanApproved(
        story_id=story,
        plan_id="P-1",
        approved_by=approved_by,
        timestamp=datetime.now(UTC),
        title="URL slugs for blog posts",
        description="Posts get a readable, unique URL slug derived from their title.",
        roles=[ev.Role.DEV, ev.Role.QA],
        tasks=[
            ev.PlanTask(
                task_id=f"{story}-slugify",
                role=ev.Role.DEV,
                description="Write a Python function slugify(title: str) -> str: lowercase ASCII words joined by '-'.",
                tests=SLUGIFY_TESTS,
            ),
            ev.PlanTask(
                task_id=f"{story}-tests",
                role=ev.Role.QA,
                description="Write pytest tests for slugify: punctuation, spaces, empty titles, long titles.",
                depends_on=[f"{story}-slugify"],
            ),
        ],
    )


async def publish_approval(nats_url: str, approval: ev.PlanApproved) -> str:
    """Publish a plan approval as the product owner's UI does; answers a one-line receipt."""
    bus = await EventBus.connect(FleetSettings(nats_url=nats_url, metrics_port=0), ev.PO_UI)
    try:
        event = ev.make_event(approval, ev.PO_UI, correlation_id=f"{approval.story_id}:{approval.plan_id}"[:128])
        ack = await bus.publish(event)
        return f"published {event.event_type} {event.event_id} (stream {ack.stream}, seq {ack.seq})"
    finally:
        await bus.close()


async def follow(
    endpoints: Mapping[str, str],
    approval: ev.PlanApproved,
    say: Callable[[str], None],
    timeout: float = 900.0,
) -> list[dpb.DeliberationResult]:
    """Publish `approval`, report its deliberations' progress until each requested role ended, return the results.

    Raises FleetError naming the roles still running when `timeout` passes."""
    roles = {str(r) for r in (approval.roles or list(ev.Role))}
    ended: dict[str, str] = {}  # role -> task id
    mine: dict[str, str] = {}  # deliberation id -> role
    done = asyncio.Event()
    t0 = time.monotonic()

    def stamp() -> str:
        return f"[{time.monotonic() - t0:6.1f}s]"

    async def on_event(msg) -> None:
        try:
            event = ev.parse_event(msg.data, msg.subject)
        except ev.InvalidEvent:
            return
        p = event.payload
        if isinstance(p, ev.DeliberationStarted) and p.story_id == approval.story_id:
            mine[p.deliberation_id] = str(p.role)
            say(f"{stamp()} {p.role}: council {p.council_id} started on {p.task_id} ({p.num_agents} agents)")
        elif isinstance(p, ev.AgentResponseCompleted | ev.AgentResponseFailed) and p.deliberation_id in mine:
            what = "answered" if isinstance(p, ev.AgentResponseCompleted) else f"FAILED ({p.error[:80]})"
            say(f"{stamp()} {mine[p.deliberation_id]}: {p.agent_id} {what} {p.phase}")
        elif isinstance(p, ev.DeliberationCompleted | ev.DeliberationFailed) and p.story_id == approval.story_id:
            ended[str(p.role)] = p.task_id
            outcome = "completed" if isinstance(p, ev.DeliberationCompleted) else f"ended {p.status}: {p.error}"
            say(f"{stamp()} {p.role}: deliberation {outcome} ({len(ended)}/{len(roles)})")
            if roles <= set(ended):
                done.set()

    nc = await nats.connect(endpoints["nats"], connect_timeout=5, max_reconnect_attempts=3)
    try:
        subjects = [s for name in WATCHED for s in ev.STREAMS[name].subjects]
        subs = [await nc.subscribe(subject, cb=on_event) for subject in subjects]
        say(await publish_approval(endpoints["nats"], approval))
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            missing = ", ".join(sorted(roles - set(ended)))
            raise FleetError(f"no outcome within {timeout:.0f} s for {missing}") from None
        for sub in subs:
            await sub.unsubscribe()
    finally:
        await nc.close()

    async with grpc.aio.insecure_channel(endpoints["orchestrator"]) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        return [
            (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=ended[role]))).result
            for role in sorted(ended)
        ]
