"""The event catalog: validation, envelopes, and agreement of every exported contract with the models."""

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from services.cli import export_contracts
from services.common import events as c

ROOT = Path(__file__).resolve().parents[3]


def approval(**over):
    data = {
        "story_id": "S-1",
        "plan_id": "P-1",
        "approved_by": "po@example.com",
        "timestamp": "2026-11-25T10:00:00Z",
    }
    data.update(over)
    return json.dumps(
        {"event_type": "planning.plan.approved", "producer": "po-ui", "payload": data, "event_id": "e1"}
    ).encode()


def test_plan_approved_minimal_is_valid_and_means_all_roles():
    env = c.parse_event(approval(), "planning.plan.approved")
    assert env.payload.requested_roles() == list(c.Role)
    assert env.payload.timestamp == datetime(2026, 11, 25, 10, tzinfo=UTC)


@pytest.mark.parametrize("missing", ["story_id", "plan_id", "approved_by", "timestamp"])
def test_plan_approved_names_each_missing_field(missing):
    raw = json.loads(approval())
    del raw["payload"][missing]
    with pytest.raises(c.InvalidEvent, match=rf"payload\.{missing}: Field required"):
        c.parse_event(json.dumps(raw).encode())


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"roles": ["DEV", "CEO"]}, r"payload\.roles\.1"),
        ({"roles": ["DEV", "DEV"]}, "must not repeat"),
        ({"roles": []}, "at least one role"),
        ({"story_id": "has space"}, r"payload\.story_id"),
        ({"story_id": "a.b"}, r"payload\.story_id"),
        ({"surprise": 1}, r"payload\.surprise: Extra inputs"),
        ({"timestamp": "yesterday"}, r"payload\.timestamp"),
        ({"tasks": [{"task_id": "T1", "description": "x", "role": "DEV"}] * 2}, "task ids must be unique"),
        ({"tasks": [{"task_id": "T1", "description": "", "role": "DEV"}]}, r"tasks\.0\.description"),
    ],
)
def test_plan_approved_rejects_bad_values(over, message):
    with pytest.raises(c.InvalidEvent, match=message):
        c.parse_event(approval(**over))


def task(task_id: str, role: str = "DEV", depends_on=(), **over) -> dict:
    return {"task_id": task_id, "description": f"do {task_id}", "role": role, "depends_on": list(depends_on), **over}


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([task("A", depends_on=["A"])], r"tasks\[0\]\.depends_on: task A depends on itself"),
        ([task("A"), task("B", "QA", ["Z"])], r"tasks\[1\]\.depends_on: 'Z' is not a task of this plan"),
        (
            [task("A", depends_on=["C"]), task("B", "QA", ["A"]), task("C", "DATA", ["B"])],
            r"tasks\[\d\]\.depends_on: a cycle: (A -> C -> B -> A|B -> A -> C -> B|C -> B -> A -> C)",
        ),
        ([task("A", tests="def test_x(:\n")], r"tasks\.0\.tests: .*not valid Python: line 1"),
        ([task("A", tests="x = 1\n")], r"tasks\.0\.tests: .*defines no test function"),
    ],
)
def test_a_plan_is_a_dag_with_usable_tests(tasks, message):
    """Cycles, unknown or self dependencies and unusable tests are refused at validation (so the approval is
    dead-lettered once, the field named), never discovered by a deliberation that waits forever."""
    with pytest.raises(c.InvalidEvent, match=message):
        c.parse_event(approval(tasks=tasks))


def test_a_valid_dag_with_tests_is_accepted():
    tests = "from solution import slugify\n\n\ndef test_spaces():\n    assert slugify('a b') == 'a-b'\n"
    env = c.parse_event(approval(tasks=[task("A", tests=tests), task("B", "QA", ["A"]), task("C", "DATA", ["A", "B"])]))
    assert [t.depends_on for t in env.payload.tasks] == [[], ["A"], ["A", "B"]]
    assert env.payload.tasks[0].tests == tests.strip()  # the catalog trims text fields


