"""A real Ray head on loopback for the session (stopped by PID), this process connected to it as the driver,
a loopback OpenAI-compatible server, and the ray-executor served in-process over real gRPC with real NATS."""

from __future__ import annotations

import grpc
import pytest

from fleet.ray_executor.v1 import ray_executor_pb2_grpc
from services.local import infra as infra_module


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """`ray start --head --block` on 127.0.0.1 with every port explicit (~8-20 s), for the whole session.
    4 logical CPUs: room for two services' agent pools (4 actors x 0.25 CPU each) at once."""
    base = tmp_path_factory.mktemp("ray")
    head = infra_module.start_ray_head(base / "data", base / "logs", num_cpus=4)
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_driver(ray_head):
    """This test process connected to the head once; the services started by the tests reuse the connection."""
    import ray

    ray.init(address=ray_head.address, namespace="fleet", logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_llm():
    """The ray tests' own loopback OpenAI server (their /control changes never touch other suites)."""
    from openai_server import start_openai_server

    server = start_openai_server(delay_ms=30)
    yield server
    server.stop()


@pytest.fixture
async def llm(ray_llm):
    await ray_llm.acontrol(reset=True)
    yield ray_llm
    await ray_llm.acontrol(reset=True)


@pytest.fixture
def rx_settings(settings, ray_head, llm):
    from services.ray_executor.settings import RayExecutorSettings

    return RayExecutorSettings(
        **settings.model_dump(),
        grpc_port=0,
        ray_address=ray_head.address,
        vllm_url=llm.url,
        vllm_model="test-model",
        vllm_max_retries=0,
        vllm_timeout_seconds=20,
        agent_timeout_seconds=20,
        ray_agent_workers=2,  # two actor processes start faster than four on a small box; calls share them
    )


@pytest.fixture
async def ray_executor(rx_settings, bus, ray_driver):
    from services.ray_executor.main import start

    running = await start(rx_settings, host="127.0.0.1")
    yield running
    await running.stop(0.5)


@pytest.fixture
async def rx(ray_executor):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ray_executor.port}") as channel:
        yield ray_executor_pb2_grpc.RayExecutorServiceStub(channel)
