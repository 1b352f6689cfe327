"""Grounded deliberation through the orchestrator: real gRPC, NATS, Valkey, the real sandbox service (bwrap) and
the loopback OpenAI-compatible server with each agent's answer scripted, so that what must win is known."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import grpc
import pytest

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.deliberation.proto import result_from_proto
from services.local.demo import SLUGIFY_TESTS
from services.orchestrator.main import start

from .test_orchestrator_api import create_all
from .test_plan_approvals import Recorder

pytestmark = pytest.mark.integration

WRONG = "```python\ndef slugify(title):\n    return title.lower()\n```\n"
RIGHT = (
    "```python\nimport re\n\n\ndef slugify(title):\n    return '-'.join(re.findall(r'[a-z0-9]+', title.lower()))\n```\n"
)
ALSO_RIGHT = (
    "```python\ndef slugify(title: str) -> str:\n"
    "    kept = ''.join(c if c.isalnum() else ' ' for c in title.lower())\n"
    "    return '-'.join(kept.split())\n```\n"
)
NO_CODE = "Lowercase the title, drop the punctuation and join the words with dashes. That is all it takes."
QA_TESTS = (
    "```python\nfrom solution import slugify\n\n\ndef test_empty_title():\n    assert slugify('') == ''\n\n\n"
    "def test_digits_stay():\n    assert slugify('Top 10 Tips') == 'top-10-tips'\n```\n"
)


@pytest.fixture
async def grounded(orch_settings, bus, sandbox_address, llm_server):
    """An orchestrator that runs every proposal's code in the real sandbox."""
    running = await start(orch_settings.model_copy(update={"sandbox_address": sandbox_address}), host="127.0.0.1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await create_all(stub)
        yield stub
    await running.stop(0.5)
    await llm_server.acontrol(reset=True)


def checks_of(result, author: str) -> dict:
    ranked = next(r for r in result.results if r.proposal.author_id == author)
    return {c.name: c for c in ranked.checks}


async def test_only_proposals_that_pass_the_tests_reach_the_final(grounded, llm_server):
    await llm_server.acontrol(
        answer_when_contains={
            "You are agent-dev-001": WRONG,
            "You are agent-dev-002": RIGHT,
            "You are agent-dev-003": ALSO_RIGHT,
        }
    )
    request = pb.DeliberateRequest(
        task_id="T-slug",
        task_description="Write slugify(title) -> str: lowercase ASCII words joined by '-'.",
        role="DEV",
        constraints=dpb.Constraints(tests=SLUGIFY_TESTS, timeout_seconds=60),
    )
    result = result_from_proto((await grounded.Deliberate(request)).result)
    assert result.status == "COMPLETED", result.error_message
    wrong = checks_of(result, "agent-dev-001")["tests.task"]
    assert not wrong.passed and wrong.gating and "sandbox bwrap" in wrong.detail
    assert any("assert 'hello world' == 'hello-world'" in f.message for f in wrong.findings), wrong.findings
    assert [r.proposal.author_id for r in result.results][-1] == "agent-dev-001"  # gated out of the final
    assert result.winner_id in ("agent-dev-002", "agent-dev-003")
    assert result.selection.method == "ARCHITECT"  # the two that pass are the finalists
    assert result.verified and "tests.task (the task's tests: 3/3 passed" in result.verified_reason
    # what the critic of agent-dev-001 and then its author were shown: the failing test and its assertion
    shown = {}
    for r in await llm_server.arequests():
        did, phase, _, agent, *target = r["request_id"].split(":")
        if did == result.deliberation_id and (
            target == ["agent-dev-001"] or (phase, agent) == ("REVISE", "agent-dev-001")
        ):
            shown[phase] = r["body"]["messages"][-1]["content"]
    assert set(shown) == {"CRITIQUE", "REVISE"}
    assert all("FAILED tests.task" in text and "'hello world' == 'hello-world'" in text for text in shown.values())


async def test_a_code_task_without_code_fails_its_deliverable_and_never_wins_over_code(grounded, llm_server):
    await llm_server.acontrol(
        answer_when_contains={
            "You are agent-dev-001": NO_CODE,
            "You are agent-dev-002": NO_CODE,
            "You are agent-dev-003": RIGHT,
        }
    )
    request = pb.DeliberateRequest(
        task_id="T-nocode",
        task_description="Write slugify(title) -> str.",
        role="DEV",
        constraints=dpb.Constraints(tests=SLUGIFY_TESTS, timeout_seconds=60),
    )
    result = result_from_proto((await grounded.Deliberate(request)).result)
    assert not checks_of(result, "agent-dev-001")["deliverable"].passed
    assert result.winner_id == "agent-dev-003" and result.verified
    assert result.selection.method == "FALLBACK" and "only one proposal passed" in result.selection.rationale


async def test_a_plan_runs_qa_after_dev_against_devs_winning_code(grounded, llm_server, bus):
    await llm_server.acontrol(
        answer_when_contains={
            "You are agent-dev-001": WRONG,
            "You are agent-dev-002": RIGHT,
            "You are agent-dev-003": WRONG,
            "You are agent-qa-": QA_TESTS,
        }
    )
    rec = await Recorder().start(bus, "orchestration.>")
    approval = ev.PlanApproved(
        story_id="S-dag",
        plan_id="P-1",
        approved_by="po",
        timestamp=datetime.now(UTC),
        roles=[ev.Role.DEV, ev.Role.QA],
        tasks=[
            ev.PlanTask(task_id="T-tests", role=ev.Role.QA, description="Test slugify.", depends_on=["T-dev"]),
            ev.PlanTask(task_id="T-dev", role=ev.Role.DEV, description="Write slugify.", tests=SLUGIFY_TESTS),
        ],
    )
    await bus.publish(ev.make_event(approval, ev.PO_UI))
    done = await rec.wait("orchestration.deliberation.completed", 2, timeout=120)
    order = [(e.event_type, e.payload.task_id) for e in rec.events if e.event_type.startswith("orchestration.delib")]
    assert order.index(("orchestration.deliberation.completed", "T-dev")) < order.index(
        ("orchestration.deliberation.started", "T-tests")
    ), order  # QA started once DEV had completed
    assert {e.payload.task_id: e.payload.verified for e in done} == {"T-dev": True, "T-tests": True}

    dev = result_from_proto(
        (await grounded.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-dev"))).result
    )
    qa = result_from_proto(
        (await grounded.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id="T-tests"))).result
    )
    assert dev.winner_id == "agent-dev-002"
    own = checks_of(qa, qa.winner_id)["tests.own"]
    assert own.passed and "against the code it builds on: 2/2 passed" in own.detail
    note = "QA task T-tests's winning tests against DEV task T-dev's winning code: passed"
    assert any(n.startswith(note) for n in dev.notes) and any(n.startswith(note) for n in qa.notes)
    # QA's agents were shown DEV's winning code as the code their tests build on
    qa_prompts = [
        r["body"]["messages"][0]["content"]
        for r in await llm_server.arequests()
        if r["request_id"].startswith(qa.deliberation_id)
    ]
    assert qa_prompts and all("It builds on this code" in p and "re.findall" in p for p in qa_prompts)


