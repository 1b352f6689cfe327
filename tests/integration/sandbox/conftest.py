"""Clients of the session's sandbox service (the `sandbox` fixture of tests/conftest.py; how it is started and
what it must leave behind: tests/sandbox_service.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from sandbox_service import Sandbox

from fleet.sandbox.v1 import sandbox_pb2_grpc
from services.common.sandbox import SandboxClient


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[SandboxClient]:
    async with sandbox.client() as c:
        yield c


@pytest.fixture
async def stub(sandbox: Sandbox) -> AsyncIterator[sandbox_pb2_grpc.SandboxStub]:
    async with grpc.aio.insecure_channel(sandbox.address) as channel:
        yield sandbox_pb2_grpc.SandboxStub(channel)
