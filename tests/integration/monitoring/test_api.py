"""The monitoring JSON API and live feed against a real NATS JetStream."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.common import events as ev
from services.common.bus import EventBus, provision_streams
from services.deliberation.domain import DeliberationResult, Task, load
from services.monitoring.main import RunningMonitoring, start

from .conftest import SSEReader, approval_payload, eventually, monitoring_settings, port_of, wait_ready

pytestmark = pytest.mark.integration

LOGIN_TESTS = "from solution import login\n\n\ndef test_login():\n    assert login('po', 'secret')\n"
PLAN = {"story_id": "S-1", "plan_id": "P-1", "approved_by": "po"}


def task(task_id: str, **over: object) -> dict:
    return {"task_id": task_id, "role": "DEV", "description": f"do {task_id}", **over}


async def test_probes_and_metrics(client: httpx.AsyncClient):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    deps = (await client.get("/api/dependencies")).json()
    assert {s["stream"] for s in deps["streams"] if s["ok"]} == set(ev.STREAMS)
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and "fleet_monitoring_feed_clients" in metrics.text


async def test_approve_plan_publishes_a_valid_event(client: httpx.AsyncClient, bus: EventBus):
    body = {
        "story_id": "S-7",
        "plan_id": "P-3",
        "approved_by": "po@example.com",
        "title": "Add login",
        "roles": ["DEV", "QA"],
        "tasks": [
            {"task_id": "T-1", "role": "DEV", "description": "write the login endpoint", "tests": LOGIN_TESTS},
            {"task_id": "T-2", "role": "QA", "description": "test the login endpoint", "depends_on": ["T-1"]},
        ],
    }
    r = await client.post("/api/approve-plan", json=body, headers={"Idempotency-Key": "approve-s7-p3"})
    assert r.status_code == 201, r.text
    accepted = r.json()
    assert accepted["event_id"] == "approve-s7-p3" and accepted["stream"] == ev.Streams.PLANNING_EVENTS
    assert accepted["duplicate"] is False

    stored = await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, accepted["seq"])
    event = ev.parse_event(stored.data, stored.subject)  # what every consumer does: strict catalog validation
    assert stored.headers["Nats-Msg-Id"] == accepted["event_id"] == event.event_id
    assert isinstance(event.payload, ev.PlanApproved)
    assert event.payload.roles == [ev.Role.DEV, ev.Role.QA]
    assert event.payload.tasks[0].description == "write the login endpoint"
    assert event.payload.tasks[0].tests == LOGIN_TESTS.strip()  # trimmed, as the catalog does
    assert event.payload.tasks[1].depends_on == ["T-1"]
    assert event.producer == ev.MONITORING and event.correlation_id == "S-7:P-3"
    assert event.payload.timestamp.tzinfo is not None  # filled in by the service

    again = await client.post("/api/approve-plan", json=body, headers={"Idempotency-Key": "approve-s7-p3"})
    assert again.status_code == 201 and again.json()["duplicate"] is True
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 1


async def test_the_longest_ids_are_accepted(client: httpx.AsyncClient):
    body = {"story_id": "S" * 128, "plan_id": "P" * 128, "approved_by": "a" * 120}
    r = await client.post("/api/approve-plan", json=body)
    assert r.status_code == 201, r.text
    assert len(r.json()["correlation_id"]) == 128


async def test_what_the_schema_calls_valid_is_accepted_and_published_as_the_catalog_has_it(
    client: httpx.AsyncClient, bus: EventBus
):
    body = {
        **PLAN,
        "approved_by": " po@example.com ",  # trimmed in the event, as the catalog does
        "timestamp": "2026-12-04T10:00:00+01:00",
        "tasks": [task("T-1", priority=3.0)],  # JSON Schema's integer: 3.0 is 3
    }
    r = await client.post("/api/approve-plan", json=body)
    assert r.status_code == 201, r.text
    stored = await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, r.json()["seq"])
    payload = ev.parse_event(stored.data, stored.subject).payload
    assert payload.approved_by == "po@example.com" and payload.tasks[0].priority == 3
    assert payload.timestamp.isoformat() == "2026-12-04T10:00:00+01:00"


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"story_id": "S-1", "approved_by": "po"}, ["body", "plan_id"], "Field required"),
        ({"plan_id": "P-1", "approved_by": "po"}, ["body", "story_id"], "Field required"),
        ({"story_id": "S 1", "plan_id": "P-1", "approved_by": "po"}, ["body", "story_id"], "pattern"),
        ({"story_id": "S-1", "plan_id": "P-1", "approved_by": "po", "roles": ["DEV", "CEO"]}, ["body", "roles", 1], ""),
        (
            {"story_id": "S-1", "plan_id": "P-1", "approved_by": "po", "roles": ["DEV", "DEV"]},
            ["body", "roles"],
            "repeat",
        ),
        (
            {"story_id": "S-1", "plan_id": "P-1", "approved_by": "po", "tasks": [{"task_id": "T", "role": "DEV"}]},
            ["body", "tasks", 0, "description"],
            "Field required",
        ),
        ({"story_id": "S-1", "plan_id": "P-1", "approved_by": "po", "surprise": 1}, ["body", "surprise"], "Extra"),
        # What the catalog's validators enforce beyond the types.
        ({**PLAN, "roles": []}, ["body", "roles"], "at least one role"),
        ({**PLAN, "approved_by": "   "}, ["body", "approved_by"], "at least 1 character"),
        ({**PLAN, "story_id": " S-1"}, ["body", "story_id"], "pattern"),  # taken as sent, not trimmed
        ({**PLAN, "tasks": [task("T-1"), task("T-1")]}, ["body", "tasks"], "task ids must be unique"),
        ({**PLAN, "tasks": [task("T-1", depends_on=["T-9"])]}, ["body", "tasks"], "tasks[0].depends_on: 'T-9' is not"),
        (
            {**PLAN, "tasks": [task("T-1", depends_on=["T-2"]), task("T-2", depends_on=["T-1"])]},
            ["body", "tasks"],
            "depends_on: a cycle: T-1 -> T-2 -> T-1",
        ),
        ({**PLAN, "tasks": [task("T-1", tests="def test_x(:\n")]}, ["body", "tasks", 0, "tests"], "not valid Python"),
        ({**PLAN, "tasks": [task("T-1", tests="x = 1\n")]}, ["body", "tasks", 0, "tests"], "no test function"),
        ({**PLAN, "tasks": [task("T-1", priority="3")]}, ["body", "tasks", 0, "priority"], "valid integer"),
        ({**PLAN, "tasks": [task("T-1", priority=2.5)]}, ["body", "tasks", 0, "priority"], "valid integer"),
        ({**PLAN, "timestamp": "2026-12-04T10:00:00"}, ["body", "timestamp"], "timezone"),
    ],
)
async def test_approve_plan_rejects_invalid_input_naming_the_field(
    client: httpx.AsyncClient, bus: EventBus, body: dict, loc: list, message: str
):
    r = await client.post("/api/approve-plan", json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"] == loc and message in e["msg"] for e in errors), errors
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 0


async def test_live_feed_replays_history_then_streams_new_events(
    nats_url: str, bus: EventBus, monitoring: RunningMonitoring, client: httpx.AsyncClient
):
    before = await bus.publish(ev.make_event(approval_payload("S-old"), ev.PO_UI))
    first = ev.make_event(approval_payload("S-1"), ev.PO_UI)
    await bus.publish(first)
    await eventually(lambda: _has_event(client, first.event_id))

    async with client.stream("GET", "/api/events/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        sse = SSEReader(response)
        replayed = [data async for data in _until_replayed(sse)]
        assert [e["story_id"] for e in replayed if e["family"] == "planning"] == ["S-old", "S-1"]
        assert replayed[-1]["event_id"] == first.event_id and replayed[-1]["payload"]["approved_by"] == "po"

        # Live: an orchestrator event and a token chunk, which carries no story: the feed knows it from the
        # deliberation.
        started = ev.DeliberationStarted(
            deliberation_id="D-1",
            task_id="T-1",
            role=ev.Role.DEV,
            council_id="council-dev",
            story_id="S-1",
            num_agents=3,
        )
        chunk = ev.TokenChunk(
            deliberation_id="D-1", agent_id="agent-dev-001", phase="GENERATE", kind="tokens", seq=1, text="def f"
        )
        started_event = ev.make_event(started, ev.ORCHESTRATOR)
        await bus.publish(started_event)
        # Two streams, two consumers: let the feed see the deliberation before its tokens.
        await eventually(lambda: _has_event(client, started_event.event_id))
        await bus.publish(ev.make_event(chunk, ev.ORCHESTRATOR))
        _, live = await sse.until(lambda k, d: k == "feed" and d["event_type"] == "vllm.streaming.chunk")
        assert live["story_id"] == "S-1" and live["family"] == "vllm" and live["payload"]["text"] == "def f"

    # A filtered stream gets only its family and story.
    async with client.stream("GET", "/api/events/stream", params={"family": "planning", "story": "S-old"}) as response:
        replayed = [data async for data in _until_replayed(SSEReader(response))]
        assert [e["seq"] for e in replayed] == [before.seq]

    # The same history over plain JSON, and the deliberation the events describe.
    events = (await client.get("/api/events", params={"story": "S-1"})).json()
    assert [e["event_type"] for e in events] == [
        "planning.plan.approved",
        "orchestration.deliberation.started",
        "vllm.streaming.chunk",
    ]
    (summary,) = (await client.get("/api/deliberations", params={"story": "S-1"})).json()
    assert summary["status"] == "IN_PROGRESS" and summary["agents"] == ["agent-dev-001"]

    # A monitoring instance started later replays the stream's recent history from JetStream.
    late = await start(monitoring_settings(nats_url), port=0)
    try:
        async with httpx.AsyncClient(base_url=late.url) as c2:
            await wait_ready(c2)
            await eventually(lambda: _has_event(c2, first.event_id))
    finally:
        await late.stop()


async def _has_event(client: httpx.AsyncClient, event_id: str) -> bool:
    return any(e["event_id"] == event_id for e in (await client.get("/api/events")).json())


async def _until_replayed(sse: SSEReader):
    async with asyncio.timeout(10):
        while True:
            kind, data = await sse.next()
            if kind == "replayed":
                return
            assert kind == "feed"
            yield data


async def test_dead_letters_are_listed_with_their_reasons(client: httpx.AsyncClient, bus: EventBus):
    original = ev.make_event(approval_payload("S-9"), ev.PO_UI)
    H = ev.DeadLetterHeaders
    headers = {
        H.REASON: "handler failed after 5 deliveries: RuntimeError('graph down')",
        H.STREAM: ev.Streams.PLANNING_EVENTS,
        H.SUBJECT: original.subject,
        H.CONSUMER: "context-plan-approved",
        H.DELIVERIES: "5",
        H.STREAM_SEQ: "12",
        H.EVENT_ID: original.event_id,
    }
    await bus.js.publish(ev.dead_letter_subject(original.subject), original.to_json(), headers=headers)
    # An unparsable body dead-lettered by the bus itself.
    junk_headers = {
        H.REASON: "not JSON: Expecting value",
        H.SUBJECT: original.subject,
        H.CONSUMER: "orchestrator-plan-approved",
    }
    await bus.js.publish(ev.dead_letter_subject(original.subject), b"{oops", headers=junk_headers)

    letters = await eventually(lambda: _dead_letters(client, 2))
    junk, valid = letters  # newest first
    assert valid["dead_letter"] == {
        "reason": headers[H.REASON],
        "original_subject": original.subject,
        "original_stream": ev.Streams.PLANNING_EVENTS,
        "consumer": "context-plan-approved",
        "deliveries": 5,
        "original_seq": 12,
        "original_event_id": original.event_id,
    }
    assert valid["family"] == "deadletter" and valid["story_id"] == "S-9" and valid["payload"]["story_id"] == "S-9"
    assert junk["dead_letter"]["reason"] == "not JSON: Expecting value"
    assert junk["raw"] == "{oops" and "not JSON" in junk["error"]


async def _dead_letters(client: httpx.AsyncClient, n: int) -> list | None:
    letters = (await client.get("/api/dead-letters")).json()
    return letters if len(letters) >= n else None


async def test_orchestrator_down_is_reported_not_an_error(client: httpx.AsyncClient, monitoring: RunningMonitoring):
    address = monitoring.monitoring.settings.orchestrator_address
    for path in ("/api/councils", "/api/deliberations/T-1", "/api/orchestrator/status"):
        r = await client.get(path)
        assert r.status_code == 503, path
        assert r.json()["dependency"] == "orchestrator"
        assert r.json()["detail"].startswith(f"orchestrator unavailable at {address}")
    deps = (await client.get("/api/dependencies")).json()
    orch = next(d for d in deps["dependencies"] if d["name"] == "orchestrator")
    assert orch["ok"] is False and address in orch["detail"]
    assert deps["ready"] is True  # the orchestrator is not needed to be ready


async def test_a_slow_client_is_dropped_without_slowing_the_feed(nats_url: str, bus: EventBus):
    running = await start(monitoring_settings(nats_url, monitoring_client_queue_size=100), port=0)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as c:
            await wait_ready(c)
            async with c.stream("GET", "/api/events/stream") as slow, c.stream("GET", "/api/events/stream") as fast:
                fast_sse = SSEReader(fast)
                await fast_sse.until(lambda k, d: k == "replayed")
                # ~12 MB in batches, each published once the reading client has the previous one: it never lags
                # more than a batch. The client that does not read fills the loopback socket buffers, then its
                # queue, and is dropped.
                text = "x" * 3900
                total, batch = 3000, 50
                kinds: list[str] = []
                async with asyncio.timeout(60):
                    for i in range(0, total, batch):
                        events = [
                            ev.make_event(approval_payload(f"S-{i + j}", description=text), ev.PO_UI)
                            for j in range(batch)
                        ]
                        await bus.publish_many(events)
                        while kinds.count("feed") < i + batch:
                            kind, _ = await fast_sse.next()
                            kinds.append(kind)
                assert set(kinds) == {"feed"}  # the reading client got every event, and no notice
                # The slow one finally reads: whatever was buffered, then the notice, then the end.
                kind, data = await SSEReader(slow).until(lambda k, d: k == "dropped", timeout=30)
                assert "fell more than 100 events behind" in data["reason"]
            metrics = (await c.get("/metrics")).text
            assert "fleet_monitoring_feed_clients_dropped_total" in metrics
    finally:
        await running.stop()


async def test_orchestrator_is_read_when_it_comes_back_and_missed_when_it_goes(
    client: httpx.AsyncClient, monitoring: RunningMonitoring, orchestrator_on
):
    address = monitoring.monitoring.settings.orchestrator_address
    assert (await client.get("/api/councils")).status_code == 503
    orchestrator = await orchestrator_on(port_of(address))
    try:
        councils = await eventually(lambda: _ok_json(client, "/api/councils"), timeout=10)
        dev = next(c for c in councils["councils"] if c["role"] == "DEV")
        assert dev["council_id"] == "council-dev" and [a["agent_id"] for a in dev["agents"]] == [
            "agent-dev-001",
            "agent-dev-002",
            "agent-dev-003",
        ]
        task = Task.create("T-1", "Write a Python function that parses ISO dates.", "DEV", rounds=1)
        ran = await orchestrator.app.deliberate(task)
        result = (await client.get("/api/deliberations/T-1")).json()
        assert load(DeliberationResult, result) == ran  # the whole result, as the orchestrator recorded it
        assert result["status"] == "COMPLETED" and result["selection"]["method"] in ("ARCHITECT", "FALLBACK")
        assert result["context_note"] == ran.context_note != ""  # no story: the council worked on the task alone
        assert len(result["results"][0]["proposal"]["revisions"]) == 2  # the original and the revision
        assert set(result["phase_durations_ms"]) >= {"GENERATE", "CHECK", "SCORE"}
        # No test for the code (the task has none, the proposals wrote none): not verified, and the result says why.
        assert result["verified"] is False and "no test was executed" in result["verified_reason"]
        checks = {c["name"]: c for c in result["results"][0]["checks"]}
        assert checks["tests.task"] == {
            "name": "tests.task",
            "passed": True,
            "applicable": False,
            "findings": [],
            "detail": "the task has no tests",
            "gating": True,
        }
        rubric = {c.name for c in task.constraints.rubric}
        assert all(set(v["scores"]) == rubric for r in result["results"] for v in r["votes"])
        missing = await client.get("/api/deliberations/missing-1")
        assert missing.status_code == 404 and "missing-1" in missing.json()["detail"]
        status = (await client.get("/api/orchestrator/status")).json()
        assert status["stats"]["deliberations_by_status"] == {"COMPLETED": 1}
        deps = await eventually(lambda: _orchestrator_ok(client, True))
        assert deps["detail"] == "serving"
    finally:
        await orchestrator.stop(0)
    assert (await client.get("/api/councils")).status_code == 503
    await eventually(lambda: _orchestrator_ok(client, False))


async def _ok_json(client: httpx.AsyncClient, path: str):
    r = await client.get(path)
    return r.json() if r.status_code == 200 else None


async def _orchestrator_ok(client: httpx.AsyncClient, ok: bool):
    deps = (await client.get("/api/dependencies")).json()["dependencies"]
    orch = next(d for d in deps if d["name"] == "orchestrator")
    return orch if orch["ok"] is ok else None


async def test_a_stream_deleted_and_provisioned_again_is_followed(client: httpx.AsyncClient, bus: EventBus):
    await bus.publish(ev.make_event(approval_payload("S-before"), ev.PO_UI))
    await eventually(lambda: _stories(client, {"S-before"}))
    await bus.js.delete_stream(ev.Streams.PLANNING_EVENTS)
    body = await wait_ready(client, ready=False)
    assert any("PLANNING_EVENTS does not exist" in r for r in body["reasons"]), body
    await provision_streams(bus.js, bus.settings)
    await wait_ready(client)
    again = await bus.publish(ev.make_event(approval_payload("S-after"), ev.PO_UI))
    assert again.seq == 1  # a new stream: sequences start over, and the feed still takes them
    await eventually(lambda: _stories(client, {"S-before", "S-after"}))


async def _stories(client: httpx.AsyncClient, wanted: set[str]) -> bool:
    return wanted <= {e["story_id"] for e in (await client.get("/api/events")).json()}
