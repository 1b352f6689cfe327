"""Deliberation overhead and role parallelism, against an OpenAI-compatible server that answers after a fixed delay.

    make bench-deliberation     (or: python -m bench.bench_deliberation --delay-ms 200 --repeats 3)

A real orchestrator (in-process executor) on real NATS + Valkey, over gRPC, as users call it. Three measurements:
  1. one deliberation (`Deliberate`, 3 agents, 1 review round): wall time ÷ its critical path of LLM calls.
     The engine's LLM phases run one after another and the calls inside a phase concurrently, so the critical
     path is (number of LLM phases that made calls) × the server's fixed delay. Goal ≤ 1.05.
  2. a plan approval for five roles ÷ the same approval for one role (publish → every deliberation completed,
     observed on `orchestration.deliberation.completed`). Goal ≤ 1.3: the roles really run in parallel.
  3. grounding: one deliberation of a task with visible tests, its proposals' code executed in the real sandbox
     service (bwrap) at every CHECK ÷ the same deliberation with nothing executed (no SANDBOX_ADDRESS). The agents'
     answers are a correct slugify, so every execution runs the tests. Goal ≤ 1.15.
Alternating runs, median reported (the machine is noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.common.bus import EventBus, provision_streams
from services.local.demo import SLUGIFY_TESTS
from services.local.infra import LocalInfra
from services.orchestrator.main import start
from services.orchestrator.settings import OrchestratorSettings
from services.sandbox.main import start as start_sandbox
from services.sandbox.settings import SandboxSettings
from tests.openai_server import start_openai_server

SLUGIFY = (
    "```python\nimport re\n\n\ndef slugify(title):\n    return '-'.join(re.findall(r'[a-z0-9]+', title.lower()))\n```\n"
)

TASK = "Write a Python function that parses ISO-8601 dates, with tests."


async def one_deliberation(stub, delay_s: float, repeat: int) -> tuple[float, float, float]:
    """(client wall s, engine wall s, critical path s) of one Deliberate."""
    request = pb.DeliberateRequest(
        task_id=f"T-bench-{repeat}-{uuid.uuid4().hex[:6]}",
        task_description=TASK,
        role="DEV",
        constraints=dpb.Constraints(timeout_seconds=120, rounds=1),
    )
    t0 = time.perf_counter()
    reply = (await stub.Deliberate(request)).result
    wall = time.perf_counter() - t0
    if reply.status != dpb.DELIBERATION_STATUS_COMPLETED:
        raise SystemExit(f"deliberation ended {reply.status}: {reply.error_message}")
    llm_phases = {u.phase for u in reply.usage}
    return wall, reply.duration_ms / 1000, len(llm_phases) * delay_s


async def grounded(stub, repeat: int) -> float:
    """Wall seconds of one Deliberate of a task with visible tests (whether its code runs depends on the server)."""
    request = pb.DeliberateRequest(
        task_id=f"T-grounded-{repeat}-{uuid.uuid4().hex[:6]}",
        task_description="Write slugify(title) -> str: lowercase ASCII words joined by '-'.",
        role="DEV",
        constraints=dpb.Constraints(timeout_seconds=120, rounds=1, tests=SLUGIFY_TESTS),
    )
    t0 = time.perf_counter()
    reply = (await stub.Deliberate(request)).result
    if reply.status != dpb.DELIBERATION_STATUS_COMPLETED:
        raise SystemExit(f"deliberation ended {reply.status}: {reply.error_message}")
    return time.perf_counter() - t0


async def approval(bus: EventBus, roles: list[ev.Role]) -> float:
    """Seconds from publishing a plan approval for `roles` to the last of their deliberations completing."""
    story = f"S-bench-{uuid.uuid4().hex[:8]}"
    done: set[str] = set()
    all_done = asyncio.Event()

    async def on_completed(msg) -> None:
        event = ev.parse_event(msg.data, msg.subject)
        if event.payload.story_id == story:
            done.add(str(event.payload.role))
            if len(done) == len(roles):
                all_done.set()

    sub = await bus.nc.subscribe(ev.PAYLOAD_TYPES[ev.DeliberationCompleted].subject_pattern, cb=on_completed)
    payload = ev.PlanApproved(
        story_id=story, plan_id="P-1", approved_by="bench", timestamp=datetime.now(UTC), title=TASK, roles=roles
    )
    t0 = time.perf_counter()
    await bus.publish(ev.make_event(payload, ev.PO_UI))
    await asyncio.wait_for(all_done.wait(), 300)
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return elapsed


async def main(args: argparse.Namespace) -> None:
    delay_s = args.delay_ms / 1000
    server = start_openai_server(delay_ms=args.delay_ms)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with LocalInfra(Path(tmp) / "infra", components=("nats", "valkey")) as infra:
                settings = OrchestratorSettings(
                    nats_url=infra.nats_url,
                    valkey_url=infra.valkey_url,
                    grpc_port=0,
                    metrics_port=0,
                    vllm_url=server.url,
                    vllm_model="bench",
                    approval_concurrency=8,
                    log_level="WARNING",
                )
                bus = await EventBus.connect(settings, "bench")
                await provision_streams(bus.js, settings)
                sandbox = await start_sandbox(
                    SandboxSettings(grpc_port=0, metrics_port=0, sandbox_uid_base=280_000, log_level="WARNING"),
                    host="127.0.0.1",
                )
                orchestrator = await start(settings, host="127.0.0.1")
                executing = await start(
                    settings.model_copy(update={"sandbox_address": f"127.0.0.1:{sandbox.port}"}), host="127.0.0.1"
                )
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}")
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                executing_channel = grpc.aio.insecure_channel(f"127.0.0.1:{executing.port}")
                executing_stub = orchestrator_pb2_grpc.OrchestratorServiceStub(executing_channel)
                for role in ev.Role:
                    await stub.CreateCouncil(pb.CreateCouncilRequest(role=role, num_agents=3))
                try:
                    await one_deliberation(stub, delay_s, -1)  # warm-up: imports, ruff's first run, connections
                    single = [await one_deliberation(stub, delay_s, i) for i in range(args.repeats)]
                    one_role, five_roles = [], []
                    for _ in range(args.repeats):
                        one_role.append(await approval(bus, [ev.Role.DEV]))
                        five_roles.append(await approval(bus, list(ev.Role)))
                    server.control(answer_when_contains={"You are agent-dev-": SLUGIFY})
                    await grounded(executing_stub, -1)  # warm-up: the sandbox's first executions
                    off, on = [], []
                    for i in range(args.repeats):
                        off.append(await grounded(stub, i))
                        on.append(await grounded(executing_stub, i))
                finally:
                    await channel.close()
                    await executing_channel.close()
                    await orchestrator.stop(1.0)
                    await executing.stop(1.0)
                    await sandbox.stop(1.0)
                    await bus.close()
    finally:
        server.stop()

    wall = statistics.median(s[0] for s in single)
    engine = statistics.median(s[1] for s in single)
    critical = statistics.median(s[2] for s in single)
    one, five = statistics.median(one_role), statistics.median(five_roles)
    print(f"\ndeliberation benchmark: LLM server delay {args.delay_ms} ms, median of {args.repeats}")
    print(f"{'measurement':<44}{'seconds':>10}{'ratio':>8}   goal")
    print(f"{'critical path (LLM phases x delay)':<44}{critical:>10.3f}")
    print(f"{'one deliberation, engine wall time':<44}{engine:>10.3f}{engine / critical:>8.3f}   <= 1.05")
    print(f"{'one deliberation, Deliberate RPC wall time':<44}{wall:>10.3f}{wall / critical:>8.3f}")
    print(f"{'plan approval, one role (DEV)':<44}{one:>10.3f}")
    print(f"{'plan approval, five roles':<44}{five:>10.3f}{five / one:>8.3f}   <= 1.3 (÷ one role)")
    off_s, on_s = statistics.median(off), statistics.median(on)
    print(f"{'task with tests, nothing executed':<44}{off_s:>10.3f}")
    print(f"{'task with tests, code run in the sandbox':<44}{on_s:>10.3f}{on_s / off_s:>8.3f}   <= 1.15 (÷ not run)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay-ms", type=int, default=200, help="the LLM server's fixed answer delay")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
