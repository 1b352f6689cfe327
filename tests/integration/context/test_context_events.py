"""Events over a real NATS become nodes and edges in FalkorDB (read back through the neo4j driver); replays change
nothing; invalid events are dead-lettered; context.* events are published."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from services.common import events as ev
from services.context.domain import MAX_PROPOSAL, clip

from .conftest import T0, deliberation_event, drained, plan_event, stream_messages, wait_for

pytestmark = pytest.mark.integration

PLAN_APPROVED = ev.PAYLOAD_TYPES[ev.PlanApproved].event_type
CONTEXT_UPDATED = ev.PAYLOAD_TYPES[ev.ContextUpdated].event_type
DECISION_ADDED = ev.PAYLOAD_TYPES[ev.DecisionAdded].event_type


async def test_a_plan_approval_and_a_deliberation_become_nodes_and_edges(service, bus, graph, story_id):
    await bus.publish(plan_event(story_id))
    await wait_for(lambda: graph.story_exists(story_id))
    await drained(bus, "context-plan-approved")

    rows = await graph.run(
        "MATCH (s:Story {id: $sid})-[:HAS_PLAN]->(p:Plan)-[:HAS_TASK]->(t:Task) "
        "RETURN s.title, p.id, p.approved_by, t.id, t.role ORDER BY t.id",
        sid=story_id,
    )
    assert [r[3:] for r in rows] == [["T-api", "DEV"], ["T-db", "DATA"], ["T-e2e", "QA"], ["T-svc", "DEV"]]
    assert {tuple(r[:3]) for r in rows} == {("Order management", "P-1", "po@example.com")}
    deps = await graph.run(
        "MATCH (a:Task {story_id: $sid})-[:DEPENDS_ON]->(b:Task) RETURN a.id, b.id ORDER BY a.id", sid=story_id
    )
    assert deps == [["T-e2e", "T-svc"], ["T-svc", "T-db"]]

    await bus.publish(deliberation_event(story_id, deliberation_id="delib-1"))
    await wait_for(lambda: graph.existing(story_id, "Decision", ["DEC-delib-1"]))
    await drained(bus, "context-deliberation-completed")
    rows = await graph.run(
        "MATCH (d:Decision {story_id: $sid})-[:DECIDED_IN]->(dl:Deliberation)-[:SELECTED]->(p:Proposal) "
        "MATCH (d)-[:AFFECTS]->(t:Task) "
        "RETURN d.id, d.title, d.status, dl.id, dl.selection_method, p.id, p.author_id, t.id, t.status",
        sid=story_id,
    )
    assert rows == [
        [
            "DEC-delib-1",
            "Use an outbox table for idempotent writes",
            "ACCEPTED",
            "delib-1",
            "ARCHITECT",
            "delib-1-p2",
            "agent-2",
            "T-svc",
            "DECIDED",
        ]
    ]

    # context.updated for both writes and context.decision.added for the decision, on the CONTEXT stream.
    updated = [json.loads(m.data) for m in await stream_messages(bus, ev.Streams.CONTEXT, CONTEXT_UPDATED)]
    added = [json.loads(m.data) for m in await stream_messages(bus, ev.Streams.CONTEXT, DECISION_ADDED)]
    assert [u["payload"]["story_id"] for u in updated] == [story_id, story_id]
    assert updated[0]["payload"]["version"] != updated[1]["payload"]["version"]
    assert [a["payload"]["decision_id"] for a in added] == ["DEC-delib-1"]
    assert added[0]["payload"]["task_id"] == "T-svc" and added[0]["producer"] == ev.CONTEXT


async def test_replaying_the_same_events_changes_nothing(service, bus, graph, story_id):
    plan = plan_event(story_id)
    decision = deliberation_event(story_id, deliberation_id="delib-r")
    await bus.publish(plan)
    await drained(bus, "context-plan-approved")
    await bus.publish(decision)
    await drained(bus, "context-deliberation-completed")
    before = await graph.counts(story_id)
    assert before == {
        "edge:AFFECTS": 1,
        "edge:DECIDED_IN": 1,
        "edge:DEPENDS_ON": 2,
        "edge:HAS_PLAN": 1,
        "edge:HAS_TASK": 4,
        "edge:SELECTED": 1,
        "node:Decision": 1,
        "node:Deliberation": 1,
        "node:Plan": 1,
        "node:Proposal": 1,
        "node:Story": 1,
        "node:Task": 4,
    }
    context_events = (await bus.js.stream_info(ev.Streams.CONTEXT)).state.messages

    # The same envelopes again (past JetStream's duplicate window: a new Nats-Msg-Id), and copies under new
    # event ids (a producer that re-sent them): the seen-set skips the first, MERGE makes the second no-ops.
    for env in (plan, decision):
        await bus.js.publish(env.subject, env.to_json(), headers={"Nats-Msg-Id": env.event_id + "-again"})
        await bus.publish(env.model_copy(update={"event_id": env.event_id + "-copy"}))
    await drained(bus, "context-plan-approved")
    await drained(bus, "context-deliberation-completed")

    assert await graph.counts(story_id) == before
    # Nothing changed, so nothing was announced.
    assert (await bus.js.stream_info(ev.Streams.CONTEXT)).state.messages == context_events


async def test_a_newer_deliberation_supersedes_the_older_whatever_the_arrival_order(service, bus, graph, story_id):
    await bus.publish(plan_event(story_id))
    await drained(bus, "context-plan-approved")
    newer = deliberation_event(story_id, deliberation_id="delib-new", at=T0 + timedelta(hours=3), content="Use Kafka")
    older = deliberation_event(story_id, deliberation_id="delib-old", at=T0 + timedelta(hours=2), content="Use NATS")
    await bus.publish(newer)
    await bus.publish(older)
    await wait_for(lambda: graph.existing(story_id, "Decision", ["DEC-delib-old"]))
    await drained(bus, "context-deliberation-completed")
    rows = await graph.run(
        "MATCH (d:Decision {story_id: $sid}) OPTIONAL MATCH (d)-[:SUPERSEDES]->(o:Decision) "
        "RETURN d.id, d.status, collect(o.id) ORDER BY d.id",
        sid=story_id,
    )
    assert rows == [["DEC-delib-new", "ACCEPTED", ["DEC-delib-old"]], ["DEC-delib-old", "SUPERSEDED", []]]


async def test_a_deliberation_without_story_id_is_linked_through_its_task(service, bus, graph, story_id):
    await bus.publish(plan_event(story_id, tasks=[ev.PlanTask(task_id=f"T-{story_id}", description="x", role="QA")]))
    await drained(bus, "context-plan-approved")
    await bus.publish(
        deliberation_event(story_id, task_id=f"T-{story_id}", role="QA", deliberation_id="d-x", story_in_payload=False)
    )
    await wait_for(lambda: graph.existing(story_id, "Decision", ["DEC-d-x"]))


async def test_an_invalid_plan_approval_lands_in_dead_letters(service, bus, graph, story_id):
    good = plan_event(story_id).model_dump(mode="json")
    bad = {**good, "payload": {**good["payload"], "tasks": [{"task_id": "has spaces", "role": "CEO"}]}}
    await bus.js.publish(PLAN_APPROVED, json.dumps(bad).encode(), headers={"Nats-Msg-Id": "bad-1"})
    dead = await wait_for(lambda: stream_messages(bus, ev.Streams.DEAD_LETTERS, ev.dead_letter_subject(PLAN_APPROVED)))
    headers = dead[0].headers
    assert headers[ev.DeadLetterHeaders.CONSUMER] == "context-plan-approved"
    assert f"invalid {PLAN_APPROVED}" in headers[ev.DeadLetterHeaders.REASON]
    assert json.loads(dead[0].data) == bad
    await drained(bus, "context-plan-approved")
    assert not await graph.story_exists(story_id)


async def test_long_and_tricky_texts_round_trip(service, bus, graph, story_id):
    """Quotes, backslashes, non-ASCII and texts at their limits go through FalkorDB's Bolt port intact (writes are
    batched and records kept small, so nothing hits its 4 KB parameter or 64 KB message limits)."""
    tricky = 'it\'s a \\path\\ with "quotes",\n${x}, `ticks`, é漢字🙂 and no trailing space'
    long_text = (tricky * 60)[:4000]  # payload strings are stripped: this one ends in a letter
    tasks = [
        ev.PlanTask(task_id=f"T-{i:02d}", description=long_text, role="DEV", requirements=[tricky] * 20)
        for i in range(40)
    ]
    await bus.publish(plan_event(story_id, tasks=tasks, description=long_text, title=tricky))
    await drained(bus, "context-plan-approved")
    await bus.publish(deliberation_event(story_id, "T-00", deliberation_id="d-long", content=long_text * 3))
    await wait_for(lambda: graph.existing(story_id, "Decision", ["DEC-d-long"]), timeout=20)
    snap = await service.app.snapshot(story_id)
    assert snap.story.description == long_text and len(snap.tasks) == 40
    assert all(t.description == long_text and t.requirements == (tricky,) * 20 for t in snap.tasks)
    proposal = (await graph.proposals(story_id, ["d-long-p2"]))["d-long-p2"]
    assert proposal.content == clip(long_text * 3, MAX_PROPOSAL) and proposal.content.endswith("…")
    ctx = await service.app.get_context(story_id, "DEV", "BUILD", token_budget=32768)
    assert "it's a \\path\\" in ctx.context and "é漢字🙂" in ctx.context
