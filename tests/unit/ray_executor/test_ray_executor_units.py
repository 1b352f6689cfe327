"""Pure pieces of the ray-executor: the result's proto conversion (both ways) and the token batching."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from services.common import events as ev
from services.common.events import Role
from services.deliberation.domain import (
    AgentFailure,
    CheckResult,
    Critique,
    DeliberationResult,
    DeliberationStatus,
    Finding,
    Phase,
    Proposal,
    RankedProposal,
    Revision,
    Selection,
    UsageRecord,
    Vote,
)
from services.orchestrator.adapters.grpc_api import result_fields
from services.orchestrator.adapters.ray_runner import result_from_proto
from services.ray_executor.adapters.grpc_api import result_to_proto
from services.ray_executor.executor import TokenStream


def a_result() -> DeliberationResult:
    proposals = [
        Proposal(
            f"d-1:agent-dev-00{i}", f"agent-dev-00{i}", Role.DEV, f"final {i}", (Revision(0, f"first {i}", "orig"),)
        )
        for i in (1, 2)
    ]
    checks = (
        CheckResult("python.syntax", True, True, (), "1 block"),
        CheckResult(
            "python.ruff", False, True, (Finding("F401 unused", "warning", 3, 1), Finding("no line", "error")), "ruff"
        ),
        CheckResult("yaml.parse", True, False),
    )
    ranked = tuple(
        RankedProposal(
            rank=n + 1,
            score=7.5 - n,
            peer_score=8.0,
            check_score=6.6667,
            proposal=p,
            checks=checks,
            votes=(Vote("agent-dev-003", p.proposal_id, 2, {"correctness": 8, "tests": 7}, "fine"),),
        )
        for n, p in enumerate(proposals)
    )
    return DeliberationResult(
        deliberation_id="d-1",
        task_id="T-1",
        role=Role.DEV,
        council_id="council-dev",
        status=DeliberationStatus.COMPLETED,
        results=ranked,
        critiques=(Critique(1, "d-1:agent-dev-001", "agent-dev-002", "agent-dev-001", "revise", "more tests", ("a",)),),
        selection=Selection("agent-dev-001", "ARCHITECT", "clearest", "agent-architect-001"),
        winner_id="agent-dev-001",
        usage=(UsageRecord("agent-dev-001", Phase.GENERATE, 100, 50), UsageRecord("agent-dev-002", Phase.SCORE, 10, 5)),
        phase_durations_ms={Phase.GENERATE: 201.5, Phase.SCORE: 99.25},
        failures=(AgentFailure("agent-dev-003", Phase.GENERATE, "LLM error: HTTP 400"),),
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        finished_at=datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC),
        duration_ms=2000.0,
        context_version="v3",
        executor="ray",
        story_id="S-1",
        context_note="",
    )


def test_result_to_proto_agrees_with_the_orchestrators_mapper():
    for r in (a_result(), replace(a_result(), status=DeliberationStatus.FAILED, selection=None, error_message="x")):
        assert result_to_proto(r) == dpb.DeliberationResult(**result_fields(r))


def test_result_round_trips_through_the_proto():
    for r in (a_result(), replace(a_result(), status=DeliberationStatus.TIMEOUT, selection=None, winner_id="")):
        back = result_from_proto(result_to_proto(r))
        assert replace(back, started_at=r.started_at, finished_at=r.finished_at) == r
        assert (back.finished_at - back.started_at).total_seconds() == 2.0


async def test_token_stream_batches_deltas_in_order():
    sent: list[ev.TokenChunk] = []

    async def publish(chunk: ev.Payload) -> None:
        await asyncio.sleep(0.001)
        sent.append(chunk)  # type: ignore[arg-type]

    stream = TokenStream(publish, "d-1", "agent-dev-001", "GENERATE", interval=0.05)
    stream.start()
    words = [f" word{i}" for i in range(40)]
    for w in words:
        await stream.add(w)
        await asyncio.sleep(0.005)
    await stream.end()
    assert [c.seq for c in sent] == list(range(len(sent)))
    assert sent[0].kind == "start" and sent[-1].kind == "end"
    tokens = sent[1:-1]
    assert {c.kind for c in tokens} == {"tokens"} and 2 <= len(tokens) < len(words)
    assert "".join(c.text for c in tokens) == "".join(words)


async def test_token_stream_stops_publishing_after_a_failure_without_raising():
    calls = 0

    async def publish(chunk: ev.Payload) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("NATS down")

    stream = TokenStream(publish, "d-1", "agent-dev-001", "GENERATE", interval=0.01)
    stream.start()
    await stream.add("hello")
    await asyncio.sleep(0.05)
    await stream.end()
    assert calls == 1 and stream.broken


def test_executor_ray_without_an_address_is_a_configuration_error():
    import pytest

    from services.common.settings import SettingsError
    from services.orchestrator.adapters.ray_runner import RayExecutorRunner

    with pytest.raises(SettingsError, match="RAY_EXECUTOR_ADDRESS"):
        RayExecutorRunner("")
