"""The event bus against a real NATS JetStream (and Valkey for the seen-set)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.common import events as c
from services.common.bus import EventBus, connect_nats, provision_streams
from services.common.settings import FleetSettings
from services.common.valkey import Claim, SeenSet, connect_valkey

pytestmark = pytest.mark.integration
SPEC = c.CONSUMERS["orchestrator-plan-approved"]


def approval(story: str = "S-1") -> c.Envelope:
    payload = c.PlanApproved(story_id=story, plan_id="P-1", approved_by="po", timestamp=datetime.now(UTC))
    return c.make_event(payload, c.PO_UI, correlation_id="cid")


@pytest.fixture
async def bus(settings: FleetSettings):
    seen = SeenSet(connect_valkey(settings.valkey_url), ttl_seconds=60)
    bus = await EventBus.connect(settings, "test", seen=seen)
    await provision_streams(bus.js, settings)
    yield bus
    await bus.close()
    await seen.client.aclose()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def dead_letters(bus: EventBus, expected: int = 1, timeout: float = 10.0) -> list:
    sub = await bus.js.subscribe(f"{c.DEAD_LETTER_PREFIX}.>", stream=c.Streams.DEAD_LETTERS, ordered_consumer=True)
    msgs = []
    try:
        async with asyncio.timeout(timeout):
            while len(msgs) < expected:
                msgs.append(await sub.next_msg(timeout=timeout))
    finally:
        await sub.unsubscribe()
    return msgs


async def test_publish_consume_round_trip(bus: EventBus):
    got: list[c.Envelope] = []

    async def handler(env: c.Envelope) -> None:
        got.append(env)

    sent = approval()
    ack = await bus.publish(sent)
    assert ack.stream == c.Streams.PLANNING_EVENTS
    await bus.consume(SPEC, handler)
    await wait_for(lambda: got)
    assert got[0].event_id == sent.event_id and got[0].payload == sent.payload
    await asyncio.sleep(0.3)
    info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


async def test_repeated_event_id_is_stored_and_handled_once(bus: EventBus):
    sent = approval()
    first = await bus.publish(sent)
    again = await bus.publish(sent)
    assert not first.duplicate and again.duplicate
    # A copy that slips past the stream's duplicate window (no Nats-Msg-Id here) meets the seen-set.
    await bus.js.publish(sent.subject, sent.to_json())
    assert (await bus.js.stream_info(c.Streams.PLANNING_EVENTS)).state.messages == 2
    calls: list[str] = []

    async def handler(env: c.Envelope) -> None:
        calls.append(env.event_id)

    await bus.consume(SPEC, handler)
    await wait_for(lambda: len(calls) >= 1)
    info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
    async with asyncio.timeout(10):
        while info.num_ack_pending or info.num_pending:
            await asyncio.sleep(0.05)
            info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
    assert calls == [sent.event_id]


async def test_invalid_event_is_dead_lettered_after_one_delivery(bus: EventBus):
    calls = []

    async def handler(env: c.Envelope) -> None:
        calls.append(env)

    bad = b'{"event_type": "planning.plan.approved", "producer": "po-ui", "payload": {"story_id": "S-9"}}'
    ack = await bus.js.publish("planning.plan.approved", bad)
    await bus.consume(SPEC, handler)
    [dead] = await dead_letters(bus)
    h = dead.headers
    assert dead.subject == "deadletter.planning.plan.approved"
    assert dead.data == bad
    assert "payload.plan_id: Field required" in h[c.DeadLetterHeaders.REASON]
    assert "payload.approved_by: Field required" in h[c.DeadLetterHeaders.REASON]
    assert h[c.DeadLetterHeaders.STREAM] == c.Streams.PLANNING_EVENTS
    assert h[c.DeadLetterHeaders.CONSUMER] == SPEC.durable
    assert h[c.DeadLetterHeaders.DELIVERIES] == "1"
    assert h[c.DeadLetterHeaders.STREAM_SEQ] == str(ack.seq)
    await asyncio.sleep(0.5)
    info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert calls == []


async def test_not_json_is_dead_lettered(bus: EventBus):
    await bus.js.publish("planning.plan.approved", b"\xff not json")
    await bus.consume(SPEC, lambda env: asyncio.sleep(0))
    [dead] = await dead_letters(bus)
    assert dead.headers[c.DeadLetterHeaders.REASON].startswith("not JSON")


async def test_failing_handler_is_retried_then_dead_lettered(bus: EventBus, settings: FleetSettings):
    attempts: list[float] = []

    async def handler(env: c.Envelope) -> None:
        attempts.append(asyncio.get_running_loop().time())
        raise RuntimeError("graph down")

    sent = approval()
    await bus.publish(sent)
    await bus.consume(SPEC, handler)
    [dead] = await dead_letters(bus)
    assert len(attempts) == settings.consumer_max_deliver == 3
    assert attempts[1] - attempts[0] >= 0.09  # nak with backoff, not an immediate redelivery
    reason = dead.headers[c.DeadLetterHeaders.REASON]
    assert "handler failed after 3 deliveries" in reason and "graph down" in reason
    assert dead.headers[c.DeadLetterHeaders.EVENT_ID] == sent.event_id
    await asyncio.sleep(0.5)
    assert len(attempts) == 3  # terminated: never redelivered again
    # The failure released the seen-set lease, so a later copy of the event could still be handled.
    assert await bus.seen.claim(SPEC.durable, sent.event_id, 1) is Claim.NEW


async def test_handler_that_recovers_is_acked_once(bus: EventBus):
    attempts = []

    async def handler(env: c.Envelope) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")

    await bus.publish(approval())
    await bus.consume(SPEC, handler)
    await wait_for(lambda: len(attempts) == 2)
    await asyncio.sleep(0.5)
    assert len(attempts) == 2


async def test_a_handler_longer_than_the_ack_wait_is_not_redelivered(settings: FleetSettings):
    """Heartbeats keep a message while its handler runs. Without a seen-set to hide it, a redelivery would run the
    handler a second time."""
    runs = []

    async def handler(env: c.Envelope) -> None:
        runs.append(env.event_id)
        await asyncio.sleep(settings.consumer_ack_wait_seconds * 2.5)

    bus = await EventBus.connect(settings, "test-long")
    try:
        await provision_streams(bus.js, settings)
        await bus.publish_many([approval("S-long-1"), approval("S-long-2")])
        await bus.consume(SPEC, handler, concurrency=4)
        await wait_for(lambda: len(runs) == 2)
        info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
        while info.num_ack_pending:
            await asyncio.sleep(0.1)
            info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
        assert len(runs) == len(set(runs)) == 2
    finally:
        await bus.close()


async def test_concurrent_handlers(bus: EventBus):
    active, peak = 0, 0

    async def handler(env: c.Envelope) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.3)
        active -= 1

    await bus.publish_many([approval(f"S-{i}") for i in range(6)])
    await bus.consume(SPEC, handler, concurrency=3)
    await wait_for(lambda: peak == 3)
    info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
    while info.num_ack_pending or info.num_pending:
        await asyncio.sleep(0.05)
        info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)


async def test_stream_provisioning_is_idempotent(settings: FleetSettings):
    nc = await connect_nats(settings.nats_url, "test")
    js = nc.jetstream()
    try:
        first = await provision_streams(js, settings)
        assert set(first.values()) == {"created"} and set(first) == set(c.STREAMS)
        second = await provision_streams(js, settings)
        assert set(second.values()) == {"unchanged"}
        changed = await provision_streams(js, settings.model_copy(update={"stream_max_bytes": 1 << 20}))
        assert changed[c.Streams.PLANNING_EVENTS] == "updated"
        info = await js.stream_info(c.Streams.PLANNING_EVENTS)
        assert (
            info.config.max_bytes == 1 << 20
            and str(getattr(info.config.retention, "value", info.config.retention)) == "limits"
        )
        assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"
        tokens = await js.stream_info(c.Streams.TOKEN_STREAMS)
        assert tokens.config.max_age == c.STREAMS[c.Streams.TOKEN_STREAMS].max_age_seconds
    finally:
        await nc.close()


async def test_a_publish_no_stream_takes_is_tried_again_then_unavailable(bus: EventBus, settings: FleetSettings):
    """No stream stores the subject (here: its stream deleted; in production a stream between leaders): three
    attempts, 0.5 s then 1 s apart, then Unavailable naming the event; once the stream is back the same event is
    stored."""
    from services.common.errors import Unavailable

    sent = approval()
    await bus.js.delete_stream(c.Streams.PLANNING_EVENTS)
    try:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable, match=r"NATS publish of planning\.plan\.approved failed after 3 attempts"):
            await bus.publish(sent, timeout=1.0)
        assert asyncio.get_running_loop().time() - t0 >= 1.5
    finally:
        await provision_streams(bus.js, settings)
    ack = await bus.publish(sent)
    assert ack.stream == c.Streams.PLANNING_EVENTS and not ack.duplicate


async def test_a_publish_sent_again_is_stored_once(bus: EventBus):
    """What makes trying again safe: a second publish of one event (its ack lost) is dropped by the stream."""
    sent = approval()
    first, second = await bus.publish(sent), await bus.publish(sent)
    assert not first.duplicate and second.duplicate and second.seq == first.seq


async def test_unreachable_nats_is_unavailable():
    from services.common.errors import Unavailable
    from services.local.processes import free_port

    with pytest.raises(Unavailable, match="unreachable"):
        await connect_nats(f"nats://127.0.0.1:{free_port()}", "test", connect_timeout=1)
