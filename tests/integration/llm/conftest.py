"""The loopback OpenAI-compatible server as a real subprocess on a free port, reset before every test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from openai_server import ServerHandle, start_openai_server

from services.common.llm import VLLMClient


@pytest.fixture(scope="session")
def openai_server() -> Iterator[ServerHandle]:
    server = start_openai_server()
    yield server
    server.stop()


@pytest.fixture
def server(openai_server: ServerHandle) -> ServerHandle:
    """The session server with faults, delay and statistics reset."""
    openai_server.control(reset=True)
    return openai_server


@pytest.fixture
async def client(server: ServerHandle) -> AsyncIterator[VLLMClient]:
    async with VLLMClient(server.url, "test-model", timeout=5, max_retries=3) as c:
        yield c
