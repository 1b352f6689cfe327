"""Ray executor use cases: accept a deliberation (idempotent on its id), run it with the shared engine over the
Ray executor, answer its status, the service's stats and the active jobs.

Ports (defined here, where they are used): an `ExecutorFactory` that makes the engine's executor for one
deliberation (the Ray executor in production; it is closed after the deliberation, which releases its Ray
work), `Publish` for events, and `WindowSource`: the context window of the model a deliberation calls, which
the engine fits every prompt to (the agents' calls run on the Ray workers, the prompts are built here). Every agent call is published as agent.* events (ObservedExecutor); the
deliberation's lifecycle (orchestration.deliberation.started, then completed or failed) is published too,
unless the caller publishes it itself (the orchestrator does: it knows the plan, and one event per outcome is
what consumers expect).

Jobs live in memory (the last `keep_finished` finished ones are kept for GetDeliberationStatus). A restart
loses them: a caller polling a lost deliberation gets NOT_FOUND and fails it explicitly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from services.common import events as ev
from services.common.errors import AlreadyExists, NotFound, ResourceExhausted
from services.common.events import DeliberationStatus
from services.deliberation.domain import AgentSpec, Council, DeliberationResult, ProgressEvent, Task
from services.deliberation.engine import AgentCall, CallOutcome, Checker, DeliberationEngine, ObservedExecutor
from services.deliberation.llm import ContextWindow

log = logging.getLogger("fleet.ray_executor")

EXECUTOR_NAME = "ray"

DELIBERATIONS = Counter("fleet_ray_deliberations_total", "Deliberations run by the ray-executor", ["status"])
DELIBERATION_SECONDS = Histogram(
    "fleet_ray_deliberation_seconds",
    "Wall time of a deliberation run by the ray-executor",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
ACTIVE = Gauge("fleet_ray_active_deliberations", "Deliberations running on the ray-executor")


class ClosableExecutor(Protocol):
    async def run(self, calls: Sequence[AgentCall]) -> list[CallOutcome]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class DeliberationRequest:
    deliberation_id: str
    task: Task
    council: Council
    architect: AgentSpec | None = None
    vllm_url: str = ""  # "" = the service's default
    model: str = ""
    correlation_id: str = ""
    publish_lifecycle: bool = True  # False: the caller publishes orchestration.deliberation.* itself


# Makes the executor of one deliberation; `deadline` is its end in epoch seconds.
ExecutorFactory = Callable[[DeliberationRequest, float], ClosableExecutor]
Publish = Callable[[ev.Payload, str], Awaitable[None]]  # (payload, correlation_id)
# The context window of the vLLM and model a deliberation calls (None: unknown, prompts are not fitted).
WindowSource = Callable[[DeliberationRequest], Awaitable[ContextWindow | None]]


@dataclass
class Job:
    request: DeliberationRequest
    accepted_at: float  # epoch seconds
    status: DeliberationStatus = DeliberationStatus.PENDING
    phase: str = ""
    result: DeliberationResult | None = None
    finished_at: float | None = None
    runner: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def deliberation_id(self) -> str:
        return self.request.deliberation_id

    @property
    def error_message(self) -> str:
        return self.result.error_message if self.result else ""


@dataclass(frozen=True)
class Stats:
    total: int
    active: int
    completed: int
    failed: int  # FAILED and TIMEOUT
    average_duration_ms: float
    uptime_seconds: int
    ray_address: str


class RayExecutorService:
    def __init__(
        self,
        executors: ExecutorFactory,
        publish: Publish,
        *,
        checker: Checker | None = None,
        windows: WindowSource | None = None,
        ray_address: str = "",
        max_active: int = 64,
        keep_finished: int = 1000,
    ) -> None:
        self.executors = executors
        self.publish = publish
        self.checker = checker
        self.windows = windows
        self.ray_address = ray_address
        self.max_active = max_active
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()
        self._duration_total_ms = 0.0
        self._total = 0
        self.started = time.monotonic()

    # --- use cases --------------------------------------------------------------------------------------------

    async def execute(self, request: DeliberationRequest) -> Job:
        """Start the deliberation and return at once; a known id starts nothing new and returns its job."""
        known = self.jobs.get(request.deliberation_id)
        if known is not None:
            if known.request.task.task_id != request.task.task_id:
                raise AlreadyExists(
                    f"deliberation {request.deliberation_id} is already used for task {known.request.task.task_id}"
                )
            return known
        if len(self.active()) >= self.max_active:
            raise ResourceExhausted(f"{self.max_active} deliberations are running; retry later")
        job = Job(request, accepted_at=time.time())
        self.jobs[request.deliberation_id] = job
        self._total += 1
        job.runner = asyncio.create_task(self._run(job), name=f"deliberation:{request.deliberation_id}")
        return job

    def job(self, deliberation_id: str) -> Job:
        job = self.jobs.get(deliberation_id)
        if job is None:
            raise NotFound(f"no deliberation {deliberation_id} on this ray-executor")
        return job

    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.status.ended]

    def stats(self) -> Stats:
        finished = self._counts[DeliberationStatus.COMPLETED] + self._failed()
        return Stats(
            total=self._total,
            active=len(self.active()),
            completed=self._counts[DeliberationStatus.COMPLETED],
            failed=self._failed(),
            average_duration_ms=self._duration_total_ms / finished if finished else 0.0,
            uptime_seconds=int(time.monotonic() - self.started),
            ray_address=self.ray_address,
        )

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel what is running; each ends FAILED (recorded, and published when it is ours to publish)."""
        runners = [j.runner for j in self.active() if j.runner is not None]
        for r in runners:
            r.cancel()
        if runners:
            await asyncio.wait(runners, timeout=timeout)

    # --- running one deliberation -----------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        r = job.request
        cid = r.correlation_id or r.deliberation_id
        job.status = DeliberationStatus.IN_PROGRESS
        ACTIVE.inc()
        t0 = time.monotonic()
        pending = replace(
            DeliberationResult.pending(r.deliberation_id, r.task, r.council.council_id, EXECUTOR_NAME),
            status=DeliberationStatus.IN_PROGRESS,
        )
        executor: ClosableExecutor | None = None
        try:
            if r.publish_lifecycle:
                await self._publish(
                    ev.DeliberationStarted(
                        deliberation_id=r.deliberation_id,
                        task_id=r.task.task_id,
                        role=r.task.role,
                        council_id=r.council.council_id,
                        story_id=r.task.story_id,
                        num_agents=max(1, len(r.council.agents)),
                        executor=EXECUTOR_NAME,
                    ),
                    cid,
                )
            # the window first: the workers' deadline and the engine's then start together
            window = await self._window(r)
            executor = self.executors(r, time.time() + r.task.constraints.timeout_seconds)
            observed = ObservedExecutor(executor, lambda p: self.publish(p, cid), executor_name=EXECUTOR_NAME)

            async def progress(event: ProgressEvent) -> None:
                if event.kind == "phase_started" and event.phase:
                    job.phase = str(event.phase)

            engine = DeliberationEngine(observed, on_progress=progress, checker=self.checker, window=window)
            result = await engine.run(r.task, r.council, r.architect, r.deliberation_id)
            result = replace(result, executor=EXECUTOR_NAME)
        except asyncio.CancelledError:
            result = self._failed_result(pending, "the ray-executor stopped during the deliberation", t0)
            await self._finish(job, result, cid)
            raise
        except Exception as e:
            log.exception("deliberation %s crashed", r.deliberation_id)
            result = self._failed_result(pending, f"deliberation crashed: {type(e).__name__}: {e}", t0)
        finally:
            if executor is not None:
                executor.close()
            ACTIVE.dec()
        await self._finish(job, result, cid)

    async def _window(self, r: DeliberationRequest) -> ContextWindow | None:
        """The context window of the model the deliberation calls; None (prompts not fitted) when it is unknown."""
        if self.windows is None:
            return None
        try:
            return await self.windows(r)
        except Exception as e:  # the source's own trouble: the deliberation runs, its prompts unfitted
            log.warning("the context window for %s is unknown: %s: %s", r.deliberation_id, type(e).__name__, e)
            return None

    @staticmethod
    def _failed_result(pending: DeliberationResult, error: str, t0: float) -> DeliberationResult:
        return replace(
            pending,
            status=DeliberationStatus.FAILED,
            error_message=error,
            finished_at=datetime.now(UTC),
            duration_ms=round((time.monotonic() - t0) * 1000, 3),
        )

    async def _finish(self, job: Job, result: DeliberationResult, cid: str) -> None:
        job.result, job.status, job.finished_at = result, result.status, time.time()
        self._counts[result.status] += 1
        self._duration_total_ms += result.duration_ms
        DELIBERATIONS.labels(str(result.status)).inc()
        DELIBERATION_SECONDS.observe(result.duration_ms / 1000)
        self._finished.append(job.deliberation_id)
        while len(self._finished) > self.keep_finished:
            self.jobs.pop(self._finished.popleft(), None)
        log.info(
            "deliberation %s of %s (%s) ended %s in %d ms",
            job.deliberation_id,
            result.task_id,
            result.role,
            result.status,
            result.duration_ms,
        )
        if job.request.publish_lifecycle:
            with contextlib.suppress(asyncio.CancelledError):
                await self._publish(result.outcome_event(), cid)

    async def _publish(self, payload: ev.Payload, cid: str) -> None:
        try:
            async with asyncio.timeout(5.0):
                await self.publish(payload, cid)
        except Exception as e:  # the deliberation's record stands; the event is what is lost
            log.warning("could not publish %s: %s: %s", type(payload).__name__, type(e).__name__, e)

    def _failed(self) -> int:
        return self._counts[DeliberationStatus.FAILED] + self._counts[DeliberationStatus.TIMEOUT]
