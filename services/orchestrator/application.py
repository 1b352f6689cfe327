"""Orchestrator use cases: councils, deliberations, plan approvals, status.

Ports (typing.Protocol, defined here where they are used): a Store (Valkey), a Runner that runs one
deliberation (the engine with the in-process executor, or the ray-executor service), a ContextSource (the
context service), a Meter (the spending-cap counters, Valkey) and an event publisher (the bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import Counter

from services.common import events as ev
from services.common.auth import Principal
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.events import DeliberationStatus, Role, StoryPhase
from services.deliberation.domain import (
    AgentSpec,
    Council,
    DeliberationResult,
    ProgressEvent,
    Task,
    make_council,
)
from services.deliberation.grounding import program_of
from services.orchestrator import caps
from services.orchestrator.caps import CallerUsage, Caps, Usage

log = logging.getLogger("fleet.orchestrator")

# Usage per caller (the token subject) of Deliberate/StreamDeliberation, on this replica (Prometheus sums them).
# Label cardinality: one series per subject that deliberates, i.e. per person or service holding a token (tens),
# never per request; an issuer that minted a subject per request would make it unbounded.
CALLER_DELIBERATIONS = Counter(
    "fleet_orchestrator_caller_deliberations_total", "Deliberations started through the API, by caller", ["caller"]
)
CALLER_TOKENS = Counter(
    "fleet_orchestrator_caller_tokens_total", "Tokens spent by deliberations started through the API", ["caller"]
)

Progress = Callable[[ProgressEvent], Awaitable[None]]


class Store(Protocol):
    async def add_council(self, council: Council) -> bool: ...
    async def councils(self) -> list[Council]: ...
    async def council(self, role: Role) -> Council | None: ...
    async def delete_council(self, role: Role) -> Council | None: ...
    async def save(self, result: DeliberationResult) -> None: ...
    async def get(self, deliberation_id: str) -> DeliberationResult | None: ...
    async def latest_for_task(self, task_id: str) -> DeliberationResult | None: ...
    async def running(self) -> list[str]: ...
    async def take_lease(self, deliberation_id: str, owner: str, seconds: float) -> bool: ...
    async def renew_lease(self, deliberation_id: str, seconds: float) -> None: ...
    async def drop_lease(self, deliberation_id: str) -> None: ...
    async def lease_holder(self, deliberation_id: str) -> str | None: ...
    async def stats(self) -> tuple[dict[str, int], dict[str, int], float, int]: ...


class Runner(Protocol):
    """Runs one deliberation to its end (never raises for LLM trouble: the result says FAILED/TIMEOUT)."""

    name: str

    async def run(
        self, task: Task, council: Council, architect: AgentSpec | None, deliberation_id: str, on_progress: Progress
    ) -> DeliberationResult: ...


@dataclass(frozen=True)
class Context:
    text: str
    version: str


class ContextSource(Protocol):
    async def get_context(self, story_id: str, role: Role, phase: str, token_budget: int) -> Context: ...


class Meter(Protocol):
    """The spending-cap counters per caller (services/orchestrator/caps.py), shared by the replicas."""

    async def start(self, subject: str, roles: frozenset[str]) -> Usage: ...
    async def unstart(self, subject: str) -> None: ...
    async def spend(self, subject: str, tokens: int) -> None: ...
    async def usage(self, subjects: list[str]) -> list[Usage]: ...
    async def callers(self, limit: int) -> list[tuple[str, frozenset[str]]]: ...


# (payload, correlation_id, actor: who caused it — a deliberation's `requested_by` —, event id: "" for a new one)
Publish = Callable[[ev.Payload, str, str, str], Awaitable[None]]


@dataclass(frozen=True)
class Status:
    uptime_seconds: int
    by_status: dict[str, int]
    by_role: dict[str, int]
    average_duration_ms: float
    in_flight: int
    active_councils: int
    executor: str
    degraded: str = ""


class Orchestrator:
    LEASE_SECONDS = 30.0

    def __init__(
        self,
        store: Store,
        runner: Runner,
        publish: Publish,
        context: ContextSource | None = None,
        *,
        instance_id: str = "orchestrator",
        context_token_budget: int = 2048,
        default_num_agents: int = 3,
        meter: Meter | None = None,
        caps_by_role: dict[str, Caps] | None = None,
    ) -> None:
        """Without a `meter` nothing is counted nor capped; `caps_by_role` empty (authentication off): counted,
        never capped."""
        self.store = store
        self.runner = runner
        self.publish = publish
        self.context = context
        self.instance_id = instance_id
        self.context_token_budget = context_token_budget
        self.default_num_agents = default_num_agents
        self.meter = meter
        self.caps_by_role = caps_by_role or {}
        self.started = time.monotonic()

    # --- councils ------------------------------------------------------------------------------------------

    async def create_council(self, role: str, num_agents: int = 0) -> Council:
        council = make_council(Role.parse(role), num_agents or self.default_num_agents)
        if not await self.store.add_council(council):
            raise AlreadyExists(f"council for role {council.role} already exists ({council.council_id})")
        log.info("created %s with %d agents", council.council_id, len(council.agents))
        return council

    async def ensure_councils(self, num_agents: int = 0) -> list[tuple[Council, bool]]:
        """Create every role's council that is missing (idempotent); (council, created) per role."""
        out = []
        for role in Role:
            try:
                out.append((await self.create_council(role, num_agents), True))
            except AlreadyExists:
                existing = await self.store.council(role)
                assert existing is not None
                out.append((existing, False))
        return out

    async def list_councils(self, role_filter: str = "") -> list[Council]:
        councils = await self.store.councils()
        if role_filter:
            role = Role.parse(role_filter, field="role_filter")
            councils = [c for c in councils if c.role == role]
        return councils

    async def delete_council(self, role: str) -> Council:
        parsed = Role.parse(role)
        deleted = await self.store.delete_council(parsed)
        if deleted is None:
            raise NotFound(f"no council for role {parsed}")
        return deleted

    # --- deliberations -------------------------------------------------------------------------------------

    async def deliberate(
        self,
        task: Task,
        *,
        num_agents: int = 0,
        phase: str = "BUILD",
        plan_id: str = "",
        deliberation_id: str = "",
        correlation_id: str = "",
        on_progress: Progress | None = None,
        annotate: Callable[[DeliberationResult], Awaitable[DeliberationResult]] | None = None,
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> DeliberationResult:
        """Run one deliberation of `task` by its role's council, recording it and publishing its events.
        `annotate` amends the result before it is recorded and announced (a plan's linked outcomes); `admit`, once
        the request is known valid and before anything is started or recorded, may refuse it (spending caps)."""
        phase = StoryPhase.parse(phase, "phase")
        council = await self.store.council(task.role)
        if council is None:
            raise FailedPrecondition(
                f"no council for role {task.role}: create it with CreateCouncil or `fleet councils init`"
            )
        n = num_agents or len(council.agents)
        if not 1 <= n <= len(council.agents):
            raise InvalidArgument("num_agents", f"must be 1..{len(council.agents)} for {council.council_id}, got {n}")
        council = replace(council, agents=council.agents[:n])
        if admit is not None:
            await admit()
        architect = await self._architect(council)
        deliberation_id = deliberation_id or ev.new_id("delib")
        cid = correlation_id or deliberation_id

        task, context_note = await self._with_context(task, phase)
        if not await self.store.take_lease(deliberation_id, self.instance_id, self.LEASE_SECONDS):
            raise AlreadyExists(f"deliberation {deliberation_id} is already running")
        pending = replace(
            DeliberationResult.pending(deliberation_id, task, council.council_id, self.runner.name),
            context_note=context_note,
        )
        await self.store.save(pending)
        await self.publish(
            ev.TaskDispatched(
                task_id=task.task_id,
                role=task.role,
                deliberation_id=deliberation_id,
                story_id=task.story_id,
                plan_id=plan_id,
                description=task.description[:4000],
            ),
            cid,
            task.requested_by,
            "",
        )
        await self.publish(
            ev.DeliberationStarted(
                deliberation_id=deliberation_id,
                task_id=task.task_id,
                role=task.role,
                council_id=council.council_id,
                story_id=task.story_id,
                plan_id=plan_id,
                num_agents=len(council.agents),
                executor=self.runner.name,
            ),
            cid,
            task.requested_by,
            "",
        )
        keep_lease = asyncio.create_task(self._keep_lease(deliberation_id))
        try:
            result = await self.runner.run(task, council, architect, deliberation_id, on_progress or _ignore)
        except Exception as e:
            log.exception("deliberation %s crashed", deliberation_id)
            result = replace(
                pending,
                status=DeliberationStatus.FAILED,
                error_message=f"deliberation crashed: {type(e).__name__}: {e}",
                finished_at=datetime.now(UTC),
            )
        finally:
            keep_lease.cancel()
        result = replace(
            result,
            executor=self.runner.name,
            story_id=task.story_id,
            context_version=task.context_version,
            context_note=context_note,
            requested_by=task.requested_by,
        )
        if annotate is not None:
            result = await annotate(result)
        await self.store.save(result)
        await self.store.drop_lease(deliberation_id)
        await self._announce(result, plan_id, cid)
        log.info(
            "deliberation %s of %s (%s) ended %s in %d ms",
            deliberation_id,
            task.task_id,
            task.role,
            result.status,
            result.duration_ms,
        )
        return result

    async def deliberate_for(self, caller: Principal, task: Task, **kwargs) -> DeliberationResult:
        """A deliberation the API was asked for by `caller`: within its spending caps (ResourceExhausted before
        anything starts otherwise), recorded as requested by it, its tokens counted against its day when it ends."""
        task = replace(task, requested_by=caller.actor)
        if self.meter is None:
            return await self.deliberate(task, **kwargs)
        result = await self.deliberate(task, admit=functools.partial(self._admit, caller), **kwargs)
        CALLER_TOKENS.labels(caller.subject).inc(result.total_tokens)
        try:
            await self.meter.spend(caller.subject, result.total_tokens)
        except Exception as e:  # the result is recorded: the caller gets it, the day misses these tokens
            log.warning("tokens of %s not counted for %s: %s", result.deliberation_id, caller.subject, e)
        return result

    async def _admit(self, caller: Principal) -> None:
        assert self.meter is not None
        # Counted first, checked after (INCR is atomic): replicas racing for a caller's last start cannot both win.
        usage = await self.meter.start(caller.subject, caller.roles)
        refusal = caps.check(replace(usage, started=usage.started - 1), caller.roles, self.caps_by_role)
        if refusal is not None:
            await self.meter.unstart(caller.subject)
            raise ResourceExhausted(
                refusal.message(caller.actor), reason="SPENDING_CAP", metadata=refusal.metadata(usage.now)
            )
        CALLER_DELIBERATIONS.labels(caller.subject).inc()

    async def _architect(self, council: Council) -> AgentSpec | None:
        """An ARCHITECT agent that did not author a proposal when possible; None: the fallback decides."""
        architects = await self.store.council(Role.ARCHITECT)
        if architects is None or not architects.agents:
            return None
        authors = {a.agent_id for a in council.agents}
        return next((a for a in architects.agents if a.agent_id not in authors), architects.agents[0])

    async def _with_context(self, task: Task, phase: str) -> tuple[Task, str]:
        """The task with its story's context for the role and phase (after what the task already carries: its
        plan dependencies' winners), or the task as it is and a note saying why."""
        if not task.story_id:
            return task, "no story: deliberated on the task alone"
        if self.context is None:
            return task, "no context service configured (CONTEXT_ADDRESS): deliberated on the task alone"
        try:
            ctx = await self.context.get_context(task.story_id, task.role, phase, self.context_token_budget)
        except Exception as e:
            note = f"context for story {task.story_id} unavailable ({e}): deliberated on the task alone"
            log.warning("%s", note)
            return replace(task, context_version=""), note
        context = "\n\n".join(x for x in (task.context, ctx.text) if x.strip())
        return replace(task, context=context, context_version=ctx.version), ""

    async def _keep_lease(self, deliberation_id: str) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.LEASE_SECONDS / 3)
                with contextlib.suppress(Exception):
                    await self.store.renew_lease(deliberation_id, self.LEASE_SECONDS)

    async def result_for_task(self, task_id: str) -> DeliberationResult:
        if not task_id:
            raise InvalidArgument("task_id", "is required")
        result = await self.store.latest_for_task(task_id)
        if result is None:
            raise NotFound(f"no deliberation for task {task_id}")
        return result

    async def recover(self) -> list[str]:
        """Fail, explicitly, every in-flight deliberation whose runner is gone (its lease expired).

        Plan approvals in flight are not lost: their event was not acknowledged, so JetStream redelivers it
        and on_plan_approved reruns exactly the deliberations that did not complete.
        """
        failed = []
        for deliberation_id in await self.store.running():
            if await self.store.lease_holder(deliberation_id):
                continue
            record = await self.store.get(deliberation_id)
            if record is None or record.status.ended:
                continue
            await self.store.save(
                replace(
                    record,
                    status=DeliberationStatus.FAILED,
                    error_message="orchestrator stopped during the deliberation (lease expired)",
                    finished_at=datetime.now(UTC),
                    interrupted=True,
                )
            )
            failed.append(deliberation_id)
        if failed:
            log.warning("marked %d orphaned deliberations FAILED: %s", len(failed), ", ".join(failed))
        return failed

    # --- plan approvals ---------------------------------------------------------------------------------------

    async def on_plan_approved(self, event: ev.Envelope[ev.PlanApproved]) -> None:
        """One deliberation per (task, role). The plan is a DAG (validated in the catalog): a task starts when the
        tasks it `depends_on` have completed, with their winning code as the code it builds on (`base_code`) and
        their winning content in its context; independent tasks run at once. A task whose dependency did not
        complete does not start: it is recorded FAILED, saying which. Idempotent: a redelivered or repeated
        approval reruns only the deliberations that have not ended (their ids derive from the event id).

        Not within spending caps, and their tokens are not charged to the approver's day: the approval already
        happened (refusing it now would only lose it; the product-owner API that approves is the place for a cap),
        and the approver is known here only by the event's `approved_by` (an email or a subject, with no roles),
        not as the token subject the caps count by. Their spend shows in the results' usage and the stats."""
        plan = event.payload
        cid = event.correlation_id or event.event_id
        planned = [replace(p, task=replace(p.task, requested_by=plan.approved_by)) for p in plan_tasks(plan)]
        loop = asyncio.get_running_loop()
        ended: dict[str, asyncio.Future[DeliberationResult]] = {p.task.task_id: loop.create_future() for p in planned}

        async def one(p: PlannedTask) -> None:
            did = _stable_id(event.event_id, p.task.task_id, p.task.role)
            try:
                deps = [await asyncio.shield(ended[d]) for d in p.depends_on]
                blocked = [d for d in deps if d.status != DeliberationStatus.COMPLETED or d.winner is None]
                if blocked:
                    result = await self._not_started(p.task, did, plan.plan_id, cid, blocked)
                else:
                    link = functools.partial(self._link, deps=deps)
                    result = await self._deliberate_once(_building_on(p.task, deps), did, plan.plan_id, cid, link)
                ended[p.task.task_id].set_result(result)
            except BaseException as e:
                ended[p.task.task_id].set_exception(e)  # its dependents end too; the bus redelivers the approval
                raise

        outcomes = await asyncio.gather(*(one(p) for p in planned), return_exceptions=True)
        for future in ended.values():  # retrieved: an exception is reported once, below
            if future.done() and not future.cancelled():
                future.exception()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:  # infrastructure trouble (Valkey, NATS): let the bus retry the approval
            raise errors[0]

    async def _deliberate_once(
        self,
        task: Task,
        deliberation_id: str,
        plan_id: str,
        cid: str,
        annotate: Callable[[DeliberationResult], Awaitable[DeliberationResult]] | None = None,
    ) -> DeliberationResult:
        existing = await self.store.get(deliberation_id)
        if existing is not None and (existing.status.ended and not _interrupted(existing)):
            log.info("approval already handled for %s (%s): %s", task.task_id, task.role, existing.status)
            await self._announce(existing, plan_id, cid)  # in case its runner died between saving and announcing
            return existing
        if existing is not None and await self.store.lease_holder(deliberation_id):
            raise RuntimeError(f"deliberation {deliberation_id} is running elsewhere")
        try:
            return await self.deliberate(
                task, plan_id=plan_id, deliberation_id=deliberation_id, correlation_id=cid, annotate=annotate
            )
        except FailedPrecondition as e:  # no council for the role: retrying will not help; record it
            return await self._record_failed(task, deliberation_id, plan_id, cid, e.message)

    async def _not_started(
        self, task: Task, deliberation_id: str, plan_id: str, cid: str, blocked: list[DeliberationResult]
    ) -> DeliberationResult:
        existing = await self.store.get(deliberation_id)
        if existing is not None and existing.status.ended:
            await self._announce(existing, plan_id, cid)
            return existing
        why = "; ".join(
            f"{d.task_id} ended {d.status}" + (f" ({d.error_message})" if d.error_message else "") for d in blocked
        )
        return await self._record_failed(task, deliberation_id, plan_id, cid, f"not started: its dependency {why}")

    async def _announce(self, result: DeliberationResult, plan_id: str, cid: str) -> None:
        """Publish how a deliberation ended, under an event id of its own: announcing it again (a redelivered
        approval whose runner died after saving the result, before announcing it) is dropped by the stream's
        duplicate window and by every consumer's seen-set, so the outcome is announced once and never lost."""
        event_id = f"{result.deliberation_id}.outcome"
        await self.publish(result.outcome_event(plan_id), cid, result.requested_by, event_id)

    async def _record_failed(
        self, task: Task, deliberation_id: str, plan_id: str, cid: str, why: str
    ) -> DeliberationResult:
        failed = replace(
            DeliberationResult.pending(deliberation_id, task, "", self.runner.name),
            status=DeliberationStatus.FAILED,
            error_message=why,
            finished_at=datetime.now(UTC),
        )
        await self.store.save(failed)
        await self._announce(failed, plan_id, cid)
        return failed

    async def _link(self, result: DeliberationResult, deps: list[DeliberationResult]) -> DeliberationResult:
        """A QA task built on DEV's code: its winning tests ran against DEV's winning code (its `tests.own` check);
        that outcome is noted on both results before QA's is recorded and announced (once per note, however often
        the approval is redelivered)."""
        winner = result.winner
        if result.role != Role.QA or winner is None:
            return result
        own = next((c for c in winner.checks if c.name == "tests.own" and c.applicable), None)
        for dep in deps:
            if dep.role != Role.DEV:
                continue
            if own is None:
                what = "its winning proposal wrote no test that ran"
            elif "against the code it builds on" not in own.detail:
                what = "its winning proposal brought its own code, so its tests did not run against DEV's"
            else:
                first = f": {own.findings[0].message}" if own.findings else ""
                what = f"{'passed' if own.passed else 'FAILED'}, {own.detail}{first}"
            note = f"QA task {result.task_id}'s winning tests against DEV task {dep.task_id}'s winning code: {what}"
            latest = await self.store.get(dep.deliberation_id) or dep
            if note not in latest.notes:
                await self.store.save(replace(latest, notes=(*latest.notes, note)))
            if note not in result.notes:
                result = replace(result, notes=(*result.notes, note))
        return result

    # --- status --------------------------------------------------------------------------------------------

    async def usage(self, caller: Principal, others: int = 0) -> list[CallerUsage]:
        """The caller's usage and caps, then up to `others` other callers seen in the last day (most recent first)."""
        if self.meter is None:
            return []
        recent = await self.meter.callers(others + 1) if others else []
        seen = [(s, r) for s, r in recent if s != caller.subject][:others]
        who = [(caller.subject, caller.roles), *seen]
        usages = await self.meter.usage([s for s, _ in who])
        return [caps.report(u, roles, self.caps_by_role) for u, (_, roles) in zip(usages, who, strict=True)]

    async def status(self) -> Status:
        by_status, by_role, avg, in_flight = await self.store.stats()
        councils = await self.store.councils()
        return Status(
            uptime_seconds=int(time.monotonic() - self.started),
            by_status=by_status,
            by_role=by_role,
            average_duration_ms=avg,
            in_flight=in_flight,
            active_councils=len(councils),
            executor=self.runner.name,
        )


