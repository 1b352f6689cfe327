"""GetContext latency (p50/p99) through real gRPC for a story with 1,000 decisions and 200 tasks, cold and cached.

    python -m bench.bench_context            (options: --decisions 1000 --tasks 200 --cold 200 --cached 1000)

Real servers on loopback: NATS, Valkey and FalkorDB (Bolt) from services.local.infra, and the context service as
its own process (`fleet serve context`, as in production). The story is written straight into the graph in bulk
(the shape the event handlers produce: tasks over five roles with dependencies; decisions affecting tasks, each
decided in a deliberation with its winning proposal). Then, per scenario:
  first   the very first call of a fresh service process (no cache, no token-count memo, new connections)
  cold    before each call an UpdateContext changes one decision (not timed): the write invalidates the story's
          cached contexts, so the call reads the graph and Valkey, selects, redacts, counts and renders
  cached  the same request again: served from the Valkey cache
Goal (issue 4): p99 <= 15 ms cached, <= 100 ms cold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.context.v1 import context_pb2 as pb
from fleet.context.v1 import context_pb2_grpc
from services.common.bus import connect_nats, provision_streams
from services.common.events import Role
from services.common.falkordb import batches
from services.common.settings import FleetSettings
from services.context.adapters.graph import GraphStore
from services.local.infra import LocalInfra
from services.local.processes import free_port

STORY = "S-bench"
ROLES = list(Role)
T0 = 1_790_000_000_000


async def seed(graph: GraphStore, tasks: int, decisions: int) -> None:
    await graph.delete_story(STORY)
    await graph.run(
        "MERGE (s:Story {id: $sid}) SET s.story_id = $sid, s.title = 'Benchmark story', "
        "s.description = 'A large story: many tasks, many decisions.' "
        "MERGE (p:Plan {story_id: $sid, id: 'P-1'}) SET p.approved_by = 'bench', p.approved_at = $t0, "
        "p.roles = ['DEV', 'QA', 'ARCHITECT', 'DEVOPS', 'DATA'] MERGE (s)-[:HAS_PLAN]->(p)",
        sid=STORY,
        t0=T0,
    )
    task_rows = [
        {
            "id": f"T-{i:03d}",
            "role": str(ROLES[i % len(ROLES)]),
            "priority": i % 11,
            "description": f"Task {i}: implement part {i} of the system with care for edge cases and tests.",
            "deps": [f"T-{j:03d}" for j in (i - 5, i - 7) if j >= 0],
        }
        for i in range(tasks)
    ]
    for group in batches(task_rows):
        await graph.run(
            "MATCH (p:Plan {story_id: $sid, id: 'P-1'}) UNWIND $rows AS r "
            "MERGE (t:Task {story_id: $sid, id: r.id}) SET t.role = r.role, t.priority = r.priority, "
            "t.description = r.description, t.depends_on = r.deps, t.status = 'PLANNED', t.title = '' "
            "MERGE (p)-[:HAS_TASK]->(t)",
            sid=STORY,
            rows=group,
        )
    await graph.run(
        "MATCH (a:Task {story_id: $sid}) UNWIND a.depends_on AS dep MATCH (b:Task {story_id: $sid, id: dep}) "
        "MERGE (a)-[:DEPENDS_ON]->(b)",
        sid=STORY,
    )
    decision_rows = []
    for i in range(decisions):
        task = i % tasks
        decision_rows.append(
            {
                "id": f"D-{i:04d}",
                "task": f"T-{task:03d}",
                "role": str(ROLES[task % len(ROLES)]),
                "title": f"Decision {i}: use approach {i % 17} for part {task}",
                "rationale": f"Approach {i % 17} keeps part {task} simple, testable and idempotent; "
                "the alternatives were slower or harder to operate.",
                "at": T0 + i * 1000,
                "content": f"## Proposal for part {task}\n" + f"Step {i}: do the thing carefully. " * 12,
            }
        )
    for group in batches(decision_rows, max_bytes=30_000):
        await graph.run(
            "UNWIND $rows AS r MATCH (t:Task {story_id: $sid, id: r.task}) "
            "MERGE (d:Decision {story_id: $sid, id: r.id}) SET d.title = r.title, d.rationale = r.rationale, "
            "d.status = 'ACCEPTED', d.decided_by = r.role + ' council', d.decided_at = r.at, d.alternatives = [], "
            "d.task_id = r.task, d.role = r.role, d.deliberation_id = 'dl-' + r.id, d.proposal_id = 'p-' + r.id "
            "MERGE (dl:Deliberation {story_id: $sid, id: 'dl-' + r.id}) SET dl.task_id = r.task, dl.role = r.role "
            "MERGE (p:Proposal {story_id: $sid, id: 'p-' + r.id}) SET p.author_id = 'agent-1', p.content = r.content, "
            "p.score = 7.5 MERGE (d)-[:DECIDED_IN]->(dl) MERGE (dl)-[:SELECTED]->(p) MERGE (d)-[:AFFECTS]->(t)",
            sid=STORY,
            rows=group,
        )


def change(n: int) -> pb.UpdateContextRequest:
    """A write to the story: decision D-<n> gets a new rationale (the graph changes, so its caches go)."""
    decision = pb.Decision(decision_id=f"D-{n % 1000:04d}", rationale=f"Revised rationale number {n}.")
    return pb.UpdateContextRequest(
        story_id=STORY, actor="bench", changes=[pb.ContextChange(operation=pb.OPERATION_UPDATE, decision=decision)]
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def spawn_service(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The context service as its own process (what `fleet serve context` runs), logging to `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", "from services.context.main import run; run()"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the context service exited with {proc.returncode}")
            try:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the context service did not start")
            await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-context-"))
        async with LocalInfra(Path(tmp) / "infra") as infra:
            settings = FleetSettings(nats_url=infra.nats_url, valkey_url=infra.valkey_url)
            nc = await connect_nats(infra.nats_url, "bench")
            await provision_streams(nc.jetstream(), settings)
            await nc.close()
            graph = GraphStore(infra.bolt_uri, "falkordb", "")
            t0 = time.perf_counter()
            await seed(graph, args.tasks, args.decisions)
            counts = await graph.counts(STORY)
            print(
                f"seeded {counts.get('node:Task', 0)} tasks, {counts.get('node:Decision', 0)} decisions, "
                f"{sum(v for k, v in counts.items() if k.startswith('edge:'))} edges in {time.perf_counter() - t0:.1f}s"
            )
            await graph.close()

            port = free_port("127.0.0.1")
            env = {**os.environ, **infra.env(), "GRPC_PORT": str(port), "METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}
            proc = spawn_service(env, Path(tmp) / "context.log")
            address = f"127.0.0.1:{port}"
            try:
                await wait_serving(address, proc)
                async with grpc.aio.insecure_channel(address) as ch:
                    stub = context_pb2_grpc.ContextServiceStub(ch)
                    rows = []
                    writes = 0
                    for role, phase, budget in args.scenarios:
                        request = pb.GetContextRequest(story_id=STORY, role=role, phase=phase, token_budget=budget)
                        t = time.perf_counter()
                        reply = await stub.GetContext(request)
                        first = (time.perf_counter() - t) * 1000
                        cold: list[float] = []
                        for i in range(args.cold + 3):  # the first three warm up
                            writes += 1
                            await stub.UpdateContext(change(writes))
                            t = time.perf_counter()
                            reply = await stub.GetContext(request)
                            if i >= 3:
                                cold.append((time.perf_counter() - t) * 1000)
                        cached: list[float] = []
                        for _ in range(args.cached):
                            t = time.perf_counter()
                            again = await stub.GetContext(request)
                            cached.append((time.perf_counter() - t) * 1000)
                        assert again.version == reply.version
                        label = f"{role}/{phase}/{budget}"
                        for kind, xs in (("first", [first]), ("cold", cold), ("cached", cached)):
                            rows.append(
                                (
                                    label,
                                    kind,
                                    len(xs),
                                    statistics.median(xs),
                                    percentile(xs, 99),
                                    max(xs),
                                    reply.token_count,
                                    len(reply.dropped),
                                )
                            )
                    print(f"\nGetContext latency (ms), tokenizer {reply.tokenizer}; goal p99 <= 15 cached, <= 100 cold")
                    head = (
                        f"{'scenario':<24}{'kind':<8}{'n':>6}{'p50':>9}{'p99':>9}{'max':>9}{'tokens':>8}{'dropped':>9}"
                    )
                    print(head)
                    print("-" * len(head))
                    for label, kind, n, p50, p99, mx, tokens, dropped in rows:
                        print(f"{label:<24}{kind:<8}{n:>6}{p50:>9.2f}{p99:>9.2f}{mx:>9.2f}{tokens:>8}{dropped:>9}")
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--cold", type=int, default=200, help="cold calls per scenario")
    p.add_argument("--cached", type=int, default=1000, help="cached calls per scenario")
    p.add_argument("--workdir", default="", help="keep the servers' data and logs here (default: a temp dir)")
    args = p.parse_args(argv)
    args.scenarios = [("DEV", "BUILD", 2048), ("ARCHITECT", "DESIGN", 8192)]
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
