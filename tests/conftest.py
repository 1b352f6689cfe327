"""Shared fixtures: real servers on free loopback ports, started through services.local (as `fleet infra up`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.settings import FleetSettings

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """NATS JetStream + Valkey + FalkorDB (Bolt) for the whole session."""
    from services.local.infra import LocalInfra

    with LocalInfra(tmp_path_factory.mktemp("infra")) as running:
        yield running


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A fresh NATS JetStream server per test (~50 ms): streams and consumers never leak between tests."""
    from services.local.infra import LocalInfra

    with LocalInfra(tmp_path / "nats", components=("nats",)) as running:
        yield running.nats_url


@pytest.fixture
async def valkey_url(infra: object) -> AsyncIterator[str]:
    """The session Valkey, emptied before each test."""
    from services.common.valkey import connect_valkey

    client = connect_valkey(infra.valkey_url)  # type: ignore[attr-defined]
    await client.flushdb()
    await client.aclose()
    yield infra.valkey_url  # type: ignore[attr-defined]


@pytest.fixture
def graph_name() -> str:
    """A graph (database) of its own for each test on the session FalkorDB."""
    return f"g_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(nats_url: str, valkey_url: str) -> FleetSettings:
    """Fast delivery policy so retry and dead-letter paths run in a second."""
    return FleetSettings(
        nats_url=nats_url,
        valkey_url=valkey_url,
        consumer_max_deliver=3,
        consumer_ack_wait_seconds=2.0,
        consumer_backoff_seconds=[0.1, 0.2],
        metrics_port=0,
    )


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
