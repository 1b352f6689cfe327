"""The orchestrator with bearer tokens checked (a real issuer on loopback): each method's role, nothing started for a
refused caller, and the deliberation records who asked for it."""

from __future__ import annotations

import grpc
import pytest

from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import auth
from services.orchestrator.main import start

from .test_orchestrator_api import COMPLETED, deliberate_request

pytestmark = pytest.mark.integration


@pytest.fixture
async def guarded(orch_settings, bus, issuer):
    running = await start(orch_settings.model_copy(update={"auth_issuer": issuer.url}), host="127.0.0.1")
    yield f"127.0.0.1:{running.port}"
    await running.stop(0.5)


def stub_for(address: str, token: str) -> tuple[grpc.aio.Channel, orchestrator_pb2_grpc.OrchestratorServiceStub]:
    channel = auth.channel(address, auth.BearerToken(value=token))
    return channel, orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


async def test_each_method_needs_its_role_and_the_result_names_who_asked(guarded, issuer):
    admin_channel, admin = stub_for(guarded, issuer.mint("root", ["admin"]))
    viewer_channel, viewer = stub_for(guarded, issuer.mint("vera", ["viewer"], email="vera@example.com"))
    dev_channel, dev = stub_for(guarded, issuer.mint("dana", ["deliberator"], email="dana@example.com"))
    anonymous_channel, anonymous = stub_for(guarded, "")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.ListCouncils(pb.ListCouncilsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dev.CreateCouncil(pb.CreateCouncilRequest(role="DEV", num_agents=3))
        assert (
            refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "lacks role admin" in refused.value.details()
        )
        await admin.CreateCouncil(pb.CreateCouncilRequest(role="DEV", num_agents=3))
        assert len((await viewer.ListCouncils(pb.ListCouncilsRequest())).councils) == 1

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await viewer.Deliberate(deliberate_request("T-AUTH-0"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as missing:  # nothing was started for the refused caller
            await viewer.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-AUTH-0"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        result = (await dev.Deliberate(deliberate_request("T-AUTH-1"))).result
        assert result.status == COMPLETED, result.error_message
        assert result.requested_by == "dana@example.com"
        stored = (await viewer.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-AUTH-1"))).result
        assert stored.requested_by == "dana@example.com"
    finally:
        for channel in (admin_channel, viewer_channel, dev_channel, anonymous_channel):
            await channel.close()
