"""The engine's executor port on Ray: every agent call of a phase is one call on a pool of Ray actors
(`AgentWorker`, spread over the cluster's nodes) that calls vLLM, streaming.

Driver side (`RayExecutor`, in the ray-executor service): a phase's calls are submitted together, each to the
least-loaded actor of the pool (`AgentPool`), and awaited concurrently. Each call is bounded by the per-agent
timeout and by the deliberation's deadline (also sent to the worker, which bounds itself); past either, the call
is cancelled (`ray.cancel`: its coroutine, and so its HTTP request, is cancelled) and is a failed outcome of kind
"timeout". When the engine's deadline cancels the phase, every call still running is cancelled (once per call;
the worker's own deadline may cancel it too, which the LLM client absorbs so that its connection is closed and
the server stops generating: issue 17). A call whose deadline has passed when it reaches the worker never starts
its HTTP request. An actor that
dies (worker or node lost) is restarted by Ray and its calls re-run (`max_retries`: system failures only; LLM
errors are answers, returned, never retried by Ray); when the retries are used up the call is a failed outcome.
So a failed or cancelled agent is always reported, never a hang. Calls are idempotent by request id: the same id
within a deliberation reuses the first outcome, and a re-run sends the same `X-Request-Id`. `close()` cancels
whatever is left after a deliberation and drops its references, so no call or object outlives it.

Why actors rather than one Ray task per call: measured on the 2-core CI box against a 200 ms LLM, a phase of 3
calls took 218 ms in-process, 223-226 ms as actor calls and 236 ms as Ray tasks, plus 0.1-2.4 s whenever Ray had
to start a worker for a task (it kills idle workers beyond the node's CPU count within a second, so bursts
of fractional-CPU tasks keep paying process starts). Five LLM phases per deliberation put tasks near 10%
overhead and actors under 5%. An actor also keeps its HTTP connection pool and NATS connection across calls.
The pool reserves `size x num_cpus` CPUs while the service runs; each actor runs up to `max_concurrency` calls.

Where token chunks are published, and why: in the actor, straight to NATS (`vllm.streaming.<deliberation>.
<agent>`, kinds start / tokens every ~100 ms / end), on the actor's own connection, as core NATS publishes onto
TOKEN_STREAMS' subjects: JetStream stores them, but no ack is awaited per batch (a live view, best effort; the
connection is flushed once after `end`). The actor is where the
tokens arrive; sending them from there costs one publish per batch and no extra hop. Relaying them
through the service (a Ray streaming generator read by the driver) would add an object-store round trip per
batch, make the single service process the relay of every agent of every council, and tie dashboard latency to
the driver's load. The price is that workers must reach NATS (they do: same cluster network as vLLM), and it is
paid only by the live view: streaming is best effort and off the call's critical path (deltas go into a buffer;
a pump task publishes); a NATS failure turns it off for that call and never fails the call; the final flush and
`end` are awaited (bounded) before the call returns, so `end` precedes the call's agent.response.* event. A call
Ray re-runs starts again with `start`, which tells readers to reset that agent's text. The subjects' stream is
TOKEN_STREAMS (15 min retention: a dashboard that joins late still sees them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from services.common import events as ev
from services.common.llm import VLLMClient
from services.common.settings import RAY_ENV
from services.deliberation.engine import AgentCall, CallOutcome, ErrorKind, describe_error
from services.deliberation.llm import LLMResponse

log = logging.getLogger("fleet.ray_executor")

AGENT_CALLS = Counter("fleet_ray_agent_calls_total", "Agent calls run on the Ray agent pool", ["phase", "outcome"])
AGENT_CALL_SECONDS = Histogram(
    "fleet_ray_agent_call_seconds",
    "Agent call wall time seen by the driver (submission to outcome)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


@dataclass(frozen=True)
class CallSpec:
    """What an agent call needs besides the call itself (picklable; the same for every call of a deliberation)."""

    vllm_url: str
    model: str
    llm_timeout: float  # one HTTP attempt
    llm_max_retries: int
    call_timeout: float  # the whole call, every attempt
    deadline: float | None = None  # the deliberation's deadline, epoch seconds
    nats_url: str = ""  # "" disables token streaming
    token_batch_seconds: float = 0.1
    correlation_id: str = ""


# --- connecting the driver ------------------------------------------------------------------------------------


@dataclass
class RayConnection:
    address: str  # the GCS address the driver is connected to
    owned: bool  # this process called ray.init (so it calls ray.shutdown)

    def shutdown(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()


def connect_ray(
    address: str, *, namespace: str = "fleet", local_num_cpus: int = 2, log_to_driver: bool = False
) -> RayConnection:
    """Connect this process to the Ray cluster at `address`, or start a local Ray when it is empty.

    A process already connected (a test session, an embedding program) is reused and not shut down by us.
    Blocking (seconds): call it from a thread.
    """
    for key, value in RAY_ENV.items():  # before `import ray` (see RAY_ENV)
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return RayConnection(ray.get_runtime_context().gcs_address, owned=False)
    common: dict[str, Any] = {
        "namespace": namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": log_to_driver,
    }
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(
            address="local",
            num_cpus=local_num_cpus,
            num_gpus=0,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **common,
        )
    return RayConnection(ray.get_runtime_context().gcs_address, owned=True)


# --- the agent workers (Ray actors) -------------------------------------------------------------------------

Result = tuple[LLMResponse | None, str | None, ErrorKind | None]  # what a call returns: small, no prompt echo


class AgentWorker:
    """A Ray actor (async: many calls at once on its event loop) that runs agent calls. It keeps its HTTP
    connection pools and its NATS connection between calls."""

    MAX_BUSES = 4

    def __init__(self) -> None:
        self.clients: dict[tuple[str, str, float, int], VLLMClient] = {}
        self.buses: dict[str, Any] = {}  # nats url -> EventBus
        self.bus_failed_until: dict[str, float] = {}
        self._connecting: dict[str, asyncio.Future[Any]] = {}

    async def ready(self) -> int:
        return os.getpid()

    async def call(self, call: AgentCall, spec: CallSpec) -> Result:
        return await _call(self, call, spec)

    def llm(self, spec: CallSpec) -> VLLMClient:
        key = (spec.vllm_url, spec.model, spec.llm_timeout, spec.llm_max_retries)
        if key not in self.clients:
            self.clients[key] = VLLMClient(
                spec.vllm_url, spec.model, timeout=spec.llm_timeout, max_retries=spec.llm_max_retries
            )
        return self.clients[key]

    async def bus(self, url: str) -> Any:
        """The EventBus on `url` (one connect shared by concurrent calls); None for 30 s after a failed connect."""
        bus = self.buses.get(url)
        if bus is not None and not bus.nc.is_closed:
            return bus
        if time.monotonic() < self.bus_failed_until.get(url, 0.0):
            return None
        if url not in self._connecting:
            self._connecting[url] = asyncio.ensure_future(self._connect(url))
        try:
            return await asyncio.shield(self._connecting[url])
        finally:
            self._connecting.pop(url, None)

    async def _connect(self, url: str) -> Any:
        from services.common.bus import EventBus, connect_nats
        from services.common.settings import FleetSettings

        try:
            nc = await connect_nats(url, f"fleet-agent-worker-{os.getpid()}", connect_timeout=2.0)
        except Exception as e:
            log.warning("token streaming off for 30 s: %s", e)
            self.bus_failed_until[url] = time.monotonic() + 30
            return None
        while len(self.buses) >= self.MAX_BUSES:  # keep a few: a gone server's client would reconnect forever
            old = self.buses.pop(next(iter(self.buses)))
            with contextlib.suppress(Exception):
                await old.nc.close()
        bus = EventBus(nc, ev.RAY_EXECUTOR, FleetSettings.model_construct(nats_url=url))
        self.buses[url] = bus
        return bus


class TokenStream:
    """Batches one call's streamed deltas into TokenChunk events: start, tokens (every `interval` s), end.

    `add` never blocks (it only buffers); a pump task publishes in order. The first publish failure turns the
    stream off for the rest of the call (the call itself is never affected).
    """

    def __init__(
        self,
        publish: Callable[[ev.Payload], Awaitable[Any]],
        deliberation_id: str,
        agent_id: str,
        phase: str,
        interval: float = 0.1,
        *,
        flush: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.publish = publish
        self.flush = flush
        self.deliberation_id, self.agent_id, self.phase = deliberation_id, agent_id, phase
        self.interval = interval
        self.seq = 0
        self.buffer: list[str] = []
        self.broken = False
        self._closing = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run())

    async def add(self, text: str) -> None:
        self.buffer.append(text)

    async def end(self, timeout: float = 2.0) -> None:
        """Flush what is buffered, then publish `end` (bounded by `timeout`)."""
        if self._pump is None:
            return
        self._closing.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._pump)
                await self._send("end", "")
                if self.flush is not None and not self.broken:
                    await self.flush()  # `end` is on the server before the call returns
        except Exception as e:  # TimeoutError, or the flush failed: the live view lost its tail, nothing else
            log.warning("token stream of %s/%s did not finish: %r", self.deliberation_id, self.agent_id, e)
            self._pump.cancel()

    def abort(self) -> None:
        if self._pump is not None:
            self._pump.cancel()

    async def _run(self) -> None:
        await self._send("start", "")
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval)
            await self._flush()

    async def _flush(self) -> None:
        if self.buffer:
            text, self.buffer = "".join(self.buffer), []
            await self._send("tokens", text)

    async def _send(self, kind: str, text: str) -> None:
        if self.broken:
            return
        chunk = ev.TokenChunk(
            deliberation_id=self.deliberation_id,
            agent_id=self.agent_id,
            phase=self.phase,
            kind=kind,  # type: ignore[arg-type]
            seq=self.seq,
            text=text,
        )
        self.seq += 1
        try:
            await self.publish(chunk)
        except Exception as e:
            self.broken = True
            log.warning("token stream of %s/%s stopped: %s", self.deliberation_id, self.agent_id, e)


async def _call(worker: AgentWorker, call: AgentCall, spec: CallSpec) -> Result:
    budget = spec.call_timeout
    if spec.deadline is not None:
        budget = min(budget, spec.deadline - time.time())
    if budget <= 0:
        return None, "the deliberation's deadline passed before the call started", "timeout"
    tokens: TokenStream | None = None
    if spec.nats_url:
        bus_ready = asyncio.ensure_future(worker.bus(spec.nats_url))

        async def publish(payload: ev.Payload) -> None:
            """A core NATS publish onto the stream's subject (stored by JetStream; no ack awaited per batch)."""
            bus = await bus_ready
            if bus is None:
                raise RuntimeError("NATS unavailable")
            event = ev.make_event(payload, ev.RAY_EXECUTOR, correlation_id=spec.correlation_id)
            await bus.nc.publish(event.subject, event.to_json(), headers={"Nats-Msg-Id": event.event_id})

        async def flush() -> None:
            if (bus := await bus_ready) is not None:
                await bus.nc.flush(timeout=2)

        tokens = TokenStream(
            publish, call.deliberation_id, call.agent_id, str(call.phase), spec.token_batch_seconds, flush=flush
        )
        tokens.start()
    try:
        async with asyncio.timeout(budget):
            response = await worker.llm(spec).complete(call.request, on_delta=tokens.add if tokens else None)
        result: Result = (response, None, None)
    except asyncio.CancelledError:
        if tokens is not None:
            tokens.abort()
        raise
    except Exception as e:
        message, kind = describe_error(e, budget)
        result = (None, message, kind)
    if tokens is not None:
        await tokens.end()
    return result


