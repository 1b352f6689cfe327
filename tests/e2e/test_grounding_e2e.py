"""Grounded deliberation through the whole fleet (`fleet up`'s processes: NATS, Valkey, FalkorDB, Ray, the sandbox,
context, ray-executor, orchestrator, monitoring), with the agents' answers scripted by a loopback OpenAI-compatible
server, so that which proposal must win is known: the proposals' code runs in the real sandbox (bwrap) on the Ray
executor's path, failing proposals are gated out, and a plan's QA task runs after DEV's, on DEV's winning code.

The rest of the e2e suite runs the real vLLM, whose answers no test can script; this module starts its own fleet
(on the scripted LLM) and only on this machine: an external fleet (Kubernetes) has no scripted LLM.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import httpx
import pytest
from openai_server import start_openai_server

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import auth
from services.common import events as ev
from services.deliberation.proto import result_from_proto
from services.local.demo import SLUGIFY_TESTS, publish_approval
from services.local.fleet import FleetOptions, LocalFleet, user_token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

WRONG = "```python\ndef slugify(title):\n    return title.lower()\n```\n"
RIGHT = (
    "```python\nimport re\n\n\ndef slugify(title):\n    return '-'.join(re.findall(r'[a-z0-9]+', title.lower()))\n```\n"
)
ALSO_RIGHT = (
    "```python\ndef slugify(title: str) -> str:\n"
    "    kept = ''.join(c if c.isalnum() else ' ' for c in title.lower())\n"
    "    return '-'.join(kept.split())\n```\n"
)
QA_TESTS = (
    "```python\nfrom solution import slugify\n\n\ndef test_empty_title():\n    assert slugify('') == ''\n\n\n"
    "def test_digits_stay():\n    assert slugify('Top 10 Tips') == 'top-10-tips'\n```\n"
)
ENDED = (dpb.DELIBERATION_STATUS_COMPLETED, dpb.DELIBERATION_STATUS_FAILED, dpb.DELIBERATION_STATUS_TIMEOUT)
SCRIPT = {
    "You are agent-dev-001": WRONG,
    "You are agent-dev-002": RIGHT,
    "You are agent-dev-003": ALSO_RIGHT,
    "You are agent-qa-": QA_TESTS,
}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFleet, object]]:
    if os.environ.get("ORCHESTRATOR_ADDRESS"):
        pytest.skip("an external fleet (ORCHESTRATOR_ADDRESS) has no scripted LLM: these tests start their own")
    llm = start_openai_server(delay_ms=20)
    llm.control(answer_when_contains=SCRIPT)
    options = FleetOptions(
        base_dir=tmp_path_factory.mktemp("grounded-fleet"), llm_url=llm.url, llm_model="test-model", executor="ray"
    )
    try:
        with LocalFleet(options) as fleet:
            yield fleet, llm
    finally:
        llm.stop()


@pytest.fixture
async def orchestrator(scripted):
    fleet, _ = scripted
    token = auth.BearerToken(value=user_token(fleet.endpoints))
    async with auth.channel(fleet.endpoints["orchestrator"], token) as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


def checks_of(result, author: str) -> dict:
    return {c.name: c for c in next(r for r in result.results if r.proposal.author_id == author).checks}


async def test_a_proposal_whose_visible_tests_fail_loses_to_one_that_passes(orchestrator):
    task_id = f"T-grounded-{uuid.uuid4().hex[:6]}"
    request = pb.DeliberateRequest(
        task_id=task_id,
        task_description="Write slugify(title) -> str: lowercase ASCII words joined by '-'.",
        role="DEV",
        constraints=dpb.Constraints(tests=SLUGIFY_TESTS, timeout_seconds=300),
    )
    result = result_from_proto((await orchestrator.Deliberate(request, timeout=360)).result)
    assert result.status == "COMPLETED", result.error_message
    assert result.executor == "ray"
    failing = checks_of(result, "agent-dev-001")["tests.task"]
    assert not failing.passed and "sandbox bwrap" in failing.detail
    assert any("'hello world' == 'hello-world'" in f.message for f in failing.findings), failing.findings
    assert result.winner_id in ("agent-dev-002", "agent-dev-003") and result.selection.method == "ARCHITECT"
    assert result.verified and "3/3 passed" in result.verified_reason


async def test_a_plan_runs_qa_on_devs_verified_code_and_the_dashboard_shows_it(scripted, orchestrator):
    fleet, _ = scripted
    story = f"S-grounded-{uuid.uuid4().hex[:6]}"
    approval = ev.PlanApproved(
        story_id=story,
        plan_id="P-1",
        approved_by="e2e@swe-ai-fleet",
        timestamp=datetime.now(UTC),
        roles=[ev.Role.DEV, ev.Role.QA],
        tasks=[
            ev.PlanTask(task_id=f"{story}-dev", role=ev.Role.DEV, description="Write slugify.", tests=SLUGIFY_TESTS),
            ev.PlanTask(
                task_id=f"{story}-qa", role=ev.Role.QA, description="Test slugify.", depends_on=[f"{story}-dev"]
            ),
        ],
    )
    await publish_approval(fleet.endpoints["monitoring"], approval, user_token(fleet.endpoints))
    results = {}
    async with asyncio.timeout(300):
        for task_id in (f"{story}-qa", f"{story}-dev"):  # QA ends last: then DEV's record carries the link
            while True:
                try:
                    reply = await orchestrator.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id))
                    if reply.result.status in ENDED:
                        results[task_id] = result_from_proto(reply.result)
                        break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
                await asyncio.sleep(1)
    dev, qa = results[f"{story}-dev"], results[f"{story}-qa"]
    assert dev.status == qa.status == "COMPLETED", (dev.error_message, qa.error_message)
    assert dev.finished_at <= qa.started_at  # QA started once DEV had completed
    assert dev.verified and qa.verified
    own = checks_of(qa, qa.winner_id)["tests.own"]
    assert own.passed and "against the code it builds on: 2/2 passed" in own.detail
    assert any(n.startswith(f"QA task {story}-qa's winning tests against DEV task {story}-dev") for n in dev.notes)

    headers = {"Authorization": f"Bearer {user_token(fleet.endpoints)}"}
    async with httpx.AsyncClient(base_url=fleet.endpoints["monitoring"], timeout=10, headers=headers) as http:
        assert (await http.get(f"/api/deliberations/{story}-dev", headers={"Authorization": ""})).status_code == 401
        shown = (await http.get(f"/api/deliberations/{story}-dev")).json()
    assert shown["verified"] is True and shown["verified_reason"] == dev.verified_reason
