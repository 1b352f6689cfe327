"""Use cases of the context service: rehydrate a role's context, validate scopes, update the graph, take events.

Ports (typing.Protocol) sit beside the use cases: `Graph` (the decision graph), `State` (timeline, summary and the
rendered-context cache) and `Publish` (the event bus). The composition root wires the adapters in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import Counter, Histogram

from services.common import events as ev
from services.common.errors import InvalidArgument, NotFound
from services.context.domain import (
    MAX_PROPOSAL,
    MAX_TEXT,
    MAX_TITLE,
    Change,
    Decision,
    DecisionStatus,
    Deliberation,
    Milestone,
    Operation,
    Plan,
    Proposal,
    ScopeCheck,
    Story,
    StorySnapshot,
    Summary,
    Task,
    check_id,
    check_scopes,
    clip,
    decision_id_for,
    redact,
    story_version,
    title_from,
)
from services.context.rendering import (
    Budget,
    ContextRequest,
    RenderedContext,
    SubtaskNotFound,
    TokenCounter,
    assemble,
    proposal_candidates,
    select,
)

log = logging.getLogger("fleet.context")

CACHE = Counter("fleet_context_cache_total", "Rendered-context cache lookups", ["result"])  # hit, miss
BUILD_SECONDS = Histogram(
    "fleet_context_build_seconds",
    "Time to build a context from the graph (cache misses)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DROPPED = Counter("fleet_context_dropped_items_total", "Items left out of a context to fit its token budget")


# --- ports ---------------------------------------------------------------------------------------------------


class Graph(Protocol):
    async def load(self, story_id: str) -> StorySnapshot | None: ...
    async def proposals(self, story_id: str, proposal_ids: Sequence[str]) -> dict[str, Proposal]: ...
    async def story_exists(self, story_id: str) -> bool: ...
    async def stories_of_task(self, task_id: str) -> list[str]: ...
    async def existing(self, story_id: str, label: str, ids: Iterable[str]) -> set[str]: ...
    async def record_plan(self, story: Story, plan: Plan, tasks: Sequence[Task]) -> None: ...
    async def record_deliberation(
        self, story_id: str, deliberation: Deliberation, decision: Decision, proposal: Proposal
    ) -> bool: ...
    async def mark_announced(self, story_id: str, decision_id: str) -> None: ...
    async def upsert_decision(self, story_id: str, decision: Decision, fields: frozenset[str] | None) -> None: ...
    async def upsert_task(self, story_id: str, task: Task, fields: frozenset[str] | None) -> None: ...
    async def delete(self, story_id: str, label: str, entity_id: str) -> bool: ...


class State(Protocol):
    async def timeline(self, story_id: str) -> tuple[list[Milestone], Summary | None]: ...
    async def put_milestone(self, story_id: str, milestone: Milestone) -> None: ...
    async def delete_milestone(self, story_id: str, milestone_id: str) -> bool: ...
    async def set_summary(self, story_id: str, summary: Summary) -> bool: ...
    async def cached(self, story_id: str, field: str) -> tuple[RenderedContext | None, int]: ...
    async def store(self, story_id: str, field: str, gen: int, ctx: RenderedContext) -> None: ...
    async def invalidate(self, story_id: str) -> int: ...
    async def announced_version(self, story_id: str) -> str: ...
    async def set_announced_version(self, story_id: str, version: str) -> None: ...
    def announcing(self, story_id: str) -> AbstractAsyncContextManager[None]: ...


# (payload, correlation_id, event_id): event ids are derived from content, so a retried publish is a duplicate
# JetStream drops.
Publish = Callable[[ev.Payload, str, str], Awaitable[None]]


def _event_id(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class UpdateResult:
    version: str
    applied: int
    warnings: tuple[str, ...]


class ContextService:
    def __init__(
        self,
        graph: Graph,
        state: State,
        publish: Publish,
        counter: TokenCounter,
        budget: Budget,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.graph = graph
        self.state = state
        self.publish = publish
        self.counter = counter
        self.budget = budget
        self.clock = clock
        self._inflight: dict[tuple[str, str, int], asyncio.Future[RenderedContext]] = {}

    # --- rehydration ------------------------------------------------------------------------------------------

    def request(
        self, story_id: str, role: str, phase: str, subtask_id: str = "", token_budget: int = 0
    ) -> ContextRequest:
        """Validate a GetContext request (InvalidArgument names the field)."""
        return ContextRequest(
            story_id=check_id(story_id, "story_id"),
            role=ev.Role.parse(role, "role"),
            phase=ev.StoryPhase.parse(phase, "phase"),
            token_budget=self.budget.resolve(token_budget, "token_budget"),
            subtask_id=check_id(subtask_id, "subtask_id") if subtask_id.strip() else "",
        )

    async def get_context(
        self, story_id: str, role: str, phase: str, subtask_id: str = "", token_budget: int = 0
    ) -> RenderedContext:
        """The role's context for a story's phase: from the cache, else built from the graph (and cached)."""
        req = self.request(story_id, role, phase, subtask_id, token_budget)
        ctx, gen = await self.state.cached(req.story_id, req.cache_field)
        if ctx is not None:
            CACHE.labels("hit").inc()
            return ctx
        CACHE.labels("miss").inc()
        return await self._single_flight(req, gen, None)

    async def _single_flight(self, req: ContextRequest, gen: int, snapshot: StorySnapshot | None) -> RenderedContext:
        """Concurrent misses for the same context build it once."""
        key = (req.story_id, req.cache_field, gen)
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[RenderedContext] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            ctx = await self._build(req, gen, snapshot)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(ctx)
        return ctx

    async def _build(self, req: ContextRequest, gen: int, snapshot: StorySnapshot | None) -> RenderedContext:
        t0 = time.perf_counter()
        snap = snapshot or await self.snapshot(req.story_id)
        try:
            sel = select(snap, req.role, req.phase, req.subtask_id)
        except SubtaskNotFound:
            raise NotFound(f"subtask {req.subtask_id} not found in story {req.story_id}") from None
        proposals = await self.graph.proposals(req.story_id, proposal_candidates(sel))
        ctx = assemble(snap, req, self.counter, proposals, sel)
        await self.state.store(req.story_id, req.cache_field, gen, ctx)
        BUILD_SECONDS.observe(time.perf_counter() - t0)
        DROPPED.inc(len(ctx.dropped))
        if ctx.redactions:
            log.info("redacted %d secret(s) from %s context of story %s", ctx.redactions, req.role, req.story_id)
        return ctx

    async def snapshot(self, story_id: str) -> StorySnapshot:
        """The story's graph with its timeline and summary, or NotFound."""
        snap, (milestones, summary) = await asyncio.gather(self.graph.load(story_id), self.state.timeline(story_id))
        if snap is None:
            raise NotFound(f"story {story_id} not found")
        return replace(snap, milestones=tuple(milestones), summary=summary)

    async def rehydrate_session(
        self, story_id: str, roles: Sequence[str], phase: str, token_budget: int = 0
    ) -> list[RenderedContext]:
        """Context packs for several roles (all five when none are named), reading the graph at most once."""
        parsed = [ev.Role.parse(r, f"roles[{i}]") for i, r in enumerate(roles)] or list(ev.Role)
        requests = [self.request(story_id, role, phase, "", token_budget) for role in dict.fromkeys(parsed)]
        out: list[RenderedContext] = []
        snapshot: StorySnapshot | None = None
        for req in requests:
            ctx, gen = await self.state.cached(req.story_id, req.cache_field)
            if ctx is None:
                CACHE.labels("miss").inc()
                snapshot = snapshot or await self.snapshot(req.story_id)
                ctx = await self._single_flight(req, gen, snapshot)
            else:
                CACHE.labels("hit").inc()
            out.append(ctx)
        return out

    def validate_scope(self, role: str, phase: str, scopes: Sequence[str]) -> ScopeCheck:
        return check_scopes(ev.Role.parse(role, "role"), ev.StoryPhase.parse(phase, "phase"), scopes)

    # --- changes --------------------------------------------------------------------------------------------

    async def update_context(
        self, story_id: str, changes: Sequence[Change], actor: str = "", correlation_id: str = ""
    ) -> UpdateResult:
        """Apply creates, updates and deletes of decisions, tasks and milestones; answer the story's new version."""
        story_id = check_id(story_id, "story_id")
        if not changes:
            raise InvalidArgument("changes", "at least one change is required")
        if not await self.graph.story_exists(story_id):
            raise NotFound(f"story {story_id} not found")
        now = self.clock()
        warnings: list[str] = []
        applied = 0
        created_decisions: list[Decision] = []
        decisions = await self.graph.existing(
            story_id, "Decision", [c.entity_id for c in changes if isinstance(c.entity, Decision)]
        )
        referenced = {c.entity_id for c in changes if isinstance(c.entity, Task)}
        for c in changes:
            if isinstance(c.entity, Decision):
                referenced |= set(c.entity.affects_task_ids)
            elif isinstance(c.entity, Task):
                referenced |= set(c.entity.depends_on) | {c.entity.parent_task_id} - {""}
        tasks = await self.graph.existing(story_id, "Task", referenced)
        milestones = {m.milestone_id: m for m in (await self.state.timeline(story_id))[0]}

        for i, c in enumerate(changes):
            where = f"changes[{i}]: {c.kind} {c.entity_id}"
            e = c.entity
            if c.operation is Operation.DELETE:
                if isinstance(e, Milestone):
                    gone = await self.state.delete_milestone(story_id, e.milestone_id)
                    milestones.pop(e.milestone_id, None)
                else:
                    gone = await self.graph.delete(
                        story_id, "Decision" if isinstance(e, Decision) else "Task", c.entity_id
                    )
                    (decisions if isinstance(e, Decision) else tasks).discard(c.entity_id)
                if gone:
                    applied += 1
                else:
                    warnings.append(f"{where} did not exist; nothing deleted")
                continue
            known = (
                c.entity_id in milestones
                if isinstance(e, Milestone)
                else c.entity_id in (decisions if isinstance(e, Decision) else tasks)
            )
            if c.operation is Operation.UPDATE and not known:
                warnings.append(f"{where} does not exist; use CREATE (skipped)")
                continue
            if c.operation is Operation.CREATE and known:
                warnings.append(f"{where} already existed; replaced")
            fields = c.fields if c.operation is Operation.UPDATE else None
            if isinstance(e, Milestone):
                if fields is not None:
                    old = milestones[e.milestone_id]
                    e = replace(old, **{f: getattr(e, f) for f in fields})
                if not e.at:
                    e = replace(e, at=now)
                await self.state.put_milestone(story_id, e)
                milestones[e.milestone_id] = e
            elif isinstance(e, Decision):
                if fields is None:
                    e = replace(e, decided_at=e.decided_at or now, decided_by=e.decided_by or actor)
                missing = [t for t in e.affects_task_ids if t not in tasks]
                if missing and (fields is None or "affects_task_ids" in fields):
                    warnings.append(f"{where} affects unknown task(s) {', '.join(missing)}: not linked")
                await self.graph.upsert_decision(story_id, e, fields)
                if not known:
                    created_decisions.append(e)
                decisions.add(e.decision_id)
            else:
                missing = [t for t in e.depends_on if t not in tasks]
                if missing and (fields is None or "depends_on" in fields):
                    warnings.append(f"{where} depends on unknown task(s) {', '.join(missing)}: linked once they exist")
                if e.parent_task_id and e.parent_task_id not in tasks:
                    warnings.append(f"{where} has unknown parent {e.parent_task_id}: not linked")
                await self.graph.upsert_task(story_id, e, fields)
                tasks.add(e.task_id)
            applied += 1

        cid = correlation_id or ev.new_id("ctx")
        version = await self._changed(story_id, cid, applied, actor, f"UpdateContext by {actor or 'unknown'}")
        for d in created_decisions:
            await self._announce(story_id, d, cid)
        return UpdateResult(version, applied, tuple(warnings))

    async def _changed(self, story_id: str, cid: str, changes: int, actor: str, reason: str) -> str:
        """After a write: invalidate the story's cached contexts; announce the new version if it changed.

        Replicas announce a story one at a time, each with the version read once it holds the story's announcement
        lock, so the story's last context.updated carries its latest version (replicas announcing at once published
        an older version last for 1-4 of 24 stories: tests/integration/context/test_replicas.py)."""
        await self.state.invalidate(story_id)
        async with self.state.announcing(story_id):
            version = story_version(await self.snapshot(story_id))
            if version != await self.state.announced_version(story_id):
                payload = ev.ContextUpdated(
                    story_id=story_id,
                    version=version,
                    changes=changes,
                    actor=clip(actor, 120),
                    reason=clip(reason, 200),
                )
                await self.publish(payload, cid, _event_id(type(payload).__name__, story_id, version))
                await self.state.set_announced_version(story_id, version)
        return version

    async def _announce(self, story_id: str, d: Decision, cid: str) -> None:
        payload = ev.DecisionAdded(
            story_id=story_id,
            decision_id=d.decision_id,
            title=d.title,
            decided_by=d.decided_by,
            task_id=d.task_id or (d.affects_task_ids[0] if d.affects_task_ids else ""),
            deliberation_id=d.deliberation_id,
        )
        await self.publish(payload, cid, _event_id(type(payload).__name__, story_id, d.decision_id))
        await self.graph.mark_announced(story_id, d.decision_id)

    # --- events ---------------------------------------------------------------------------------------------

    async def on_plan_approved(self, event: ev.Envelope[Any]) -> None:
        """A plan approval (PlanApproved) -> story, plan and tasks in the graph; a milestone on the timeline."""
        p: ev.PlanApproved = event.payload
        at = _ms(p.timestamp)
        roles = tuple(p.requested_roles())
        tasks = [
            Task(
                task_id=t.task_id,
                description=clip(t.description, MAX_TEXT),
                role=t.role,
                priority=t.priority,
                depends_on=tuple(t.depends_on),
                requirements=tuple(t.requirements),
            )
            for t in p.tasks or ()
        ]
        await self.graph.record_plan(
            Story(p.story_id, clip(p.title, MAX_TITLE), clip(p.description, MAX_TEXT)),
            Plan(p.plan_id, p.approved_by, at, roles),
            tasks,
        )
        await self.state.put_milestone(
            p.story_id,
            Milestone(
                f"plan-approved:{p.plan_id}",
                f"Plan {p.plan_id} approved",
                f"by {p.approved_by}; {len(tasks)} task(s); roles {', '.join(roles)}",
                at,
            ),
        )
        cid = event.correlation_id or event.event_id
        await self._changed(p.story_id, cid, 1 + len(tasks), p.approved_by, f"plan {p.plan_id} approved")
        log.info("recorded plan %s of story %s (%d tasks)", p.plan_id, p.story_id, len(tasks))

    async def on_deliberation_completed(self, event: ev.Envelope[Any]) -> None:
        """A completed deliberation -> Decision + winning Proposal + Deliberation, linked to the task."""
        p: ev.DeliberationCompleted = event.payload
        story_id = p.story_id
        if not story_id:
            stories = await self.graph.stories_of_task(p.task_id)
            if len(stories) != 1:
                log.warning(
                    "deliberation %s on task %s names no story and the task is in %d stories: not recorded",
                    p.deliberation_id,
                    p.task_id,
                    len(stories),
                )
                return
            story_id = stories[0]
        at = _ms(event.occurred_at)
        proposal = Proposal(
            p.winner_proposal_id or f"{p.deliberation_id}:winner",
            p.winner_id,
            clip(p.winner_content, MAX_PROPOSAL),
            p.winner_score,
        )
        title, _ = redact(clip(title_from(p.winner_content, f"{p.role} decision on {p.task_id}"), MAX_TITLE))
        method = f"chosen by {'the architect' if p.selection_method == 'ARCHITECT' else 'score (fallback)'}"
        decision = Decision(
            decision_id=decision_id_for(p.deliberation_id),
            title=title,
            rationale=clip(p.rationale or f"{method}, score {p.winner_score:.2f}", MAX_TEXT),
            status=DecisionStatus.ACCEPTED,
            decided_by=f"{p.role} council",
            decided_at=at,
            affects_task_ids=(p.task_id,),
            task_id=p.task_id,
            role=p.role,
            deliberation_id=p.deliberation_id,
            proposal_id=proposal.proposal_id,
        )
        deliberation = Deliberation(
            deliberation_id=p.deliberation_id,
            task_id=p.task_id,
            role=p.role,
            selection_method=p.selection_method,
            winner_score=p.winner_score,
            duration_ms=p.duration_ms,
            total_tokens=p.total_tokens,
            checks_passed=p.checks_passed,
            checks_failed=p.checks_failed,
            context_version=p.context_version,
            completed_at=at,
        )
        announced = await self.graph.record_deliberation(story_id, deliberation, decision, proposal)
        await self.state.put_milestone(
            story_id, Milestone(f"decision:{decision.decision_id}", f"{p.role} decided on {p.task_id}", title, at)
        )
        await self.state.set_summary(
            story_id,
            Summary(f"Latest: the {p.role} council decided on task {p.task_id}: {title} ({method}).", at),
        )
        cid = event.correlation_id or event.event_id
        await self._changed(story_id, cid, 1, f"{p.role} council", f"deliberation {p.deliberation_id} completed")
        if not announced:
            await self._announce(story_id, decision, cid)
        log.info("recorded decision %s for task %s of story %s", decision.decision_id, p.task_id, story_id)