def test_strict_validation_does_not_coerce():
    with pytest.raises(c.InvalidEvent, match="priority"):
        c.parse_event(approval(tasks=[{"task_id": "T1", "description": "x", "role": "DEV", "priority": "3"}]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"event_type": "planning.plan.rejected"}', "unknown event_type"),
    ],
)
def test_unparsable_or_unknown_events(data, message):
    with pytest.raises(c.InvalidEvent, match=message):
        c.parse_event(data)


def test_event_on_the_wrong_subject_is_invalid():
    with pytest.raises(c.InvalidEvent, match="does not belong on subject"):
        c.parse_event(approval(), "orchestration.task.dispatched")


def test_envelope_round_trip_keeps_ids_and_typed_payload():
    payload = c.TokenChunk(
        deliberation_id="delib-1", agent_id="agent-dev-001", phase="GENERATE", kind="tokens", seq=3, text="hi"
    )
    env = c.make_event(payload, "orchestrator", correlation_id="cid-1")
    assert env.subject == "vllm.streaming.delib-1.agent-dev-001"
    back = c.parse_event(env.to_json(), env.subject)
    assert back.event_id == env.event_id and back.correlation_id == "cid-1"
    assert back.payload == payload
    assert c.subject_matches(c.EVENTS["vllm.streaming.chunk"].subject_pattern, env.subject)


def test_every_event_and_consumer_subject_is_carried_by_exactly_one_stream():
    for spec in c.EVENTS.values():
        assert c.stream_for_subject(spec.subject_pattern) == [spec.stream], spec.event_type
    for consumer in c.CONSUMERS.values():
        for subject in consumer.filter_subjects:
            assert subject in c.EVENTS, f"{consumer.durable} listens to {subject}, which no event has"
            assert c.stream_for_subject(subject) == [consumer.stream], consumer.durable
    assert c.stream_for_subject(c.dead_letter_subject("planning.plan.approved")) == [c.Streams.DEAD_LETTERS]


def test_stream_subject_filters_do_not_overlap():
    filters = [(s.name, f) for s in c.STREAMS.values() for f in s.subjects]
    for name, f in filters:
        probe = f.replace(">", "x.y").replace("*", "x")
        owners = [n for n, g in filters if c.subject_matches(g, probe)]
        assert owners == [name], f"{f} overlaps {owners}"


def test_subject_matching():
    assert c.subject_matches("a.>", "a.b.c") and not c.subject_matches("a.>", "a")
    assert c.subject_matches("a.*.c", "a.b.c") and not c.subject_matches("a.*", "a.b.c")


# (`vllm.entrypoints...` is vLLM's Python module, not a subject.)
SUBJECT_LITERAL = re.compile(
    r"""["'](planning|orchestration|agent|context|vllm|deadletter)\.(?!entrypoints)[a-z_*>{]"""
)


def test_no_subject_is_spelled_outside_the_catalog():
    offenders = []
    for path in (ROOT / "services").rglob("*.py"):
        if path.name == "events.py" and path.parent.name == "common":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if SUBJECT_LITERAL.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "use services.common.events instead:\n" + "\n".join(offenders)


def test_exported_contracts_match_the_models(tmp_path):
    """specs/events/*.json and specs/asyncapi.yaml are regenerated and compared byte for byte."""
    export_contracts(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT / "specs") for p in [*(ROOT / "specs/events").glob("*"), ROOT / "specs/asyncapi.yaml"]
    )
    assert fresh == committed, "run `make events` and commit"
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (ROOT / "specs" / rel).read_text(), f"{rel} is stale: run `make events`"


def test_asyncapi_describes_every_event_and_consumer():
    doc = yaml.safe_load((ROOT / "specs/asyncapi.yaml").read_text())
    addresses = {ch["address"] for ch in doc["channels"].values()}
    for spec in c.EVENTS.values():
        assert (spec.subject_template or spec.event_type) in addresses
        schema = json.loads((ROOT / "specs/events" / f"{spec.event_type}.schema.json").read_text())
        assert set(schema["properties"]["payload"]["$ref"].split("/")[-1:]) == {spec.payload.__name__}
    for consumer in c.CONSUMERS.values():
        assert doc["operations"][consumer.durable]["action"] == "receive"
