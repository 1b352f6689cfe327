"""An orchestrator served in-process over real gRPC, with real NATS + Valkey and a loopback OpenAI-compatible server."""

from __future__ import annotations

import grpc
import pytest

from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.orchestrator.main import start
from services.orchestrator.settings import OrchestratorSettings


@pytest.fixture
def orch_settings(settings, llm_server) -> OrchestratorSettings:
    return OrchestratorSettings(
        **settings.model_dump(),
        grpc_port=0,
        vllm_url=llm_server.url,
        vllm_model="test-model",
        vllm_max_retries=1,
        vllm_timeout_seconds=10,
    )


@pytest.fixture
async def orchestrator(orch_settings, bus):
    running = await start(orch_settings, host="127.0.0.1")
    yield running
    await running.stop(0.5)


@pytest.fixture
async def stub(orchestrator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
