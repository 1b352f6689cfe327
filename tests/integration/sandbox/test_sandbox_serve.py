"""The service's own settings at work: a full queue is RESOURCE_EXHAUSTED, `pod` isolation runs without bwrap,
and a service that cannot sandbox does not start (naming the fix)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from sandbox_service import PASSING, ROOT, SECRET, script, start_sandbox, stop_sandbox

from fleet.sandbox.v1 import sandbox_pb2_grpc
from services.common.errors import ResourceExhausted
from services.common.execution import Outcome
from services.common.sandbox import execution_to_proto
from services.local.processes import free_port

pytestmark = pytest.mark.integration


async def gauges(metrics_url: str) -> dict[str, float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(metrics_url)).text
    return {
        name: float(value)
        for name, value in (line.split() for line in text.splitlines() if line.startswith("fleet_sandbox_"))
        if name in ("fleet_sandbox_running", "fleet_sandbox_waiting")
    }


async def test_a_full_queue_is_resource_exhausted(tmp_path: Path):
    metrics = free_port()
    sandbox = start_sandbox(tmp_path, 220_000, SANDBOX_CONCURRENCY="1", SANDBOX_QUEUE="1", METRICS_PORT=str(metrics))
    try:
        async with sandbox.client(busy_retries=0) as client:
            slow = script("import time\ntime.sleep(2)\n")
            running = [asyncio.create_task(client.execute(slow)) for _ in range(2)]  # one runs, one waits
            url = f"http://127.0.0.1:{metrics}/metrics"
            for _ in range(100):
                if await gauges(url) == {"fleet_sandbox_running": 1.0, "fleet_sandbox_waiting": 1.0}:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(f"not one running and one waiting: {await gauges(url)}")
            async with grpc.aio.insecure_channel(sandbox.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await sandbox_pb2_grpc.SandboxStub(channel).Execute(execution_to_proto(PASSING))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == "every execution slot is busy and the queue (1) is full; retry later"
            with pytest.raises(ResourceExhausted, match="is busy"):
                await client.execute(PASSING)
            assert [r.outcome for r in await asyncio.gather(*running)] == [Outcome.PASSED, Outcome.PASSED]
            assert (await client.execute(PASSING)).passed  # room again
    finally:
        stop_sandbox(sandbox)


async def test_pod_isolation_runs_without_bwrap_in_a_private_work_dir(tmp_path: Path):
    sandbox = start_sandbox(tmp_path, 230_000, SANDBOX_ISOLATION="pod")
    try:
        async with sandbox.client() as client:
            result = await client.execute(PASSING)
            assert result.outcome == Outcome.PASSED and result.isolation == "pod", result
            code = (
                "import os\n"
                "print(os.getcwd())\n"
                "print(sorted(os.environ))\n"
                "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n"
                "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
                "    except OSError:\n"
                "        pass\n"
            )
            result = await client.execute(script(code))
            assert result.outcome == Outcome.PASSED, result
            work = Path(result.stdout.splitlines()[0])
            assert work.parent == sandbox.tmp and not await asyncio.to_thread(work.exists)  # deleted afterwards
            assert SECRET not in result.stdout and "PYTHONPATH=" in result.stdout
        assert sandbox.leftovers() == []
        assert "ISOLATION pod: executions run WITHOUT bwrap" in sandbox.process.read_log()
    finally:
        stop_sandbox(sandbox)


ENV_SCAN = (
    "import os, resource\n"
    "print(os.getcwd())\n"
    "print('NPROC', *resource.getrlimit(resource.RLIMIT_NPROC))\n"
    "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
    "    try:\n"
    "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
    "    except OSError as e:\n"
    "        print(pid, type(e).__name__)\n"
)


async def test_pod_isolation_as_a_non_root_service_the_kubernetes_shape(tmp_path: Path):
    """In the image the service runs as uid 10001 with SANDBOX_ISOLATION=pod: the executions share its uid."""
    as_user = 65534 if os.geteuid() == 0 else None  # not root already: as we are
    sandbox = start_sandbox(tmp_path, 250_000, as_user=as_user, SANDBOX_ISOLATION="pod")
    try:
        async with sandbox.client() as client:
            assert (await client.execute(PASSING)).passed
            result = await client.execute(script(ENV_SCAN))
        assert result.outcome == Outcome.PASSED, result
        lines = result.stdout.splitlines()
        assert Path(lines[0]).parent == sandbox.tmp
        # The process limit: 64 on top of what the uid already runs (the service's own threads at least).
        soft, hard = map(int, lines[1].split()[1:])
        assert soft == hard > 64
        # Same uid, yet the service's environment is unreadable (it made itself non-dumpable).
        assert f"{sandbox.process.pid} PermissionError" in lines
        assert SECRET not in result.stdout and "PYTHONPATH=" in result.stdout
    finally:
        stop_sandbox(sandbox)


def serve_fails(env: dict[str, str]) -> tuple[int, str]:
    """`fleet serve sandbox` that should not start: its exit code and its stderr (lines unwrapped)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "sandbox"],
        env={**os.environ, "GRPC_PORT": str(free_port()), "METRICS_PORT": "0", "LOG_FORMAT": "text", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, " ".join(done.stderr.split())


def test_without_bwrap_the_service_does_not_start_and_names_the_package(tmp_path: Path):
    code, stderr = serve_fails({"PATH": str(tmp_path)})  # no bwrap there
    assert code == 1, stderr
    assert stderr.startswith("error: bwrap (bubblewrap) is not on PATH: install it (apt-get install bubblewrap)")
    assert "SANDBOX_ISOLATION=pod" in stderr and "Traceback" not in stderr


def test_an_interpreter_that_cannot_run_pytest_is_a_start_up_error():
    code, stderr = serve_fails({"SANDBOX_PYTHON": "/bin/false", "SANDBOX_UID_BASE": "240000"})
    assert code == 1, stderr
    assert "error: no interpreter runs a passing pytest test in the bwrap sandbox:" in stderr
    assert "/usr/bin/false: ERROR: no report came back (exit code 1)" in stderr
    assert "set SANDBOX_PYTHON to another" in stderr and "Traceback" not in stderr
