"""The event bus: NATS JetStream publishing, durable pull consumers, dead letters, stream provisioning.

- publish(): JSON envelope, `Nats-Msg-Id` = event_id so JetStream drops a repeat inside the duplicate window.
- publish_many(): many publishes in flight at once (the acks are awaited together).
- consume(): a durable pull consumer from the catalog with explicit acks. Per message:
  invalid (bad JSON, unknown type, wrong schema or subject) -> copied to DEAD_LETTERS with the reason, then
  terminated (exactly one delivery); already handled (seen-set) -> acked; handler raised -> nak with backoff,
  and after `consumer_max_deliver` deliveries -> dead-lettered and terminated. Long handlers keep their
  messages (and seen-set leases) alive: one loop per consumer sends in-progress heartbeats for what is in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError, NotFoundError

from services.common.errors import Unavailable
from services.common.events import (
    STREAMS,
    ConsumerSpec,
    DeadLetterHeaders,
    Envelope,
    InvalidEvent,
    dead_letter_subject,
    parse_event,
)
from services.common.logging import correlation_id
from services.common.metrics import DEAD_LETTERS, EVENTS_HANDLED, EVENTS_PUBLISHED
from services.common.settings import FleetSettings
from services.common.valkey import Claim, SeenSet

log = logging.getLogger("fleet.bus")

Handler = Callable[[Envelope[Any]], Awaitable[None]]


async def connect_nats(url: str, name: str, *, connect_timeout: float = 5.0) -> NATS:
    """Connect, or raise Unavailable naming the URL. Reconnects forever once connected."""
    try:
        connecting = nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            reconnect_time_wait=1,
        )
        # nats-py keeps retrying a first connect that fails: bound it.
        return await asyncio.wait_for(connecting, connect_timeout + 2)
    except (TimeoutError, NoServersError, OSError, NatsTimeoutError) as e:
        raise Unavailable(f"NATS at {url} unreachable: {e or type(e).__name__}") from e


@functools.cache
def _handled(durable: str, outcome: str) -> Any:
    """The counter of a consumer's outcome (labels() per message is a measurable share of a fast consumer's time)."""
    return EVENTS_HANDLED.labels(durable, outcome)


def _header_value(text: str, limit: int = 1000) -> str:
    return " ".join(str(text).split())[:limit]


@dataclass
class Consumer:
    """A running durable consumer; stop() finishes the messages in hand, then returns."""

    spec: ConsumerSpec
    task: asyncio.Task[None]
    stopping: asyncio.Event

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class EventBus:
    GATHER_SECONDS = 0.001  # how long a consumer lets finishing handlers free their slots before it fetches

    def __init__(self, nc: NATS, producer: str, settings: FleetSettings, seen: SeenSet | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.producer = producer
        self.settings = settings
        self.seen = seen
        self._consumers: list[Consumer] = []

    @classmethod
    async def connect(cls, settings: FleetSettings, producer: str, seen: SeenSet | None = None) -> EventBus:
        return cls(await connect_nats(settings.nats_url, producer), producer, settings, seen)

    # --- publishing ---------------------------------------------------------------------------------------

    async def publish(self, event: Envelope[Any], timeout: float = 5.0, attempts: int = 3) -> PubAck:
        """Store `event` in its stream. An ack that does not come within `timeout` (NATS busy: a burst of token
        streams at bench-scale N = 200 on 2 cores) or a stream with no leader is tried again, up to `attempts` times
        0.5 s, 1 s, ... apart: the stream drops the copy of one stored after all (its Nats-Msg-Id, within the
        duplicate window), so the event is stored once. Then, or on a closed connection: Unavailable."""
        body, headers = event.to_json(), {"Nats-Msg-Id": event.event_id}
        attempt = 1
        while True:
            try:
                ack = await self.js.publish(event.subject, body, timeout=timeout, headers=headers)
            except (NatsTimeoutError, NoStreamResponseError) as e:
                if attempt >= attempts:
                    raise Unavailable(
                        f"NATS publish of {event.event_type} failed after {attempts} attempts: {type(e).__name__} {e}"
                    ) from e
                log.warning("NATS publish of %s (attempt %d/%d): %s", event.event_type, attempt, attempts, e)
                await asyncio.sleep(0.5 * attempt)
                attempt += 1
                continue
            except nats.errors.ConnectionClosedError as e:
                raise Unavailable(f"NATS publish of {event.event_type} failed: {type(e).__name__} {e}") from e
            EVENTS_PUBLISHED.labels(event.event_type).inc()
            return ack

    async def publish_many(self, events: Sequence[Envelope[Any]], in_flight: int = 512) -> list[PubAck]:
        """Publish with up to `in_flight` acks outstanding; returns acks in order; raises on the first failure."""
        sem = asyncio.Semaphore(in_flight)

        async def one(e: Envelope[Any]) -> PubAck:
            async with sem:
                return await self.publish(e)

        return list(await asyncio.gather(*(one(e) for e in events)))

    # --- consuming ----------------------------------------------------------------------------------------

    def consumer_config(self, spec: ConsumerSpec) -> ConsumerConfig:
        s = self.settings
        filters = list(spec.filter_subjects)
        return ConsumerConfig(
            durable_name=spec.durable,
            description=spec.description,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=s.consumer_ack_wait_seconds,
            max_deliver=s.consumer_max_deliver,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            max_ack_pending=1000,
        )

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create the durable consumer, or update it to the catalog's and settings' config."""
        await self.js.add_consumer(spec.stream, self.consumer_config(spec))

    async def consume(self, spec: ConsumerSpec, handler: Handler, *, concurrency: int = 1) -> Consumer:
        """Start handling `spec`'s messages with up to `concurrency` handlers at once."""
        await self.ensure_consumer(spec)
        sub = await self.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        stopping = asyncio.Event()
        task = asyncio.create_task(
            self._run(spec, sub, handler, concurrency, stopping), name=f"consumer:{spec.durable}"
        )
        consumer = Consumer(spec, task, stopping)
        self._consumers.append(consumer)
        return consumer

    async def _run(
        self,
        spec: ConsumerSpec,
        sub: JetStreamContext.PullSubscription,
        handler: Handler,
        concurrency: int,
        stopping: asyncio.Event,
    ) -> None:
        free = concurrency  # handler slots not in use
        freed = asyncio.Event()
        inbox: asyncio.Queue[Msg] = asyncio.Queue()
        in_hand: dict[int, tuple[Msg, str]] = {}  # id(msg) -> (msg, event_id), while its handler runs
        keeper = asyncio.create_task(self._keep_alive(spec, in_hand), name=f"keep-alive:{spec.durable}")

        async def work() -> None:
            """One of `concurrency` long-lived handler tasks (not a task per message: bench-bus consume)."""
            nonlocal free
            while True:
                msg = await inbox.get()
                try:
                    await self._handle(spec, msg, handler, in_hand)
                except Exception as e:  # acking or dead-lettering failed: JetStream redelivers after ack_wait
                    log.warning("handling a message of %s failed: %s: %s", spec.durable, type(e).__name__, e)
                finally:
                    free += 1
                    freed.set()

        workers = [asyncio.create_task(work(), name=f"handler:{spec.durable}") for _ in range(concurrency)]
        try:
            while not stopping.is_set():
                while free == 0:  # wait for a free handler slot
                    freed.clear()
                    await freed.wait()
                if free < concurrency // 2:
                    # Handlers are finishing: let the ones finishing now free their slots too, so that one fetch
                    # takes many messages (fetching at the first free slot made a fetch per message of a fast
                    # consumer's backlog: bench-bus consume). A slow handler's next message waits ~1 ms more.
                    await asyncio.sleep(self.GATHER_SECONDS)
                taken, free = free, 0
                try:
                    msgs = await sub.fetch(taken, timeout=1.0)
                except (TimeoutError, NatsTimeoutError):
                    msgs = []
                except Exception as e:  # connection trouble: the client reconnects by itself
                    msgs = []
                    if not stopping.is_set():
                        log.warning("fetch on %s failed (%s); retrying", spec.durable, e)
                        await asyncio.sleep(1.0)
                free += taken - len(msgs)
                for msg in msgs:
                    inbox.put_nowait(msg)
        finally:
            try:
                while free < concurrency:  # the messages in hand are finished, not dropped
                    freed.clear()
                    await freed.wait()
            finally:  # also when cancelled meanwhile: the handlers go with the consumer
                for w in workers:
                    w.cancel()
                keeper.cancel()
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _handle(
        self, spec: ConsumerSpec, msg: Msg, handler: Handler, in_hand: dict[int, tuple[Msg, str]]
    ) -> None:
        try:
            event = parse_event(msg.data, msg.subject)
        except InvalidEvent as e:
            await self.dead_letter(msg, spec, str(e))
            await msg.term()
            _handled(spec.durable, "dead_letter").inc()
            return
        correlation_id.set(event.correlation_id or event.event_id)
        lease = self.settings.consumer_ack_wait_seconds
        if self.seen is not None:
            claim = await self.seen.claim(spec.durable, event.event_id, lease)
            if claim is Claim.DONE:
                await msg.ack()
                _handled(spec.durable, "duplicate").inc()
                log.info("skipping %s %s: already handled", event.event_type, event.event_id)
                return
            if claim is Claim.IN_PROGRESS:
                # Another delivery holds the lease (running, or crashed and about to expire): come back later.
                wait = await self.seen.lease_left(spec.durable, event.event_id)
                await msg.nak(delay=wait + 0.5)
                _handled(spec.durable, "busy").inc()
                return
        in_hand[id(msg)] = (msg, event.event_id)
        try:
            await handler(event)
        except Exception as e:
            if self.seen is not None:
                await self.seen.release(spec.durable, event.event_id)
            deliveries = msg.metadata.num_delivered  # parsed from the reply subject: only when needed
            if deliveries >= self.settings.consumer_max_deliver:
                log.error("%s %s failed on its last delivery (%d): %r", event.event_type, event.event_id, deliveries, e)
                await self.dead_letter(
                    msg, spec, f"handler failed after {deliveries} deliveries: {e!r}", event.event_id
                )
                await msg.term()
                _handled(spec.durable, "dead_letter").inc()
            else:
                backoff = self.settings.consumer_backoff_seconds or [1.0]
                delay = backoff[min(deliveries - 1, len(backoff) - 1)]
                log.warning(
                    "%s %s failed (delivery %d), retry in %.1fs: %r",
                    event.event_type,
                    event.event_id,
                    deliveries,
                    delay,
                    e,
                )
                await msg.nak(delay=delay)
                _handled(spec.durable, "retry").inc()
            return
        finally:
            del in_hand[id(msg)]
        if self.seen is not None:
            await self.seen.commit(spec.durable, event.event_id)
        await msg.ack()
        _handled(spec.durable, "ok").inc()

    async def _keep_alive(self, spec: ConsumerSpec, in_hand: dict[int, tuple[Msg, str]]) -> None:
        """Every third of the ack wait, tell JetStream (and the seen-set) that the messages in hand are still being
        worked on: a handler is never redelivered while it runs, however long it takes. One loop per consumer
        rather than a timer task per message (cheaper per message: bench/bench_bus.py consume + ack)."""
        lease = self.settings.consumer_ack_wait_seconds
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(lease / 3)
                for msg, event_id in list(in_hand.values()):
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                        if self.seen is not None:
                            await self.seen.refresh(spec.durable, event_id, lease)

    async def dead_letter(self, msg: Msg, spec: ConsumerSpec, reason: str, event_id: str = "") -> None:
        """Copy `msg` (its bytes untouched) to the dead-letter stream with headers saying why and from where."""
        meta = msg.metadata
        headers = {
            DeadLetterHeaders.REASON: _header_value(reason),
            DeadLetterHeaders.STREAM: meta.stream,
            DeadLetterHeaders.SUBJECT: msg.subject,
            DeadLetterHeaders.CONSUMER: spec.durable,
            DeadLetterHeaders.DELIVERIES: str(meta.num_delivered),
            DeadLetterHeaders.STREAM_SEQ: str(meta.sequence.stream),
            DeadLetterHeaders.EVENT_ID: event_id,
            "Nats-Msg-Id": f"dead:{meta.stream}:{meta.sequence.stream}:{spec.durable}",
        }
        await self.js.publish(dead_letter_subject(msg.subject), msg.data, headers=headers, timeout=5.0)
        DEAD_LETTERS.labels(spec.durable).inc()
        log.warning("dead-lettered %s seq %s from %s: %s", msg.subject, meta.sequence.stream, spec.durable, reason)

    async def close(self) -> None:
        for c in self._consumers:
            await c.stop()
        self._consumers.clear()
        with contextlib.suppress(Exception):
            await self.nc.drain()


