"""The context service in-process over real gRPC, with real NATS, Valkey and FalkorDB (Bolt) from the fixtures."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from fleet.context.v1 import context_pb2_grpc
from services.common import events as ev
from services.common.bus import EventBus
from services.context.adapters.graph import GraphStore
from services.context.main import start


@pytest.fixture
async def service(ctx_settings, bus):
    running = await start(ctx_settings, host="127.0.0.1")
    yield running
    await running.stop(0.5)


@pytest.fixture
async def stub(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield context_pb2_grpc.ContextServiceStub(channel)


@pytest.fixture
async def graph(bolt_uri):
    """The graph through the official neo4j driver (our adapter's session handling), for assertions."""
    store = GraphStore(bolt_uri, "falkordb", "", connect_timeout=2.0)
    yield store
    await store.close()


@pytest.fixture
def story_id() -> str:
    """Stories are kept apart by id: FalkorDB's Bolt port puts every query in one graph (see adapters/graph.py)."""
    return f"S-{uuid.uuid4().hex[:10]}"


T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def plan_event(story_id: str, plan_id: str = "P-1", tasks=None, *, at: datetime = T0, **extra) -> ev.Envelope:
    if tasks is None:
        tasks = [
            ev.PlanTask(task_id="T-api", description="Build the REST API for orders", role="DEV", priority=5),
            ev.PlanTask(
                task_id="T-db",
                description="Design the orders schema",
                role="DATA",
                priority=7,
            ),
            ev.PlanTask(
                task_id="T-svc",
                description="Implement the order service",
                role="DEV",
                priority=3,
                depends_on=["T-db"],
                requirements=["idempotent writes"],
            ),
            ev.PlanTask(task_id="T-e2e", description="End-to-end tests of ordering", role="QA", depends_on=["T-svc"]),
        ]
    fields = {
        "approved_by": "po@example.com",
        "title": "Order management",
        "description": "Customers place and track orders.",
        "roles": ["DEV", "QA", "DATA"],
        **extra,
    }
    payload = ev.PlanApproved(story_id=story_id, plan_id=plan_id, timestamp=at, tasks=tasks, **fields)
    return ev.make_event(payload, ev.PO_UI)


def deliberation_event(
    story_id: str,
    task_id: str = "T-svc",
    role: str = "DEV",
    deliberation_id: str = "",
    *,
    content: str = "# Use an outbox table for idempotent writes\nWrite the order and the event in one transaction.",
    at: datetime = T0 + timedelta(hours=1),
    story_in_payload: bool = True,
) -> ev.Envelope:
    deliberation_id = deliberation_id or f"delib-{uuid.uuid4().hex[:8]}"
    payload = ev.DeliberationCompleted(
        deliberation_id=deliberation_id,
        task_id=task_id,
        role=role,
        story_id=story_id if story_in_payload else "",
        plan_id="P-1",
        winner_id="agent-2",
        winner_proposal_id=f"{deliberation_id}-p2",
        winner_content=content,
        winner_score=8.25,
        selection_method="ARCHITECT",
        rationale="Simplest design that keeps writes idempotent.",
        checks_passed=3,
        duration_ms=1200,
        total_tokens=900,
        context_version="abc",
    )
    return ev.make_event(payload, ev.ORCHESTRATOR).model_copy(update={"occurred_at": at})


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


async def drained(bus: EventBus, durable: str, timeout: float = 10.0) -> None:
    """Wait until a durable consumer has acknowledged everything in its stream."""
    spec = ev.CONSUMERS[durable]

    async def done():
        info = await bus.js.consumer_info(spec.stream, durable)
        return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0

    await wait_for(done, timeout)


async def stream_messages(bus: EventBus, stream: str, subject: str) -> list:
    """Every message of `stream` on `subject` (an ephemeral ordered read)."""
    out = []
    info = await bus.js.stream_info(stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except Exception:
            continue
        if msg.subject == subject:
            out.append(msg)
    return out
