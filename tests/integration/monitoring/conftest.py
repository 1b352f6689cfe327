"""The monitoring service served in-process (uvicorn on a free port) against a real NATS JetStream.

The orchestrator is not running in these tests unless a test starts one (`orchestrator_on`: the real service,
on the test's NATS and Valkey, with the loopback LLM server, and with the session's real sandbox service when a
test passes `sandbox_address` from tests/conftest.py): until then ORCHESTRATOR_ADDRESS points at a free loopback
port, so the degraded path ("orchestrator unavailable at host:port") is what the page shows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.common import events as ev
from services.common.bus import EventBus
from services.local.processes import free_port
from services.monitoring.main import RunningMonitoring, start
from services.monitoring.settings import MonitoringSettings
from services.orchestrator.main import RunningOrchestrator
from services.orchestrator.main import start as start_orchestrator
from services.orchestrator.settings import OrchestratorSettings


def monitoring_settings(nats_url: str, **over: Any) -> MonitoringSettings:
    """Fast checks and short deadlines, so degraded and recovered states show within a second or two."""
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "monitoring_port": 0,
        "orchestrator_address": f"127.0.0.1:{free_port()}",
        "orchestrator_timeout_seconds": 1.0,
        "orchestrator_poll_seconds": 0.5,
        "monitoring_check_seconds": 0.5,
        "metrics_port": 0,
        "log_format": "text",
    }
    values.update(over)
    return MonitoringSettings(**values)


@pytest.fixture
async def monitoring(nats_url: str, bus: EventBus) -> AsyncIterator[RunningMonitoring]:
    running = await start(monitoring_settings(nats_url), port=0)
    yield running
    await running.stop()


@pytest.fixture
async def orchestrator_on(settings, llm_server) -> AsyncIterator[Any]:
    """Starts the real orchestrator on a given port (the one the dashboard was told), with the five councils;
    `over` are more OrchestratorSettings (e.g. `sandbox_address`)."""
    started: list[RunningOrchestrator] = []

    async def start_on(port: int, **over: Any) -> RunningOrchestrator:
        values = {**settings.model_dump(), "grpc_port": port, "vllm_url": llm_server.url, "vllm_model": "test-model"}
        running = await start_orchestrator(OrchestratorSettings(**values, **over), host="127.0.0.1")
        started.append(running)
        await running.app.ensure_councils(3)
        return running

    yield start_on
    for running in started:
        await running.stop(0)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture
async def client(monitoring: RunningMonitoring) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=monitoring.url, timeout=10) as c:
        await wait_ready(c)
        yield c


async def wait_ready(client: httpx.AsyncClient, ready: bool = True, timeout: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            r = await client.get("/readyz")
            if (r.status_code == 200) == ready:
                return r.json()
            await asyncio.sleep(0.1)


async def eventually(probe, timeout: float = 10.0, interval: float = 0.1):
    """Await `probe()` until it returns something truthy; return that."""
    async with asyncio.timeout(timeout):
        while True:
            got = await probe()
            if got:
                return got
            await asyncio.sleep(interval)


class SSEReader:
    """Reads Server-Sent Events from an httpx streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self) -> tuple[str, Any]:
        event, data = "message", []
        async for line in self.lines:
            if not line:
                if data:
                    return event, json.loads("\n".join(data))
                event = "message"
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        raise EOFError("the event stream ended")

    async def until(self, predicate, timeout: float = 10.0) -> tuple[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                kind, data = await self.next()
                if predicate(kind, data):
                    return kind, data


def approval_payload(story: str = "S-1", plan: str = "P-1", **over: Any) -> ev.PlanApproved:
    from datetime import UTC, datetime

    values: dict[str, Any] = {"story_id": story, "plan_id": plan, "approved_by": "po", "timestamp": datetime.now(UTC)}
    values.update(over)
    return ev.PlanApproved(**values)
