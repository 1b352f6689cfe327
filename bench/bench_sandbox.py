"""Sandbox overhead: a trivial passing pytest run through the warm sandbox service vs the same run as a plain
subprocess, side by side in one run.

    make bench-sandbox            (or: python -m bench.bench_sandbox --runs 40)

The service runs in this process on a loopback port (bwrap isolation, 2 slots; the interpreter its start-up probe
chose) and is called over real gRPC with the SandboxClient. Both modes do the same work: write solution.py and
test_probe.py into a fresh directory and run pytest on them with the same interpreter and the same pytest
distribution (the baseline's PYTHONPATH is a directory of links to the closure the sandbox mounts, plugins not
autoloaded, like inside); the baseline is `python -m pytest -q -p no:cacheprovider` in a temp dir, without
namespaces, limits, the trusted script or gRPC.
  sequential   one execution at a time, modes alternating run by run after one warm-up each: latency p50/p99
  2 at once    two workers per mode (the service's 2 slots; two subprocesses): executions per second
Ratio = sandbox ÷ subprocess (latency p50 for sequential, time per execution for 2 at once). Goal <= 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.sandbox import SandboxClient
from services.sandbox.application import PROBE
from services.sandbox.main import start
from services.sandbox.settings import SandboxSettings

GOAL = 1.5


def percentile(xs: list[float], p: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def probe_dir() -> str:
    """A fresh directory holding the probe's files (what the sandbox's script writes into its work dir)."""
    work = tempfile.mkdtemp(prefix="bench-sandbox-")
    for path, text in {**PROBE.files, **PROBE.test_files}.items():
        Path(work, path).write_text(text)
    return work


async def main(runs: int) -> int:
    running = await start(SandboxSettings(grpc_port=0, metrics_port=0, sandbox_uid_base=260_000), host="127.0.0.1")
    site = Path(tempfile.mkdtemp(prefix="bench-sandbox-site-"))
    for name, path in running.runner.site.items():
        (site / name).symlink_to(path)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(site),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    python = running.runner.python
    print(
        f"sandbox: {running.runner.isolation}, interpreter {python}, 2 slots; baseline: the same interpreter",
        flush=True,
    )

    async def subprocess_run() -> None:
        work = probe_dir()
        try:
            proc = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *PROBE.test_files,
                cwd=work,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await proc.wait() != 0:
                raise SystemExit(f"the plain pytest run failed with {proc.returncode}")
        finally:
            shutil.rmtree(work)

    client = SandboxClient(f"127.0.0.1:{running.port}")

    async def sandbox_run() -> None:
        result = await client.execute(PROBE)
        if not result.passed:
            raise SystemExit(f"the sandbox run ended {result.outcome}: {result.reason}")

    modes: dict[str, Callable[[], Awaitable[None]]] = {"subprocess": subprocess_run, "sandbox": sandbox_run}
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    per_second: dict[str, float] = {}
    try:
        for n in range(runs + 1):  # run 0 warms up
            for mode, run in modes.items():
                t0 = time.perf_counter()
                await run()
                if n:
                    latencies[mode].append((time.perf_counter() - t0) * 1000)
        for mode, run in modes.items():

            async def worker(run: Callable[[], Awaitable[None]] = run) -> None:
                for _ in range(runs // 2):
                    await run()

            t0 = time.perf_counter()
            await asyncio.gather(worker(), worker())
            per_second[mode] = 2 * (runs // 2) / (time.perf_counter() - t0)
    finally:
        await client.close()
        await running.stop(0.5)
        shutil.rmtree(site)

    print(f"\na trivial passing pytest run, {runs} runs per mode")
    print(f"{'mode':<12}{'p50 ms':>9}{'p99 ms':>9}{'min ms':>9}{'seq exec/s':>12}{'2 at once exec/s':>18}")
    for mode in modes:
        xs = latencies[mode]
        print(
            f"{mode:<12}{statistics.median(xs):9.1f}{percentile(xs, 99):9.1f}{min(xs):9.1f}"
            f"{1000 / statistics.mean(xs):12.2f}{per_second[mode]:18.2f}"
        )
    latency_ratio = statistics.median(latencies["sandbox"]) / statistics.median(latencies["subprocess"])
    throughput_ratio = per_second["subprocess"] / per_second["sandbox"]
    ok = latency_ratio <= GOAL and throughput_ratio <= GOAL
    print(
        f"\nsandbox ÷ subprocess: {latency_ratio:.2f}x latency (p50), {throughput_ratio:.2f}x time per execution "
        f"2 at once (goal <= {GOAL:g}x): {'OK' if ok else 'ABOVE GOAL'}"
    )
    return 0 if ok else 1


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    raise SystemExit(asyncio.run(main(parser.parse_args().runs)))


if __name__ == "__main__":
    cli()