# --- provisioning --------------------------------------------------------------------------------------------


def stream_config(name: str, settings: FleetSettings) -> StreamConfig:
    spec = STREAMS[name]
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=spec.max_age_seconds or settings.stream_max_age_days * 86400,
        max_bytes=settings.stream_max_bytes,
        num_replicas=settings.stream_replicas,
        duplicate_window=spec.duplicate_window_seconds,
    )


async def provision_streams(js: JetStreamContext, settings: FleetSettings) -> dict[str, str]:
    """Create or update every stream of the catalog. Idempotent. Returns name -> created/updated/unchanged."""
    out: dict[str, str] = {}
    for name in STREAMS:
        want = stream_config(name, settings)
        try:
            have = (await js.stream_info(name)).config
        except NotFoundError:
            await js.add_stream(want)
            out[name] = "created"
            continue
        same = (
            sorted(have.subjects or []) == sorted(want.subjects or [])
            and have.max_age == want.max_age
            and have.max_bytes == want.max_bytes
            and have.num_replicas == want.num_replicas
            and have.duplicate_window == want.duplicate_window
            and have.retention == want.retention
            and have.storage == want.storage
            and (have.description or "") == want.description
        )
        if same:
            out[name] = "unchanged"
        else:
            if have.storage != want.storage or have.retention != want.retention:
                raise Unavailable(
                    f"stream {name} exists with storage={have.storage} retention={have.retention}; "
                    f"JetStream cannot change those in place (delete the stream to recreate it)"
                )
            await js.update_stream(want)
            out[name] = "updated"
    return out
