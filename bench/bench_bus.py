"""Event bus throughput: our adapter vs raw nats-py, side by side in one run on one NATS server.

    make bench-bus            (or: python -m bench.bench_bus --messages 20000 --repeats 3)

Three measurements, each alternating raw / adapter `--repeats` times (the machine is noisy; the median of
each side is reported, and the ratio adapter ÷ raw), as throughput and as this process's CPU time per message
(user + system: steadier than throughput on a shared machine, where the other processes take the cores; the CPU
ratio is raw's CPU ÷ the adapter's, so that above 1 is better for both ratios):
  1. sequential publish-with-ack (one awaited publish at a time)
  2. concurrent publish-with-ack (up to 512 acks in flight)
  3. consume + ack of a stream's backlog (raw: fetch(500) + ack; adapter: durable consumer, envelope
     validation, handler, ack; with and without the Valkey seen-set)
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from services.common import events as c
from services.common.bus import EventBus, connect_nats, provision_streams
from services.common.settings import FleetSettings
from services.common.valkey import SeenSet, connect_valkey
from services.local.infra import LocalInfra

SUBJECT = "planning.plan.approved"
SPEC = c.CONSUMERS["orchestrator-plan-approved"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_events(n: int) -> list[c.Envelope]:
    now = datetime.now(UTC)
    return [
        c.make_event(
            c.PlanApproved(story_id=f"S-{i}", plan_id="P-1", approved_by="bench", timestamp=now, roles=[c.Role.DEV]),
            "bench",
        )
        for i in range(n)
    ]


async def reset(bus: EventBus) -> None:
    await bus.js.purge_stream(c.Streams.PLANNING_EVENTS)
    try:
        await bus.js.delete_consumer(c.Streams.PLANNING_EVENTS, SPEC.durable)
    except Exception:
        pass


async def raw_sequential(bus: EventBus, events: list[c.Envelope]) -> float:
    js = bus.js
    t0 = time.perf_counter()
    for e in events:
        await js.publish(SUBJECT, e.to_json(), headers={"Nats-Msg-Id": e.event_id})
    return len(events) / (time.perf_counter() - t0)


async def ours_sequential(bus: EventBus, events: list[c.Envelope]) -> float:
    t0 = time.perf_counter()
    for e in events:
        await bus.publish(e)
    return len(events) / (time.perf_counter() - t0)


async def raw_concurrent(bus: EventBus, events: list[c.Envelope]) -> float:
    js, sem = bus.js, asyncio.Semaphore(512)

    async def one(e: c.Envelope) -> None:
        async with sem:
            await js.publish(SUBJECT, e.to_json(), headers={"Nats-Msg-Id": e.event_id})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(e) for e in events))
    return len(events) / (time.perf_counter() - t0)


async def ours_concurrent(bus: EventBus, events: list[c.Envelope]) -> float:
    t0 = time.perf_counter()
    await bus.publish_many(events, in_flight=512)
    return len(events) / (time.perf_counter() - t0)


async def raw_consume(bus: EventBus, n: int) -> float:
    await bus.ensure_consumer(SPEC)
    sub = await bus.js.pull_subscribe_bind(durable=SPEC.durable, stream=SPEC.stream)
    done = 0
    t0 = time.perf_counter()
    while done < n:
        msgs = await sub.fetch(500, timeout=5)
        for m in msgs:
            await m.ack()
        done += len(msgs)
    rate = n / (time.perf_counter() - t0)
    await sub.unsubscribe()
    return rate


async def ours_consume(bus: EventBus, n: int) -> float:
    done = asyncio.Event()
    count = 0

    async def handler(env: c.Envelope) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    t0 = time.perf_counter()
    consumer = await bus.consume(SPEC, handler, concurrency=500)
    await asyncio.wait_for(done.wait(), 120)
    rate = n / (time.perf_counter() - t0)
    await consumer.stop()
    bus._consumers.remove(consumer)
    return rate


async def main(n_messages: int, n_sequential: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalInfra(Path(tmp), components=("nats", "valkey")) as infra:
        settings = FleetSettings(nats_url=infra.nats_url, valkey_url=infra.valkey_url, metrics_port=0)
        nc = await connect_nats(settings.nats_url, "bench")
        await provision_streams(nc.jetstream(), settings)
        await nc.close()
        bus = await EventBus.connect(settings, "bench")
        seen_client = connect_valkey(settings.valkey_url)
        bus_seen = await EventBus.connect(settings, "bench-seen", seen=SeenSet(seen_client, 3600))
        results: dict[str, dict[str, list[float]]] = {}
        cpu: dict[str, dict[str, list[float]]] = {}  # CPU µs per message
        mark = [0.0]

        def start() -> None:
            mark[0] = cpu_seconds()

        def record(name: str, side: str, rate: float, n: int) -> None:
            results.setdefault(name, {}).setdefault(side, []).append(rate)
            cpu.setdefault(name, {}).setdefault(side, []).append((cpu_seconds() - mark[0]) * 1e6 / n)

        for _ in range(repeats):
            for side, fn in (("raw", raw_sequential), ("adapter", ours_sequential)):
                await reset(bus)
                events = make_events(n_sequential)
                start()
                record("publish sequential", side, await fn(bus, events), n_sequential)
            for side, fn in (("raw", raw_concurrent), ("adapter", ours_concurrent)):
                await reset(bus)
                events = make_events(n_messages)
                start()
                record("publish concurrent", side, await fn(bus, events), n_messages)
            for side in ("raw", "adapter", "adapter+seen-set"):
                await reset(bus)
                await seen_client.flushdb()
                await bus.publish_many(make_events(n_messages))
                start()
                if side == "raw":
                    rate = await raw_consume(bus, n_messages)
                else:
                    rate = await ours_consume(bus if side == "adapter" else bus_seen, n_messages)
                record("consume + ack", side, rate, n_messages)
        await bus.close()
        await bus_seen.close()
        await seen_client.aclose()

    print(f"\nbus throughput, msg/s (median of {repeats}; {n_messages} msgs, {n_sequential} sequential)")
    print(
        f"{'measurement':<22}{'raw nats-py':>14}{'adapter':>12}{'ratio':>8}"
        f"{'raw CPU µs/msg':>16}{'adapter':>10}{'ratio':>8}   notes"
    )
    for name, sides in results.items():
        raw = statistics.median(sides["raw"])
        raw_cpu = statistics.median(cpu[name]["raw"])
        for side, rates in sides.items():
            if side == "raw":
                continue
            ours, ours_cpu = statistics.median(rates), statistics.median(cpu[name][side])
            note = "" if side == "adapter" else side
            print(
                f"{name:<22}{raw:>14,.0f}{ours:>12,.0f}{ours / raw:>8.2f}"
                f"{raw_cpu:>16.1f}{ours_cpu:>10.1f}{raw_cpu / ours_cpu:>8.2f}   {note}"
            )
    if "adapter+seen-set" in cpu.get("consume + ack", {}):
        seen = statistics.median(cpu["consume + ack"]["adapter+seen-set"]) - statistics.median(
            cpu["consume + ack"]["adapter"]
        )
        print(f"the Valkey seen-set's own cost: {seen:.1f} µs CPU per message here (+ Valkey's), 2 round trips")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sequential", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.messages, args.sequential, args.repeats))
