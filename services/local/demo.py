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

import httpx
import nats

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import auth
from services.common import events as ev
from services.common.errors import FleetError, Unavailable
from services.local.fleet import user_token
from services.local.live import CouncilBoard

WATCHED = (ev.Streams.ORCHESTRATOR_EVENTS, ev.Streams.AGENT_RESPONSES)  # what the demo reports progress from
LIVE = (ev.Streams.AGENT_REQUESTS, ev.Streams.TOKEN_STREAMS)  # and, for the live view, calls and their tokens


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


async def publish_approval(monitoring_url: str, approval: ev.PlanApproved, token: str = "") -> str:
    """Approve a plan as the product owner's page does (POST /api/approve-plan with the caller's token and one
    Idempotency-Key: a retry is published once); answers a one-line receipt, FleetError saying why it was refused."""
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = approval.model_dump(mode="json", exclude_defaults=True)
    async with httpx.AsyncClient(base_url=monitoring_url, timeout=30) as http:
        try:
            reply = await http.post("/api/approve-plan", json=body, headers=headers)
        except httpx.HTTPError as e:
            raise Unavailable(f"monitoring at {monitoring_url}: {type(e).__name__}: {e}") from None
    if reply.status_code != 201:
        json_body = reply.headers.get("content-type", "").startswith("application/json")
        raise FleetError(
            f"approve-plan refused ({reply.status_code}): {reply.json()['detail'] if json_body else reply.text}"
        )
    a = reply.json()
    return f"published {a['event_type']} {a['event_id']} (stream {a['stream']}, seq {a['seq']})"


async def follow(
    endpoints: Mapping[str, str],
    approval: ev.PlanApproved,
    say: Callable[[str], None],
    timeout: float = 900.0,
    board: CouncilBoard | None = None,
) -> list[dpb.DeliberationResult]:
    """Publish `approval`, report its deliberations' progress until each requested role ended, return the results.

    `say` gets a line per deliberation started or ended and, without a `board`, per agent answer; a `board` is fed
    every event of these deliberations, the agents' calls and streamed tokens included (the live view).
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
        if board is not None and getattr(p, "deliberation_id", None) in mine:
            board.feed(p)
        if isinstance(p, ev.AgentResponseCompleted | ev.AgentResponseFailed) and p.deliberation_id in mine:
            if board is None:  # without the live view, a line per answer
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
        watched = (*WATCHED, *LIVE) if board is not None else WATCHED
        subjects = [s for name in watched for s in ev.STREAMS[name].subjects]
        subs = [await nc.subscribe(subject, cb=on_event) for subject in subjects]
        say(await publish_approval(endpoints["monitoring"], approval, user_token(endpoints)))
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            missing = ", ".join(sorted(roles - set(ended)))
            raise FleetError(f"no outcome within {timeout:.0f} s for {missing}") from None
        for sub in subs:
            await sub.unsubscribe()
    finally:
        await nc.close()

    async with auth.channel(endpoints["orchestrator"], auth.BearerToken(value=user_token(endpoints))) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        return [
            (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=ended[role]))).result
            for role in sorted(ended)
        ]