# --- the pool and the executor (driver side) ---------------------------------------------------------------


class AgentPool:
    """`size` AgentWorker actors spread over the cluster's nodes, each with `num_cpus` (a fraction: calls wait on
    vLLM) and up to `max_concurrency` calls at once. A dead actor is restarted and its calls re-run
    (`max_retries`: system failures only). A call goes to the actor with the fewest calls in flight."""

    def __init__(
        self, size: int = 4, *, num_cpus: float = 0.25, max_concurrency: int = 32, max_retries: int = 3
    ) -> None:
        import ray

        worker = ray.remote(AgentWorker).options(
            num_cpus=num_cpus,
            max_concurrency=max_concurrency,
            max_restarts=max_retries,
            max_task_retries=max_retries,
            scheduling_strategy="SPREAD",
        )
        self.actors = [worker.remote() for _ in range(size)]
        self.load = [0] * size
        self.num_cpus = num_cpus
        self._turn = 0

    async def ready(self, timeout: float = 120.0) -> list[int]:
        """Wait until every actor runs (their processes start in ~1 s): the first deliberation is not slower."""
        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(a.ready.remote() for a in self.actors)))

    def submit(self, call: AgentCall, spec: CallSpec) -> tuple[Any, int]:
        n = len(self.actors)
        i = min(range(n), key=lambda k: (self.load[k], (k - self._turn) % n))
        self._turn = (i + 1) % n
        self.load[i] += 1
        return self.actors[i].call.remote(call, spec), i

    def release(self, i: int) -> None:
        self.load[i] -= 1

    @property
    def in_flight(self) -> int:
        return sum(self.load)

    @property
    def reserved_cpus(self) -> float:
        return self.num_cpus * len(self.actors)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors.clear()


