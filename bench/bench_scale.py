"""One orchestrator under N concurrent deliberations: does it stay off the critical path?

    make bench-scale            (or: python -m bench.bench_scale --sizes 1,10,50,100,200 --repeats 3)
    EXECUTOR=ray make bench-scale      (the orchestrator hands every deliberation to the ray-executor service)

A real orchestrator served in this process over real gRPC, on real NATS JetStream + Valkey (their own processes),
against the loopback OpenAI-compatible server (its own process) answering every call after a fixed delay
(default 0.5 s). N `Deliberate` calls at once (3 agents, 1 review round, one ARCHITECT selection: 13 agent calls
each), for N in --sizes, --repeats times (sizes in order, then again: the machine is shared and noisy). Per N:
  wall / single   the batch's wall time ÷ one deliberation's (the median N = 1 batch of the same run); 1.0 means
                  N deliberations cost what one does: the orchestrator is not the bottleneck
  p50 / p99       per-call latency of `Deliberate` (client side), seconds
  CPU ms / call   this process's CPU time (user + system, every thread) during the batch ÷ the agent calls the LLM
                  server counted. The LLM stand-in, NATS and Valkey run in their own processes and are not in it;
                  the gRPC client side of `Deliberate` is (one unary call per 13 agent calls: negligible)
  calls/s         agent calls the LLM server counted ÷ the batch's wall time
  LLM CPU ms/call the stand-in's own CPU per call (it shares the 2 cores; shown to explain the contention)
  not completed   deliberations refused or not COMPLETED, with the first reason (p50/p99 are of the completed)
Median over the repeats, with the spread (min-max) of wall / single and of CPU ms / call.
With EXECUTOR=ray a Ray head (2 CPUs) and the ray-executor service (in this process: its gRPC servicer and
Ray driver) are started; the agent calls run in Ray actors (their CPU is reported apart: Ray workers' CPU ms/call).
Writes bench/results/scale[-ray].md (the table) and scale[-ray].png (the plot). Goals (issue 15): at N = 100,
CPU <= 1 ms per agent call and wall / single <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.common.bus import EventBus, provision_streams
from services.local.infra import LocalInfra
from services.orchestrator.main import start
from services.orchestrator.settings import OrchestratorSettings
from tests.openai_server import start_openai_server

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "Write a Python function that parses ISO-8601 dates, with tests."
GOAL_CPU_MS, GOAL_RATIO = 1.0, 2.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (the Ray head's workers), 0 when gone."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


@dataclass
class Batch:
    n: int
    wall: float
    latencies: list[float]
    cpu_s: float
    calls: int
    llm_cpu_s: float
    workers_cpu_s: float
    failed: list[str] = field(default_factory=list)  # why, per deliberation that did not complete


@dataclass
class Row:
    n: int
    batches: list[Batch] = field(default_factory=list)


async def deliberate(stub, tag: str, i: int) -> float:
    request = pb.DeliberateRequest(
        task_id=f"T-scale-{tag}-{i}-{uuid.uuid4().hex[:6]}",
        task_description=TASK,
        role="DEV",
        constraints=dpb.Constraints(timeout_seconds=600, rounds=1),
    )
    t0 = time.perf_counter()
    try:
        reply = (await stub.Deliberate(request, timeout=900)).result
    except grpc.aio.AioRpcError as e:  # counted and shown: where the fleet refuses is a finding, not a crash
        return time.perf_counter() - t0, f"{e.code().name}: {e.details()}"
    if reply.status != dpb.DELIBERATION_STATUS_COMPLETED:
        return time.perf_counter() - t0, f"{dpb.DeliberationStatus.Name(reply.status)}: {reply.error_message}"
    return time.perf_counter() - t0, ""


async def batch(stub, n: int, tag: str, llm, ray_pid: int | None) -> Batch:
    calls0 = (await llm.astats())["calls"]
    llm0 = tree_cpu_seconds(llm.pid)
    workers0 = tree_cpu_seconds(ray_pid) if ray_pid else 0.0
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    ends = await asyncio.gather(*(deliberate(stub, tag, i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    calls = (await llm.astats())["calls"] - calls0
    workers = (tree_cpu_seconds(ray_pid) - workers0) if ray_pid else 0.0
    failed = [why for _, why in ends if why]
    latencies = [seconds for seconds, why in ends if not why]
    return Batch(n, wall, latencies, cpu, calls, tree_cpu_seconds(llm.pid) - llm0, workers, failed)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(rows: dict[int, Row], ray: bool) -> tuple[list[str], list[dict[str, float]]]:
    single = statistics.median(b.wall for b in rows[min(rows)].batches)
    header = (
        "| N | agent calls | wall s | wall / single (min-max) | p50 s | p99 s | CPU ms / call (min-max) | calls/s "
        "| LLM CPU ms/call |" + (" Ray workers' CPU ms/call |" if ray else "") + " not completed |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    data = []
    for n, row in sorted(rows.items()):
        ratios = [b.wall / single for b in row.batches]
        cpus = [b.cpu_s * 1000 / max(b.calls, 1) for b in row.batches]
        lat = [x for b in row.batches for x in b.latencies] or [float("nan")]
        d = {
            "n": n,
            "calls": statistics.median(b.calls for b in row.batches),
            "wall": statistics.median(b.wall for b in row.batches),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "p50": quantile(lat, 0.5),
            "p99": quantile(lat, 0.99),
            "cpu": statistics.median(cpus),
            "cpu_min": min(cpus),
            "cpu_max": max(cpus),
            "rate": statistics.median(b.calls / b.wall for b in row.batches),
            "llm_cpu": statistics.median(b.llm_cpu_s * 1000 / max(b.calls, 1) for b in row.batches),
            "workers_cpu": statistics.median(b.workers_cpu_s * 1000 / max(b.calls, 1) for b in row.batches),
        }
        data.append(d)
        line = (
            f"| {n} | {d['calls']:.0f} | {d['wall']:.2f} | {d['ratio']:.2f} ({d['ratio_min']:.2f}-{d['ratio_max']:.2f})"
            f" | {d['p50']:.2f} | {d['p99']:.2f} | {d['cpu']:.2f} ({d['cpu_min']:.2f}-{d['cpu_max']:.2f})"
            f" | {d['rate']:.0f} | {d['llm_cpu']:.2f} |"
        )
        failed = [why for b in row.batches for why in b.failed]
        first = f" (first: {failed[0][:160]})" if failed else ""
        lines.append(line + (f" {d['workers_cpu']:.2f} |" if ray else "") + f" {len(failed)}{first} |")
    return lines, data


def plot(data: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [d["n"] for d in data]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.errorbar(
        ns,
        [d["ratio"] for d in data],
        yerr=[[d["ratio"] - d["ratio_min"] for d in data], [d["ratio_max"] - d["ratio"] for d in data]],
        marker="o",
        capsize=3,
        label="measured (median, min-max)",
    )
    left.axhline(GOAL_RATIO, color="tab:red", linestyle="--", label=f"goal at N=100: <= {GOAL_RATIO:g}")
    left.axhline(1.0, color="gray", linestyle=":", label="ideal")
    left.set(xlabel="concurrent deliberations N", ylabel="batch wall / one deliberation", title="Wall time")
    left.legend(fontsize=8)
    right.errorbar(
        ns,
        [d["cpu"] for d in data],
        yerr=[[d["cpu"] - d["cpu_min"] for d in data], [d["cpu_max"] - d["cpu"] for d in data]],
        marker="o",
        capsize=3,
        label="orchestrator process",
    )
    right.plot(ns, [d["llm_cpu"] for d in data], marker="s", linestyle="--", label="LLM stand-in (apart)")
    right.axhline(GOAL_CPU_MS, color="tab:red", linestyle="--", label=f"goal: <= {GOAL_CPU_MS:g} ms")
    right.set(xlabel="concurrent deliberations N", ylabel="CPU ms per agent call", title="CPU per agent call")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(args: argparse.Namespace) -> None:
    ray = args.executor == "ray"
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    llm = start_openai_server(delay_ms=args.delay_ms)
    components = ("nats", "valkey")
    head = None
    try:
        with LocalInfra(base / "infra", components=components) as infra:
            ray_service = None
            settings = OrchestratorSettings(
                nats_url=infra.nats_url,
                valkey_url=infra.valkey_url,
                grpc_port=0,
                metrics_port=0,
                vllm_url=llm.url,
                vllm_model="bench",
                log_level="WARNING",
            )
            if ray:
                from services.local import infra as infra_module
                from services.local.infra import start_ray_head
                from services.ray_executor.executor import connect_ray
                from services.ray_executor.main import start as start_ray_executor
                from services.ray_executor.settings import RayExecutorSettings

                for key, value in infra_module.RAY_ENV.items():
                    os.environ[key] = value
                head = start_ray_head(base / "ray" / "data", base / "ray" / "logs", num_cpus=2)
                connect_ray(head.address)
                ray_service = await start_ray_executor(
                    RayExecutorSettings(
                        nats_url=infra.nats_url,
                        grpc_port=0,
                        metrics_port=0,
                        ray_address=head.address,
                        vllm_url=llm.url,
                        vllm_model="bench",
                        log_level="WARNING",
                        max_active_deliberations=max(64, *args.sizes),  # the executor's cost, not its cap
                    ),
                    host="127.0.0.1",
                )
                settings = settings.model_copy(
                    update={"executor": "ray", "ray_executor_address": f"127.0.0.1:{ray_service.port}"}
                )
            bus = await EventBus.connect(settings, "bench")
            await provision_streams(bus.js, settings)
            await bus.close()
            orchestrator = await start(settings, host="127.0.0.1")
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}")
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            for role in (ev.Role.DEV, ev.Role.ARCHITECT):
                await stub.CreateCouncil(pb.CreateCouncilRequest(role=role, num_agents=3))
            rows: dict[int, Row] = {n: Row(n) for n in args.sizes}
            ray_pid = head.pid if head is not None else None
            try:
                await batch(stub, 1, "warm", llm, ray_pid)  # imports, connections, Ray's first workers
                await batch(stub, min(20, max(args.sizes)), "warm", llm, ray_pid)
                for repeat in range(args.repeats):
                    for n in args.sizes:
                        profiler = None
                        if args.profile_n == n and repeat == args.repeats - 1:
                            # CPU time, not wall: the 2 cores are shared with the LLM stand-in, NATS and Valkey
                            profiler = cProfile.Profile(time.process_time)
                            profiler.enable()
                        b = await batch(stub, n, f"{n}-{repeat}", llm, ray_pid)
                        if profiler is not None:
                            profiler.disable()
                            profiler.dump_stats(args.profile_out)
                            stats = pstats.Stats(profiler)
                            stats.sort_stats("tottime").print_stats(40)
                            stats.sort_stats("cumulative").print_stats(60)
                            print(f"profile of N={n} ({b.calls} agent calls) in {args.profile_out}")
                        rows[n].batches.append(b)
                        print(
                            f"repeat {repeat + 1}/{args.repeats} N={n:>4}: wall {b.wall:7.2f}s  calls {b.calls:>5}  "
                            f"CPU {b.cpu_s * 1000 / max(b.calls, 1):6.2f} ms/call  "
                            f"LLM CPU {b.llm_cpu_s * 1000 / max(b.calls, 1):5.2f} ms/call  "
                            f"not completed {len(b.failed)}",
                            flush=True,
                        )
            finally:
                await channel.close()
                await orchestrator.stop(1.0)
                if ray_service is not None:
                    await ray_service.stop(1.0)
    finally:
        if head is not None:
            import ray as ray_module

            ray_module.shutdown()
            head.stop()
        llm.stop()

    lines, data = summarize(rows, ray)
    suffix = "-ray" if ray else ""
    load = os.getloadavg()
    title = (
        f"{len(args.sizes)} sizes x {args.repeats} repeats, executor {args.executor}, LLM delay "
        f"{args.delay_ms:g} ms, {os.cpu_count()} cores, load before {args.load_before:.2f} after {load[0]:.2f}"
    )
    text = "\n".join(
        [
            f"# bench-scale: one orchestrator, N concurrent Deliberate (executor {args.executor})",
            "",
            f"`python -m bench.bench_scale` ({time.strftime('%Y-%m-%d %H:%M')}): {title}. 3 agents, 1 round, one "
            "ARCHITECT selection; real gRPC, NATS JetStream and Valkey; the LLM stand-in is tests/openai_server.py in "
            "its own process. Medians over the repeats (min-max in brackets). See the module docstring of "
            "bench/bench_scale.py for what each column measures. Goals at N = 100: CPU <= 1 ms per agent call, "
            "wall / single <= 2.",
            "",
            *lines,
            "",
        ]
    )
    print("\n" + text)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"scale{suffix}.md").write_text(text)
        plot(data, RESULTS / f"scale{suffix}.png", title)
        print(f"wrote {RESULTS / f'scale{suffix}.md'} and {RESULTS / f'scale{suffix}.png'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 50, 100, 200])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=500)
    p.add_argument("--executor", choices=("in-process", "ray"), default=os.environ.get("EXECUTOR") or "in-process")
    p.add_argument("--profile-n", type=int, default=0, help="cProfile the last repeat's batch of this size")
    p.add_argument("--profile-out", default="/tmp/bench-scale.prof")
    p.add_argument("--no-write", dest="write", action="store_false", help="print only (no files in bench/results)")
    args = p.parse_args(argv)
    args.load_before = os.getloadavg()[0]
    return args


if __name__ == "__main__":
    asyncio.run(run(parse_args()))
