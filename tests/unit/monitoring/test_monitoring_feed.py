"""The live feed's pure parts: the view of a message, the bounded history, the fan-out, deliberation summaries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.common import events as ev
from services.monitoring.feed import (
    FAMILIES,
    STREAM_FAMILY,
    DeliberationIndex,
    History,
    Hub,
    LiveFeed,
    redact_url,
    to_feed_event,
)
from services.monitoring.settings import MonitoringSettings

T0 = datetime(2026, 11, 25, 10, tzinfo=UTC)


def approval(story: str = "S-1") -> ev.Envelope:
    payload = ev.PlanApproved(story_id=story, plan_id="P-1", approved_by="po", timestamp=T0)
    return ev.make_event(payload, ev.PO_UI, correlation_id=f"{story}:P-1")


def take(feed: LiveFeed, env: ev.Envelope, seq: int, time: datetime = T0) -> object:
    return feed.take(env.spec.stream, seq, env.subject, time, env.to_json())


def test_families_come_from_the_catalog_streams():
    assert FAMILIES == ("planning", "agent", "context", "orchestration", "vllm", "deadletter")
    assert set(STREAM_FAMILY) == set(ev.STREAMS)
    for spec in ev.STREAMS.values():
        assert all(s.startswith(STREAM_FAMILY[spec.name] + ".") for s in spec.subjects)


def test_a_valid_event_is_shown_with_its_payload_and_story():
    env = approval("S-9")
    event, parsed = to_feed_event(ev.Streams.PLANNING_EVENTS, 4, env.subject, T0, env.to_json())
    assert parsed is not None and parsed.event_id == env.event_id
    assert event.id == "PLANNING_EVENTS:4" and event.family == "planning"
    assert event.event_type == "planning.plan.approved" and event.story_id == "S-9"
    assert event.payload["approved_by"] == "po" and event.error == "" and event.dead_letter is None


def test_an_invalid_message_is_shown_with_why():
    event, parsed = to_feed_event(ev.Streams.PLANNING_EVENTS, 1, "planning.plan.approved", T0, b"\xff{not json")
    assert parsed is None and "not JSON" in event.error and event.raw.endswith("{not json")
    wrong_subject, _ = to_feed_event(ev.Streams.CONTEXT, 2, "context.updated", T0, approval().to_json())
    assert "does not belong on subject" in wrong_subject.error


def test_a_dead_letter_carries_its_reason_and_origin():
    env = approval("S-3")
    H = ev.DeadLetterHeaders
    headers = {H.REASON: "boom", H.SUBJECT: env.subject, H.CONSUMER: "c", H.DELIVERIES: "5", H.STREAM_SEQ: "x"}
    event, parsed = to_feed_event(
        ev.Streams.DEAD_LETTERS, 1, ev.dead_letter_subject(env.subject), T0, env.to_json(), headers
    )
    assert event.family == "deadletter" and event.story_id == "S-3" and parsed is not None
    assert event.dead_letter.reason == "boom" and event.dead_letter.deliveries == 5
    assert event.dead_letter.original_seq is None  # not a number: shown as unknown
    bare, _ = to_feed_event(ev.Streams.DEAD_LETTERS, 2, ev.dead_letter_subject(env.subject), T0, b"junk", None)
    assert bare.dead_letter.reason == "(no reason given)" and bare.dead_letter.original_subject == env.subject


def test_history_keeps_the_last_n_per_family_in_time_order():
    feed = LiveFeed(MonitoringSettings(monitoring_history_size=10))
    for i in range(15):
        take(feed, approval(f"S-{i}"), i + 1, T0 + timedelta(seconds=i))
    chunk = ev.TokenChunk(deliberation_id="D", agent_id="A", phase="GENERATE", kind="tokens", seq=0, text="x")
    take(feed, ev.make_event(chunk, ev.ORCHESTRATOR), 1, T0 - timedelta(seconds=1))
    planning = feed.history.select("planning")
    assert [e.story_id for e in planning] == [f"S-{i}" for i in range(5, 15)]  # token chunks did not push them out
    everything = feed.history.select()
    assert everything[0].family == "vllm" and len(everything) == 11
    assert [e.story_id for e in feed.history.select(story="S-7")] == ["S-7"]
    assert len(feed.history.select(limit=3)) == 3 and feed.history.select(limit=3)[-1].story_id == "S-14"


async def test_hub_drops_a_client_that_falls_behind_and_keeps_the_others():
    history = History(100)
    hub = Hub(queue_size=3)
    slow, _ = hub.join(history, None, None)
    fast, _ = hub.join(history, None, None)
    planning_only, _ = hub.join(history, "planning", "S-2")
    events = [
        to_feed_event(ev.Streams.PLANNING_EVENTS, i, "planning.plan.approved", T0, approval(f"S-{i}").to_json())[0]
        for i in range(5)
    ]
    for e in events:
        hub.broadcast(e)  # never waits
        if not fast.queue.empty():
            fast.queue.get_nowait()
    assert slow not in hub.clients and slow.queue.get_nowait() is None and "fell more than 3" in slow.dropped
    assert fast in hub.clients and fast.dropped == ""
    assert [planning_only.queue.get_nowait().story_id] == ["S-2"] and planning_only.queue.empty()
    hub.leave(fast)
    assert fast not in hub.clients


async def test_join_replays_history_atomically():
    feed = LiveFeed(MonitoringSettings())
    take(feed, approval("S-1"), 1)
    client, replay = feed.hub.join(feed.history, None, None)
    take(feed, approval("S-2"), 2)
    assert [e.story_id for e in replay] == ["S-1"]
    assert (await asyncio.wait_for(client.queue.get(), 1)).story_id == "S-2"


def test_deliberation_summaries_follow_the_events_and_give_tokens_a_story():
    feed = LiveFeed(MonitoringSettings())
    d = {"deliberation_id": "D-1", "task_id": "T-1", "role": ev.Role.DEV}
    take(
        feed,
        ev.make_event(ev.TaskDispatched(**d, story_id="S-5", plan_id="P-1", description="do it"), ev.ORCHESTRATOR),
        1,
    )
    (s,) = feed.deliberations.list()
    assert s.status == ev.DeliberationStatus.PENDING and s.story_id == "S-5" and s.description == "do it"
    started = ev.DeliberationStarted(**d, council_id="council-dev", num_agents=3)
    take(feed, ev.make_event(started, ev.ORCHESTRATOR, actor="dana@example.com"), 2)
    assert feed.deliberations.list()[0].requested_by == "dana@example.com"
    chunk = ev.TokenChunk(deliberation_id="D-1", agent_id="agent-dev-001", phase="GENERATE", kind="start", seq=0)
    token_event = take(feed, ev.make_event(chunk, ev.ORCHESTRATOR), 1)
    assert token_event.story_id == "S-5"  # known from the deliberation
    (s,) = feed.deliberations.list(story="S-5")
    assert s.status == ev.DeliberationStatus.IN_PROGRESS and s.num_agents == 3 and s.agents == ["agent-dev-001"]
    assert s.verified is None  # not known until it ends
    done = ev.DeliberationCompleted(
        **d,
        winner_id="agent-dev-001",
        winner_proposal_id="p1",
        winner_content="x",
        winner_score=8.0,
        selection_method="FALLBACK",
        verified=True,
        verified_reason="passed deliverable, tests.task (3 passed)",
    )
    take(feed, ev.make_event(done, ev.ORCHESTRATOR), 3)
    # A late agent event does not move a finished deliberation back.
    late = ev.AgentResponseCompleted(
        request_id="r", deliberation_id="D-1", agent_id="agent-dev-002", phase="SCORE", content=""
    )
    take(feed, ev.make_event(late, ev.ORCHESTRATOR), 2)
    (s,) = feed.deliberations.list(status="COMPLETED")
    assert s.winner_id == "agent-dev-001" and s.selection_method == "FALLBACK" and s.agents[-1] == "agent-dev-002"
    assert s.verified is True and s.verified_reason == "passed deliverable, tests.task (3 passed)"
    failed = ev.DeliberationFailed(
        deliberation_id="D-2", task_id="T-2", role=ev.Role.QA, status="TIMEOUT", error="deadline"
    )
    take(feed, ev.make_event(failed, ev.ORCHESTRATOR), 4)
    assert [x.deliberation_id for x in feed.deliberations.list()] == ["D-2", "D-1"]
    timed_out = feed.deliberations.list(status="TIMEOUT")[0]
    assert timed_out.error == "deadline" and timed_out.verified is False  # no winner: nothing verified


def test_deliberation_index_is_bounded():
    index = DeliberationIndex(size=2)
    for i in range(3):
        env = ev.make_event(
            ev.TaskDispatched(task_id=f"T-{i}", role=ev.Role.DEV, deliberation_id=f"D-{i}"), ev.ORCHESTRATOR
        )
        index.observe(env, T0)
    assert [s.deliberation_id for s in index.list()] == ["D-2", "D-1"]


def test_urls_are_shown_without_credentials():
    assert redact_url("nats://user:secret@nats:4222") == "nats://nats:4222"
    assert redact_url("nats://a:4222, tls://u:p@b:4443") == "nats://a:4222,tls://b:4443"


def test_token_chunks_keep_their_whitespace():
    chunk = ev.TokenChunk(deliberation_id="D", agent_id="A", phase="GENERATE", kind="tokens", seq=1, text="def \n")
    assert chunk.text == "def \n"