class RayExecutor:
    """The engine's `Executor` port on the agent pool, for one deliberation (see the module docstring)."""

    name = "ray"
    GRACE_SECONDS = 5.0  # the worker bounds itself; the driver waits this much longer before cancelling

    def __init__(self, pool: AgentPool, spec: CallSpec) -> None:
        self.pool = pool
        self.spec = spec
        self._in_flight: dict[str, Any] = {}  # request id -> ObjectRef
        self._done: dict[str, Result] = {}  # request id -> result (idempotency within the deliberation)

    async def run(self, calls: Sequence[AgentCall]) -> list[CallOutcome]:
        waits = [asyncio.ensure_future(self._one(call)) for call in calls]
        try:
            return list(await asyncio.gather(*waits))
        except BaseException:
            for w in waits:
                w.cancel()
            self.cancel_all()
            raise

    async def _one(self, call: AgentCall) -> CallOutcome:
        if (known := self._done.get(call.request_id)) is not None:
            return CallOutcome(call, *known)
        started = time.perf_counter()
        ref, slot = self.pool.submit(call, self.spec)
        self._in_flight[call.request_id] = ref
        limit = self.spec.call_timeout
        if self.spec.deadline is not None:
            limit = min(limit, self.spec.deadline - time.time())
        limit = max(0.0, limit) + self.GRACE_SECONDS
        try:
            async with asyncio.timeout(limit):
                result: Result = await ref
        except TimeoutError:
            self._cancel(call.request_id)
            result = (None, f"timed out after {limit:g}s (Ray call cancelled)", "timeout")
        except asyncio.CancelledError:
            self._cancel(call.request_id)
            raise
        except Exception as e:
            result = _ray_failure(e)
        finally:
            self._in_flight.pop(call.request_id, None)
            self.pool.release(slot)
        self._done[call.request_id] = result
        outcome = "ok" if result[1] is None else (result[2] or "error")
        AGENT_CALLS.labels(str(call.phase), outcome).inc()
        AGENT_CALL_SECONDS.observe(time.perf_counter() - started)
        return CallOutcome(call, *result)

    def cancel_all(self) -> None:
        for request_id in list(self._in_flight):
            self._cancel(request_id)

    def close(self) -> None:
        """After the deliberation: cancel any call still running and drop every reference (frees the objects)."""
        self.cancel_all()
        self._done.clear()

    def _cancel(self, request_id: str) -> None:
        """`ray.cancel` a call still in flight, once: the phase's cancellation and the call's own both get here."""
        import ray

        ref = self._in_flight.pop(request_id, None)
        if ref is not None:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _ray_failure(e: BaseException) -> Result:
    from ray import exceptions as rx

    if isinstance(e, rx.TaskCancelledError):
        return None, "cancelled", "cancelled"
    if isinstance(e, rx.WorkerCrashedError | rx.NodeDiedError | rx.LocalRayletDiedError | rx.ActorDiedError):
        return None, f"Ray worker lost after retries: {type(e).__name__}: {e}"[:2000], "unavailable"
    if isinstance(e, rx.RayError):
        return None, f"Ray task failed: {type(e).__name__}: {e}"[:2000], "error"
    message, kind = describe_error(e)
    return None, message, kind
