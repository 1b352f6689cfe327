"""`fleet serve context` as its own process: settings from the environment, health, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.context.v1 import context_pb2 as pb
from fleet.context.v1 import context_pb2_grpc
from services.local.processes import free_port

pytestmark = pytest.mark.integration


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_fleet_serve_context(ctx_settings, bus):
    port = free_port("127.0.0.1")
    env = {
        **os.environ,
        "NATS_URL": ctx_settings.nats_url,
        "VALKEY_URL": ctx_settings.valkey_url,
        "NEO4J_URI": ctx_settings.neo4j_uri,
        "NEO4J_USER": "falkordb",
        "NEO4J_PASSWORD": "",
        "GRPC_PORT": str(port),
        "METRICS_PORT": "0",
        "LOG_FORMAT": "text",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "context"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        address = f"127.0.0.1:{port}"
        for _ in range(300):
            if await serving(address) or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await context_pb2_grpc.ContextServiceStub(channel).ValidateScope(
                pb.ValidateScopeRequest(role="QA", phase="TEST", scopes=["tasks.all"])
            )
            assert reply.allowed
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    log = stderr.decode()
    assert proc.returncode == 0, log[-3000:]
    assert "context service ready" in log and "shutting down" in log and "Traceback" not in log, log[-3000:]


async def test_a_bad_variable_is_named(ctx_settings):
    env = {**os.environ, "GRPC_PORT": "99999", "CONTEXT_MIN_TOKEN_BUDGET": "5000"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "context"], env=env, capture_output=True, timeout=60
    )
    assert result.returncode == 2
    assert "GRPC_PORT" in result.stderr.decode()
