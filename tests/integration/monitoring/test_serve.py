"""`fleet serve monitoring` as its own process: settings from the environment, port 8080's variable, the
orchestrator reached over gRPC from uvicorn's own event loop."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from services.common import events as ev
from services.common.bus import EventBus
from services.local.processes import free_port

from .conftest import eventually, wait_ready

pytestmark = pytest.mark.integration


async def test_fleet_serve_monitoring(nats_url: str, bus: EventBus, orchestrator_on):
    port, orchestrator_port = free_port(), free_port()
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "MONITORING_PORT": str(port),
        "ORCHESTRATOR_ADDRESS": f"127.0.0.1:{orchestrator_port}",
        "ORCHESTRATOR_POLL_SECONDS": "0.5",
        "MONITORING_CHECK_SECONDS": "0.5",
        "LOG_FORMAT": "text",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "monitoring"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    orchestrator = await orchestrator_on(orchestrator_port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await eventually(lambda: _answers(client), timeout=30)
            await wait_ready(client)
            councils = await eventually(lambda: _councils(client))
            assert sorted(c["role"] for c in councils["councils"]) == sorted(ev.Role)
    finally:
        await orchestrator.stop(0)
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15).
    log = stderr.decode()
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _councils(client: httpx.AsyncClient) -> dict | None:
    r = await client.get("/api/councils")
    return r.json() if r.status_code == 200 else None