async def test_a_cycle_in_a_plan_is_dead_lettered_naming_the_field(grounded, bus):
    payload = {
        "story_id": "S-cyc",
        "plan_id": "P-1",
        "approved_by": "po",
        "timestamp": "2026-12-04T10:00:00Z",
        "tasks": [
            {"task_id": "A", "description": "a", "role": "DEV", "depends_on": ["B"]},
            {"task_id": "B", "description": "b", "role": "QA", "depends_on": ["A"]},
        ],
    }
    body = {"event_type": "planning.plan.approved", "producer": "po-ui", "payload": payload, "event_id": "e-cycle"}
    sub = await bus.js.subscribe("deadletter.>", ordered_consumer=True)
    await bus.js.publish("planning.plan.approved", json.dumps(body).encode())
    msg = await sub.next_msg(timeout=10)
    reason = msg.headers[ev.DeadLetterHeaders.REASON]
    assert "depends_on: a cycle: A -> B -> A" in reason or "depends_on: a cycle: B -> A -> B" in reason, reason


async def test_a_task_whose_dependency_failed_does_not_start(grounded, llm_server, bus):
    await llm_server.acontrol(fail_when_contains="You are agent-dev-", fail_status=400)
    rec = await Recorder().start(bus, "orchestration.deliberation.>")
    approval = ev.PlanApproved(
        story_id="S-blocked",
        plan_id="P-1",
        approved_by="po",
        timestamp=datetime.now(UTC),
        roles=[ev.Role.DEV, ev.Role.QA],
        tasks=[
            ev.PlanTask(task_id="T-dev-x", role=ev.Role.DEV, description="Write slugify."),
            ev.PlanTask(task_id="T-qa-x", role=ev.Role.QA, description="Test it.", depends_on=["T-dev-x"]),
        ],
    )
    await bus.publish(ev.make_event(approval, ev.PO_UI))
    failed = await rec.wait("orchestration.deliberation.failed", 2, timeout=60)
    by_task = {e.payload.task_id: e.payload.error for e in failed}
    assert by_task["T-dev-x"].startswith("all 3 agents failed in GENERATE")
    assert by_task["T-qa-x"].startswith("not started: its dependency T-dev-x ended FAILED")
    await asyncio.sleep(0.5)
    assert not [e for e in rec.events if e.event_type.endswith("started") and e.payload.task_id == "T-qa-x"]


async def test_a_sandbox_that_is_down_never_crashes_a_deliberation_and_never_verifies(orch_settings, bus, llm_server):
    from services.local.processes import free_port

    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    running = await start(orch_settings.model_copy(update={"sandbox_address": nobody}), host="127.0.0.1")
    try:
        await llm_server.acontrol(answer_when_contains={"You are agent-dev-": RIGHT})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            await create_all(stub)
            request = pb.DeliberateRequest(
                task_id="T-no-sandbox",
                task_description="Write slugify(title) -> str.",
                role="DEV",
                constraints=dpb.Constraints(tests=SLUGIFY_TESTS, timeout_seconds=60),
            )
            result = result_from_proto((await stub.Deliberate(request)).result)
    finally:
        await running.stop(0.5)
        await llm_server.acontrol(reset=True)
    assert result.status == "COMPLETED" and not result.verified
    found = checks_of(result, result.winner_id)["tests.task"]
    assert not found.passed and found.findings[0].message.startswith(f"sandbox unavailable: sandbox at {nobody}")
