"""`fleet-wait streams` (the services' initContainer) against a real NATS: not ready until `fleet streams init`."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

from services.common.bus import connect_nats, provision_streams
from services.common.settings import FleetSettings, load_settings

PATH = Path(__file__).resolve().parents[3] / "deploy" / "docker" / "fleet_wait.py"


def load():
    spec = importlib.util.spec_from_file_location("fleet_wait_streams", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_streams_wait_ends_once_every_stream_exists(nats_url, monkeypatch):
    monkeypatch.setenv("NATS_URL", nats_url)
    fleet_wait = load()
    args = ["streams", "--timeout", "0.5", "--interval", "0.1"]
    assert await asyncio.to_thread(fleet_wait.main, args) == 1
    nc = await connect_nats(nats_url, "test")
    try:
        await provision_streams(nc.jetstream(), load_settings(FleetSettings))
    finally:
        await nc.close()
    assert await asyncio.to_thread(fleet_wait.main, args) == 0