async def _ignore(_: ProgressEvent) -> None:
    return None


def _interrupted(result: DeliberationResult) -> bool:
    return result.status == DeliberationStatus.FAILED and result.interrupted


def _stable_id(*parts: str) -> str:
    return "delib-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedTask:
    task: Task
    depends_on: tuple[str, ...] = ()  # task ids of the same plan


def _building_on(task: Task, deps: list[DeliberationResult]) -> Task:
    """The task with its dependencies' winners: their code as the code it builds on, their content as context."""
    if not deps:
        return task
    code = [program_of(d.winner.proposal.content).code for d in deps if d.winner is not None]
    decided = [
        f"### {d.task_id} ({d.role}), decided by its council\n{d.winner.proposal.content.strip()[:DEPENDENCY_CHARS]}"
        for d in deps
        if d.winner is not None
    ]
    context = "\n\n".join(x for x in ("\n\n".join(decided), task.context) if x.strip())
    return replace(task, base_code="\n\n".join(c.rstrip() for c in code if c.strip()), context=context)


DEPENDENCY_CHARS = 4000


def plan_tasks(plan: ev.PlanApproved) -> list[PlannedTask]:
    """The tasks an approval asks for: its tasks of the requested roles, and one task per requested role
    that has none. Without `roles`, the roles of its tasks (or all five when it has no tasks). A dependency on a
    task of a role that was not requested is dropped (that task will not run)."""
    given = plan.tasks or []
    roles = list(plan.roles) if plan.roles else (list(dict.fromkeys(t.role for t in given)) or list(Role))
    out: list[PlannedTask] = []
    kept = {t.task_id for t in given if t.role in roles}
    for role in roles:
        mine = [t for t in given if t.role == role]
        for t in mine:
            task = Task.create(
                task_id=t.task_id,
                description=t.description,
                role=role,
                requirements=tuple(t.requirements),
                story_id=plan.story_id,
                tests=t.tests,
            )
            out.append(PlannedTask(task, tuple(d for d in t.depends_on if d in kept)))
        if not mine:
            what = plan.description or plan.title or f"the approved plan {plan.plan_id}"
            out.append(
                PlannedTask(
                    Task.create(
                        task_id=f"{plan.story_id}:{plan.plan_id}:{role}",
                        description=f"Story {plan.story_id}, plan {plan.plan_id}: as the {role} council, propose "
                        f"your part of {what}.",
                        role=role,
                        story_id=plan.story_id,
                    )
                )
            )
    return out
