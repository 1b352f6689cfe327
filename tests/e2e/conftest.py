"""The fleet the system tests run against.

With ORCHESTRATOR_ADDRESS (and NATS_URL, CONTEXT_ADDRESS; optionally MONITORING_URL, RAY_EXECUTOR_ADDRESS) in the
environment, the tests use that fleet: the Kubernetes e2e Job sets them to the in-cluster Services. Without, the
session starts the whole fleet itself (`services.local.fleet`, as `fleet up` does) with the real vLLM serving
`Qwen/Qwen3-0.6B`'s request shape (the tiny random-weight Qwen3 of `make llm`), and stops it by PID at the end.
Calls carry a bearer token: FLEET_TOKEN for an external fleet (the Job's, from a Secret), else the local user's token
of the fleet the session started (its issuer checks every call).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from fleet.context.v1 import context_pb2_grpc
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import auth
from services.local.fleet import ADDRESS_ENV, FleetOptions, LocalFleet, user_token

REQUIRED = ("orchestrator", "nats", "context")


@dataclass
class Fleet:
    endpoints: dict[str, str]  # component -> address, as in .fleet/endpoints.json
    local: LocalFleet | None  # the fleet this session started (None: an external one, e.g. in Kubernetes)
    token: str = ""  # the bearer token the tests send

    def channel(self, name: str) -> grpc.aio.Channel:
        """A channel to a service whose calls carry the token."""
        return auth.channel(self.endpoints[name], auth.BearerToken(value=self.token))


def _from_environment() -> dict[str, str] | None:
    endpoints = {name: os.environ[var] for name, var in ADDRESS_ENV.items() if os.environ.get(var)}
    if "orchestrator" not in endpoints:
        return None
    missing = [ADDRESS_ENV[name] for name in REQUIRED if name not in endpoints]
    if missing:
        raise pytest.UsageError(f"ORCHESTRATOR_ADDRESS is set, so the e2e suite also needs {', '.join(missing)}")
    return endpoints


@pytest.fixture(scope="module")  # torn down after the suite: the rest of a test session gets the machine back
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    external = _from_environment()
    if external is not None:
        yield Fleet(external, None, os.environ.get("FLEET_TOKEN", ""))
        return
    options = FleetOptions(base_dir=tmp_path_factory.mktemp("fleet"), model="qwen3-tiny", executor="ray")
    with LocalFleet(options) as local:
        yield Fleet(dict(local.endpoints), local, user_token(local.endpoints))


@pytest.fixture
def local_fleet(fleet: Fleet) -> LocalFleet:
    """The fault tests stop and restart processes: only possible on the fleet this session started."""
    if fleet.local is None:
        pytest.skip("fault tests kill and restart processes: they run on the fleet the suite starts itself")
    return fleet.local


@pytest.fixture
async def orchestrator(fleet: Fleet):
    async with fleet.channel("orchestrator") as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


@pytest.fixture
async def context(fleet: Fleet):
    async with fleet.channel("context") as channel:
        yield context_pb2_grpc.ContextServiceStub(channel)
