"""Spending caps (SPENDING_CAPS) end to end: two orchestrators with authentication on (a real issuer) on one real
Valkey share each caller's counters; a refused deliberation is RESOURCE_EXHAUSTED saying when it resets, and nothing
is started for it; usage per caller in GetStatus and /metrics."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from services.orchestrator.main import start
from services.orchestrator.settings import OrchestratorSettings

from .test_orchestrator_api import COMPLETED, deliberate_request, expect_error
from .test_orchestrator_auth import stub_for

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def two_orchestrators(orch_settings, issuer, spending_caps):
    settings = OrchestratorSettings(
        **{**orch_settings.model_dump(), "auth_issuer": issuer.url, "spending_caps": spending_caps}
    )
    running = [await start(settings, host="127.0.0.1")]
    try:
        running.append(await start(settings, host="127.0.0.1"))
        channels = []
        stubs = []
        for subject, roles in (("root-caps", ["admin"]), ("dana-caps", ["deliberator"]), ("eve-caps", ["deliberator"])):
            for r in running:
                channel, stub = stub_for(f"127.0.0.1:{r.port}", issuer.mint(subject, roles, email=f"{subject}@x.org"))
                channels.append(channel)
                stubs.append(stub)
        try:
            await stubs[0].CreateCouncil(pb.CreateCouncilRequest(role="DEV", num_agents=2))
            # (admin on A, admin on B), (dana on A, dana on B), (eve on A, eve on B)
            yield [tuple(stubs[i : i + 2]) for i in range(0, len(stubs), 2)]
        finally:
            for channel in channels:
                await channel.close()
    finally:
        for r in running:
            await r.stop(0.5)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def counted(name: str, caller: str) -> float:
    return REGISTRY.get_sample_value(name, {"caller": caller}) or 0.0


async def test_deliberations_per_minute_shared_by_replicas(orch_settings, bus, issuer):
    async with two_orchestrators(orch_settings, issuer, {"deliberator": {"deliberations_per_minute": 2}}) as stubs:
        (root_a, root_b), (dana_a, dana_b), (eve_a, _) = stubs
        started_before = counted("fleet_orchestrator_caller_deliberations_total", "dana-caps")
        first = (await dana_a.Deliberate(deliberate_request("T-CAP-1", num_agents=1))).result
        assert first.status == COMPLETED, first.error_message
        second = (await dana_b.Deliberate(deliberate_request("T-CAP-2", num_agents=1))).result
        assert second.status == COMPLETED, second.error_message

        refused = await expect_error(
            dana_a.Deliberate(deliberate_request("T-CAP-3", num_agents=1)), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert "dana-caps@x.org has 2 deliberations started this minute, the cap is 2" in refused.details()
        assert "deliberations_per_minute of role deliberator" in refused.details() and "resets in" in refused.details()
        info = error_info(refused)
        assert info.reason == "SPENDING_CAP" and info.metadata["limit"] == "deliberations_per_minute"
        assert 1 <= int(info.metadata["resets_in_seconds"]) <= 60 and info.metadata["caller"] == "dana-caps"
        streamed = dana_b.StreamDeliberation(
            pb.StreamDeliberationRequest(deliberation=deliberate_request("T-CAP-4", num_agents=1))
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused_stream:  # authenticated, then refused
            async for _ in streamed:
                pytest.fail("a refused stream sends nothing")
        assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for task_id in ("T-CAP-3", "T-CAP-4"):  # nothing was started for the refused caller
            await expect_error(
                root_b.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id)),
                grpc.StatusCode.NOT_FOUND,
            )

        # Another caller is unaffected (streaming: its calls carry the token too, and its tokens are counted).
        replies = [
            r
            async for r in eve_a.StreamDeliberation(
                pb.StreamDeliberationRequest(deliberation=deliberate_request("T-CAP-5", num_agents=1))
            )
        ]
        other = replies[-1].result
        assert other.status == COMPLETED and other.requested_by == "eve-caps@x.org"
        for i, admin in enumerate((root_a, root_b, root_a)):  # admin: not capped
            result = (await admin.Deliberate(deliberate_request(f"T-CAP-ROOT-{i}", num_agents=1))).result
            assert result.status == COMPLETED, result.error_message

        mine = (await dana_b.GetStatus(pb.GetStatusRequest())).usage
        assert [(u.caller, u.deliberations_this_minute, u.deliberations_per_minute) for u in mine] == [
            ("dana-caps", 2, 2)
        ]
        assert mine[0].tokens_last_day == first.total_tokens + second.total_tokens > 0
        assert mine[0].tokens_per_day == 2_000_000  # the default kept: the setting named only the other cap
        everyone = {u.caller: u for u in (await root_a.GetStatus(pb.GetStatusRequest(include_stats=True))).usage}
        assert set(everyone) == {"root-caps", "dana-caps", "eve-caps"}
        assert (
            everyone["root-caps"].deliberations_this_minute == 3 and everyone["root-caps"].deliberations_per_minute == 0
        )
        assert everyone["eve-caps"].deliberations_this_minute == 1
        assert everyone["eve-caps"].tokens_last_day == other.total_tokens > 0
        assert counted("fleet_orchestrator_caller_deliberations_total", "dana-caps") - started_before == 2


async def test_a_day_of_tokens_spent_refuses_the_next_until_its_hour_leaves(orch_settings, bus, issuer):
    async with two_orchestrators(orch_settings, issuer, {"deliberator": {"tokens_per_day": 50}}) as stubs:
        _, (dana_a, dana_b), (eve_a, _) = stubs
        tokens_before = counted("fleet_orchestrator_caller_tokens_total", "dana-caps")
        spent = (await dana_a.Deliberate(deliberate_request("T-TOK-1", num_agents=1))).result
        assert spent.status == COMPLETED and spent.total_tokens >= 50, (spent.status, spent.total_tokens)
        refused = await expect_error(
            dana_b.Deliberate(deliberate_request("T-TOK-2", num_agents=1)), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert f"{spent.total_tokens} tokens spent in the last 24 h, the cap is 50" in refused.details()
        info = error_info(refused)
        assert info.metadata["limit"] == "tokens_per_day"
        assert 23 * 3600 < int(info.metadata["resets_in_seconds"]) <= 24 * 3600  # when this hour leaves the day
        await expect_error(
            dana_b.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-TOK-2")), grpc.StatusCode.NOT_FOUND
        )
        assert (await eve_a.Deliberate(deliberate_request("T-TOK-3", num_agents=1))).result.status == COMPLETED
        usage = (await dana_b.GetStatus(pb.GetStatusRequest())).usage[0]
        assert (usage.tokens_last_day, usage.tokens_per_day, usage.deliberations_this_minute) == (
            spent.total_tokens,
            50,
            1,  # the refused one was taken back
        )
        assert counted("fleet_orchestrator_caller_tokens_total", "dana-caps") - tokens_before == spent.total_tokens
