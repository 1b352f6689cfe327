"""The live feed: every subject family of the catalog, read through JetStream, kept, replayed and fanned out.

- One ordered JetStream consumer per stream of the catalog (ephemeral, no acks, flow control and idle
  heartbeats; nats-py recreates it from the next sequence when it sees a gap or misses heartbeats). It starts
  a bounded replay back (the last N messages of the stream), so a restarted dashboard shows recent history.
- A bounded history per subject family (the last N events of each), so a burst of token chunks never pushes
  the plan approvals out. New clients get it replayed, then the live events.
- Fan-out to browser clients through bounded queues: a client that falls behind is dropped with a notice;
  the consumers never wait for a client.
- A supervisor connects (retrying while NATS is down), checks every consumer still exists, and resumes a lost
  one from the last sequence it saw. Ready = connected and every consumer exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field

from services.common import events as ev
from services.common.bus import EventBus
from services.common.errors import Unavailable
from services.monitoring.settings import MonitoringSettings

log = logging.getLogger("fleet.monitoring.feed")

FEED_EVENTS = Counter("fleet_monitoring_feed_events_total", "Events read by the live feed", ["family", "valid"])
FEED_CLIENTS = Gauge("fleet_monitoring_feed_clients", "Browser clients of the live feed")
FEED_DROPPED = Counter("fleet_monitoring_feed_clients_dropped_total", "Clients dropped for falling behind")


# --- subject families (from the catalog) ---------------------------------------------------------------------


def _family(spec: ev.StreamSpec) -> str:
    return spec.subjects[0].split(".")[0]


STREAM_FAMILY: dict[str, str] = {name: _family(spec) for name, spec in ev.STREAMS.items()}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(STREAM_FAMILY.values()))
TOKEN_FAMILY = STREAM_FAMILY[ev.Streams.TOKEN_STREAMS]
DEAD_LETTER_FAMILY = STREAM_FAMILY[ev.Streams.DEAD_LETTERS]
RAW_LIMIT = 4000


# --- what a browser sees ---------------------------------------------------------------------------------------


class DeadLetterInfo(BaseModel):
    """Why and from where a message was dead-lettered (the catalog's DeadLetterHeaders)."""

    reason: str
    original_subject: str
    original_stream: str = ""
    consumer: str = ""
    deliveries: int | None = None
    original_seq: int | None = None
    original_event_id: str = ""


class FeedEvent(BaseModel):
    """One message of any stream, as the dashboard shows it. Invalid messages are shown too, with why."""

    id: str = Field(description="<stream>:<sequence>, unique per message")
    stream: str
    seq: int
    subject: str
    family: str
    time: datetime = Field(description="when JetStream stored the message")
    event_id: str = ""
    event_type: str = ""
    producer: str = ""
    correlation_id: str = ""
    occurred_at: datetime | None = None
    story_id: str = ""
    deliberation_id: str = ""
    task_id: str = ""
    payload: dict[str, Any] | None = None
    error: str = Field("", description="why the message is not a valid catalog event; empty when it is")
    raw: str = Field("", description="the body (truncated) when it is not a valid event")
    dead_letter: DeadLetterInfo | None = None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def dead_letter_info(subject: str, headers: Mapping[str, str] | None) -> DeadLetterInfo:
    h = headers or {}
    H = ev.DeadLetterHeaders
    return DeadLetterInfo(
        reason=h.get(H.REASON) or "(no reason given)",
        original_subject=h.get(H.SUBJECT) or subject.removeprefix(ev.DEAD_LETTER_PREFIX + "."),
        original_stream=h.get(H.STREAM, ""),
        consumer=h.get(H.CONSUMER, ""),
        deliveries=_int(h.get(H.DELIVERIES)),
        original_seq=_int(h.get(H.STREAM_SEQ)),
        original_event_id=h.get(H.EVENT_ID, ""),
    )


def to_feed_event(
    stream: str, seq: int, subject: str, time: datetime, data: bytes, headers: Mapping[str, str] | None = None
) -> tuple[FeedEvent, ev.Envelope[Any] | None]:
    """The feed's view of one stored message, and its envelope when it is a valid catalog event."""
    dead = dead_letter_info(subject, headers) if stream == ev.Streams.DEAD_LETTERS else None
    try:
        env: ev.Envelope[Any] | None = ev.parse_event(data, dead.original_subject if dead else subject)
        error = ""
    except ev.InvalidEvent as e:
        env, error = None, str(e)
    fields: dict[str, Any] = {}
    if env is not None:
        payload = env.payload.model_dump(mode="json")
        fields = {
            "event_id": env.event_id,
            "event_type": env.event_type,
            "producer": env.producer,
            "correlation_id": env.correlation_id,
            "occurred_at": env.occurred_at,
            "payload": payload,
            "story_id": str(payload.get("story_id") or ""),
            "deliberation_id": str(payload.get("deliberation_id") or ""),
            "task_id": str(payload.get("task_id") or ""),
        }
    else:
        fields = {"error": error, "raw": data[:RAW_LIMIT].decode("utf-8", "replace")}
    event = FeedEvent(
        id=f"{stream}:{seq}",
        stream=stream,
        seq=seq,
        subject=subject,
        family=STREAM_FAMILY.get(stream, subject.split(".")[0]),
        time=time,
        dead_letter=dead,
        **fields,
    )
    return event, env


def matches(event: FeedEvent, family: str | None, story: str | None) -> bool:
    return (not family or event.family == family) and (not story or event.story_id == story)


# --- history and fan-out -----------------------------------------------------------------------------------------


class History:
    """The last `per_family` events of each subject family."""

    def __init__(self, per_family: int) -> None:
        self.per_family = per_family
        self._events: dict[str, deque[FeedEvent]] = {f: deque(maxlen=per_family) for f in FAMILIES}

    def add(self, event: FeedEvent) -> None:
        self._events.setdefault(event.family, deque(maxlen=self.per_family)).append(event)

    def select(self, family: str | None = None, story: str | None = None, limit: int | None = None) -> list[FeedEvent]:
        """Matching events, oldest first (the last `limit` of them)."""
        pools: Iterable[deque[FeedEvent]] = (
            [self._events.get(family, deque())] if family else list(self._events.values())
        )
        out = [e for pool in pools for e in pool if matches(e, family, story)]
        out.sort(key=lambda e: (e.time, e.stream, e.seq))
        return out[-limit:] if limit else out


class FeedClient:
    """One browser connection: a bounded queue; None in it means 'you were dropped' (see `dropped`)."""

    def __init__(self, queue_size: int, family: str | None, story: str | None) -> None:
        self.queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue(queue_size)
        self.family = family
        self.story = story
        self.dropped = ""


class Hub:
    """Fans events out to clients without ever waiting for one."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.clients: set[FeedClient] = set()

    def join(self, history: History, family: str | None, story: str | None) -> tuple[FeedClient, list[FeedEvent]]:
        """Register a client and return the history to replay to it (atomically: nothing lost or doubled)."""
        client = FeedClient(self.queue_size, family, story)
        self.clients.add(client)
        FEED_CLIENTS.set(len(self.clients))
        return client, history.select(family, story)

    def leave(self, client: FeedClient) -> None:
        self.clients.discard(client)
        FEED_CLIENTS.set(len(self.clients))

    def broadcast(self, event: FeedEvent) -> None:
        for client in list(self.clients):
            if not matches(event, client.family, client.story):
                continue
            try:
                client.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(client, f"fell more than {self.queue_size} events behind the live feed")

    def _drop(self, client: FeedClient, reason: str) -> None:
        self.leave(client)
        while not client.queue.empty():
            client.queue.get_nowait()
        client.dropped = reason
        client.queue.put_nowait(None)
        FEED_DROPPED.inc()
        log.warning("dropped a feed client: %s", reason)


# --- deliberations seen in the events ----------------------------------------------------------------------------


class DeliberationSummary(BaseModel):
    """What the events say about one deliberation (the orchestrator's GetDeliberationResult has the rest)."""

    deliberation_id: str
    task_id: str = ""
    role: str = ""
    story_id: str = ""
    plan_id: str = ""
    council_id: str = ""
    status: ev.DeliberationStatus = ev.DeliberationStatus.PENDING
    num_agents: int = 0
    executor: str = ""
    agents: list[str] = Field(default_factory=list)
    description: str = ""
    requested_by: str = Field("", description="who asked for it: the caller of Deliberate, or the plan's approver")
    winner_id: str = ""
    winner_proposal_id: str = ""
    winner_score: float | None = None
    winner_content: str = ""
    selection_method: str = ""
    rationale: str = ""
    checks_passed: int = 0
    checks_failed: int = 0
    duration_ms: int = 0
    total_tokens: int = 0
    context_version: str = ""
    verified: bool | None = Field(
        None, description="the winner passed every gating check (its code ran against the tests); null until it ends"
    )
    verified_reason: str = Field("", description="why it is, or is not, verified")
    error: str = ""
    started_at: datetime | None = None
    updated_at: datetime


MAX_AGENTS_LISTED = 32


class DeliberationIndex:
    """The last `size` deliberations, updated from orchestration, agent and token events."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._by_id: OrderedDict[str, DeliberationSummary] = OrderedDict()

    def story_of(self, deliberation_id: str) -> str:
        s = self._by_id.get(deliberation_id)
        return s.story_id if s else ""

    def list(self, story: str | None = None, status: str | None = None, limit: int = 100) -> list[DeliberationSummary]:
        """Newest (most recently updated) first."""
        out = [
            s
            for s in reversed(self._by_id.values())
            if (not story or s.story_id == story) and (not status or s.status == status)
        ]
        return out[:limit]

    def observe(self, env: ev.Envelope[Any], time: datetime) -> None:
        p = env.payload
        did = getattr(p, "deliberation_id", "")
        if not did:
            return
        s = self._by_id.get(did)
        if s is None:
            s = self._by_id[did] = DeliberationSummary(deliberation_id=did, updated_at=time)
            while len(self._by_id) > self.size:
                self._by_id.popitem(last=False)
        self._by_id.move_to_end(did)
        s.updated_at = max(s.updated_at, time)
        for name in ("task_id", "story_id", "plan_id", "council_id", "executor"):
            value = getattr(p, name, "")
            if value:
                setattr(s, name, value)
        if getattr(p, "role", None):
            s.role = str(p.role)
        if env.actor and env.producer == ev.ORCHESTRATOR:  # who asked for it (agents' events carry none)
            s.requested_by = env.actor
        agent = getattr(p, "agent_id", "")
        if agent and agent not in s.agents and len(s.agents) < MAX_AGENTS_LISTED:
            s.agents.append(agent)
        match p:
            case ev.TaskDispatched():
                s.description = p.description
            case ev.DeliberationStarted():
                s.num_agents = p.num_agents
                s.started_at = time
                if s.status not in ev.ENDED:
                    s.status = ev.DeliberationStatus.IN_PROGRESS
            case ev.DeliberationCompleted():
                s.status = ev.DeliberationStatus.COMPLETED
                s.winner_id, s.winner_proposal_id = p.winner_id, p.winner_proposal_id
                s.winner_score, s.winner_content = p.winner_score, p.winner_content
                s.selection_method, s.rationale = p.selection_method, p.rationale
                s.checks_passed, s.checks_failed = p.checks_passed, p.checks_failed
                s.duration_ms, s.total_tokens, s.context_version = p.duration_ms, p.total_tokens, p.context_version
                s.verified, s.verified_reason = p.verified, p.verified_reason
            case ev.DeliberationFailed():
                s.status = ev.DeliberationStatus(p.status)
                s.error, s.duration_ms = p.error, p.duration_ms
                s.verified = False  # no winner to verify: `error` says why
            case _:
                if s.status == ev.DeliberationStatus.PENDING and not isinstance(p, ev.TaskDispatched):
                    s.status = ev.DeliberationStatus.IN_PROGRESS


# --- the JetStream side ----------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL(s) without user info, for messages and the page."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        out.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return ",".join(out)


class StreamStatus(BaseModel):
    stream: str
    family: str
    ok: bool
    detail: str
    last_seq: int


@dataclass
class Tap:
    """The feed's consumer of one stream."""

    stream: str
    sub: Any = None  # JetStreamContext.PushSubscription
    created: datetime | None = None  # the stream's creation time: a new one means the stream was recreated
    floor: int = 1  # messages below this sequence are not taken (a reset consumer may replay them)
    last_seq: int = 0
    ok: bool = False
    detail: str = "not started"
    misses: int = 0

    def status(self) -> StreamStatus:
        return StreamStatus(
            stream=self.stream,
            family=STREAM_FAMILY[self.stream],
            ok=self.ok,
            detail=self.detail,
            last_seq=self.last_seq,
        )


class LiveFeed:
    def __init__(self, settings: MonitoringSettings) -> None:
        self.settings = settings
        self.history = History(settings.monitoring_history_size)
        self.hub = Hub(settings.monitoring_client_queue_size)
        self.deliberations = DeliberationIndex(settings.monitoring_deliberations_kept)
        self.taps = {name: Tap(name) for name in ev.STREAMS}
        self.nc = NATS()
        self.bus: EventBus | None = None
        self.nats_address = redact_url(settings.nats_url)
        self.nats_detail = "connecting"
        self._connect: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._checking = asyncio.Lock()  # one check at a time (the connect task and the supervisor both run it)

    # --- state -------------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.nc.is_connected

    @property
    def ready(self) -> bool:
        return self.connected and all(t.ok for t in self.taps.values())

    def streams(self) -> list[StreamStatus]:
        return [t.status() for t in self.taps.values()]

    def nats_status(self) -> str:
        if self.connected:
            return "connected"
        return f"NATS unavailable at {self.nats_address}: {self.nats_detail}"

    def require_bus(self) -> EventBus:
        if self.bus is None or not self.nc.is_connected:
            raise Unavailable(self.nats_status())
        return self.bus

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting (in the background: the service runs, not ready, while NATS is down)."""
        self._connect = asyncio.create_task(self._connect_forever(), name="feed-connect")
        self._supervisor = asyncio.create_task(self._supervise(), name="feed-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._supervisor, self._connect):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for tap in self.taps.values():
            await self._unsubscribe(tap)
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def _connect_forever(self) -> None:
        servers = [u.strip() for u in self.settings.nats_url.split(",")]

        async def on_error(e: Exception) -> None:
            self.nats_detail = str(e) or type(e).__name__

        async def on_disconnect() -> None:
            if not self._stopping:
                self.nats_detail = "disconnected; reconnecting"
                log.warning("NATS disconnected; reconnecting")

        async def on_reconnect() -> None:
            log.info("NATS reconnected")

        # max_reconnect_attempts=-1: nats-py retries the first connect too, until NATS is up.
        await self.nc.connect(
            servers=servers,
            name=ev.MONITORING,
            connect_timeout=2,
            reconnect_time_wait=1,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        self.bus = EventBus(self.nc, ev.MONITORING, self.settings)
        log.info("connected to NATS at %s", self.nats_address)
        await self.check()  # start the consumers now, not at the supervisor's next round

    async def _supervise(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("feed check failed")
            await asyncio.sleep(self.settings.monitoring_check_seconds)

    async def check(self) -> None:
        """Start missing consumers, verify the others exist, resume lost ones."""
        async with self._checking:
            if not self.connected:
                for tap in self.taps.values():
                    tap.ok, tap.detail = False, "NATS not connected"
                return
            await asyncio.gather(*(self._check(tap) for tap in self.taps.values()))

    async def _check(self, tap: Tap) -> None:
        assert self.bus is not None
        timeout = self.settings.monitoring_check_seconds
        try:
            info = await asyncio.wait_for(self.bus.js.stream_info(tap.stream), timeout)
        except NotFoundError:
            await self._unsubscribe(tap)
            tap.ok, tap.detail = False, f"stream {tap.stream} does not exist (run `fleet streams init`)"
            return
        except Exception as e:
            tap.ok, tap.detail = False, f"stream {tap.stream}: {type(e).__name__} {e}".strip()
            return
        if tap.sub is not None and tap.created != info.created:  # deleted and created again: start over
            await self._unsubscribe(tap)
            tap.last_seq = 0
        if tap.sub is None:
            await self._subscribe(tap, info)
            return
        try:
            await asyncio.wait_for(tap.sub.consumer_info(), timeout)
        except Exception as e:
            tap.misses += 1
            tap.ok, tap.detail = False, f"consumer lost ({type(e).__name__}); resuming"
            if tap.misses >= 2:  # nats-py did not recreate it: start over from the last sequence seen
                await self._unsubscribe(tap)
                await self._subscribe(tap, info)
            return
        tap.misses = 0
        tap.ok, tap.detail = True, "consuming"

    async def _subscribe(self, tap: Tap, info: StreamInfo) -> None:
        assert self.bus is not None
        spec = ev.STREAMS[tap.stream]
        state = info.state
        created = info.created
        if tap.last_seq and tap.created == created and tap.last_seq <= state.last_seq:
            start = tap.last_seq + 1  # resume where we were
        else:  # first start, or the stream was recreated: a bounded replay of its last messages
            tap.last_seq = 0
            start = max(state.first_seq, state.last_seq - self.settings.monitoring_history_size + 1, 1)
        tap.created, tap.floor = created, start
        config = ConsumerConfig(
            description=f"{ev.MONITORING} live feed",
            opt_start_seq=start,
            filter_subjects=list(spec.subjects) if len(spec.subjects) > 1 else None,
        )
        try:
            tap.sub = await self.bus.js.subscribe(
                spec.subjects[0],
                stream=tap.stream,
                cb=partial(self._on_message, tap),
                ordered_consumer=True,
                idle_heartbeat=min(2.0, self.settings.monitoring_check_seconds),
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=config,
            )
        except Exception as e:
            tap.ok, tap.detail = False, f"cannot create the consumer on {tap.stream}: {type(e).__name__} {e}"
            return
        tap.ok, tap.detail, tap.misses = True, f"consuming from sequence {start}", 0
        log.info("live feed on %s from sequence %d", tap.stream, start)

    async def _unsubscribe(self, tap: Tap) -> None:
        if tap.sub is not None:
            with contextlib.suppress(Exception):
                await tap.sub.unsubscribe()
        tap.sub = None

    async def _on_message(self, tap: Tap, msg: Msg) -> None:
        try:
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq < tap.floor or seq <= tap.last_seq:
                return  # replayed by a consumer reset: already taken
            tap.last_seq = seq
            self.take(tap.stream, seq, msg.subject, meta.timestamp, msg.data, msg.headers)
        except Exception:
            log.exception("live feed could not take a message from %s", tap.stream)

    def take(
        self,
        stream: str,
        seq: int,
        subject: str,
        time: datetime | None,
        data: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> FeedEvent:
        """Record one message and push it to the clients (synchronous: never waits for anyone)."""
        event, env = to_feed_event(stream, seq, subject, time or datetime.now(UTC), data, headers)
        if env is not None:
            self.deliberations.observe(env, event.time)
        if not event.story_id and event.deliberation_id:
            event.story_id = self.deliberations.story_of(event.deliberation_id)
        self.history.add(event)
        self.hub.broadcast(event)
        FEED_EVENTS.labels(event.family, str(env is not None).lower()).inc()
        return event
