"""Two orchestrator processes (`fleet serve orchestrator`) on one NATS and one Valkey share the plan approvals' durable
consumer: one is SIGKILLed midway, and still every approval is deliberated exactly once, both did work, and either
answers for the other (issue 15)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.local.fleet import grpc_serving
from services.local.processes import ManagedProcess, free_port, start_component

from .test_orchestrator_api import create_all, deliberate_request
from .test_plan_approvals import Recorder

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
APPROVALS = 30
ENDED = re.compile(r"deliberation (delib-\S+) of (\S+) \(DEV\) ended COMPLETED")


def replica(name: str, settings, llm_url: str, log_dir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess(
        name,
        [sys.executable, "-m", "services.cli", "serve", "orchestrator"],
        log_dir=log_dir,
        env={
            "NATS_URL": settings.nats_url,
            "VALKEY_URL": settings.valkey_url,
            "GRPC_PORT": str(port),
            "METRICS_PORT": "0",
            "VLLM_URL": llm_url,
            "VLLM_MODEL": "test-model",
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "INFO",
            "APPROVAL_CONCURRENCY": "4",
            # A killed replica's approvals come back after the ack wait; a deliberation it was running is taken over
            # once its lease (30 s) expires, so the survivor retries that long without dead-lettering.
            "CONSUMER_ACK_WAIT_SECONDS": "3",
            "CONSUMER_BACKOFF_SECONDS": "[1, 2, 3]",
            "CONSUMER_MAX_DELIVER": "40",
        },
        cwd=ROOT,
    )
    address = f"127.0.0.1:{port}"
    start_component(process, grpc_serving(address), address=address, timeout=60)
    return process, address


def completed_in_log(process: ManagedProcess) -> set[str]:
    """Task ids whose deliberation this replica ran to COMPLETED (its log says so)."""
    return {m.group(2) for m in ENDED.finditer(process.read_log())}


def plan(i: int) -> ev.Envelope:
    payload = ev.PlanApproved(
        story_id=f"S-rep-{i}",
        plan_id="P-1",
        approved_by="po",
        timestamp=datetime.now(UTC),
        title="Date parsing utility",
        roles=[ev.Role.DEV],
    )
    return ev.make_event(payload, ev.PO_UI)


async def test_two_replicas_share_approvals_and_survive_a_sigkill(settings, bus, llm_server, tmp_path):
    await llm_server.acontrol(delay_ms=150)  # a deliberation takes ~1 s: the kill lands while work is in flight
    a, a_address = replica("orchestrator-a", settings, llm_server.url, tmp_path)
    b, b_address = replica("orchestrator-b", settings, llm_server.url, tmp_path)
    try:
        async with (
            grpc.aio.insecure_channel(a_address) as ch_a,
            grpc.aio.insecure_channel(b_address) as ch_b,
        ):
            stub_a = orchestrator_pb2_grpc.OrchestratorServiceStub(ch_a)
            stub_b = orchestrator_pb2_grpc.OrchestratorServiceStub(ch_b)
            await create_all(stub_a)
            # Deliberate answers from either replica, and each reads what the other ran.
            on_a = (await stub_a.Deliberate(deliberate_request("T-on-a"))).result
            on_b = (await stub_b.Deliberate(deliberate_request("T-on-b"))).result
            assert on_a.status == on_b.status == dpb.DELIBERATION_STATUS_COMPLETED
            for stub, other in ((stub_a, on_b), (stub_b, on_a)):
                got = (await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=other.task_id))).result
                assert got.deliberation_id == other.deliberation_id and got.winner_id == other.winner_id

            completed = await Recorder().start(bus, ev.PAYLOAD_TYPES[ev.DeliberationCompleted].subject_pattern)
            approvals = [plan(i) for i in range(APPROVALS)]
            await bus.publish_many(approvals)
            expected = {f"S-rep-{i}:P-1:DEV" for i in range(APPROVALS)}

            # Midway (both replicas have completed approvals, most are still to do): SIGKILL replica A.
            async with asyncio.timeout(120):
                while True:
                    by_a, by_b = completed_in_log(a) & expected, completed_in_log(b) & expected
                    if by_a and by_b and len(by_a | by_b) >= 8:
                        break
                    await asyncio.sleep(0.05)
            assert a.pid is not None
            os.kill(a.pid, signal.SIGKILL)
            done_by_a = completed_in_log(a) & expected
            at_kill = len(done_by_a | completed_in_log(b) & expected)
            assert at_kill < APPROVALS, "the kill came too late to prove anything: slow the LLM down"

            # Every approval's deliberation completes, exactly once (one deliberation.completed per task).
            async with asyncio.timeout(150):
                while not expected <= {e.payload.task_id for e in completed.events}:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(3)  # a late duplicate (a redelivery run twice) would show up by now
            per_task = Counter(e.payload.task_id for e in completed.events if e.payload.task_id in expected)
            assert set(per_task) == expected
            assert [t for t, n in per_task.items() if n != 1] == []
            assert len({e.payload.deliberation_id for e in completed.events if e.payload.task_id in expected}) == 30

            # Both replicas did work: A before it died, B the rest (and what A had in hand).
            done_by_b = completed_in_log(b)
            assert done_by_a & expected and done_by_b & expected, (done_by_a, done_by_b)
            assert (done_by_a | done_by_b) >= expected
            assert not (done_by_a & done_by_b & expected), "a task deliberated to completion by both"

            # The survivor answers for every task, including those the dead replica ran.
            for task_id in sorted(expected):
                got = (await stub_b.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))).result
                assert got.status == dpb.DELIBERATION_STATUS_COMPLETED, (task_id, got.error_message)
            print(
                f"replica A completed {len(done_by_a & expected)} before its SIGKILL (at {at_kill} of {APPROVALS}), "
                f"replica B {len(done_by_b & expected)}"
            )
    finally:
        a.stop(5)
        assert b.stop(15) == 0, b.log_tail()
