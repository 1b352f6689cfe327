"""The deliberation engine (DESIGN.md section 2) over two ports: an LLM and an executor of agent calls.

    GENERATE -> (CRITIQUE -> REVISE) x rounds -> CHECK -> SCORE -> SELECT

Each phase hands all its agent calls to the executor at once (`Executor.run`), so they run concurrently: in
this process with `InProcessExecutor`, or as Ray tasks with an executor that implements the same port
elsewhere. `AgentCall` and `CallOutcome` are plain picklable dataclasses, and every call has a deterministic
`request_id` ("<deliberation>:<phase>:<round>:<agent>[:<target>]") so a retried call is recognisable.

The whole run is bounded by the task's `timeout_seconds` (status TIMEOUT, the phase named) and its
`token_budget` (checked after every phase: status FAILED); either way the partial results are kept and ranked,
with a fallback selection when any proposal exists. One agent failing is recorded in `failures` and the others
go on; all agents failing in GENERATE ends the deliberation FAILED with the first error. `run()` never raises
for LLM trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from services.common import events as ev
from services.common.errors import Unavailable
from services.common.llm import LLMError, LLMRequest, LLMResponse
from services.deliberation.checks import run_checks
from services.deliberation.domain import (
    AgentFailure,
    AgentSpec,
    CheckResult,
    Council,
    Critique,
    DeliberationResult,
    DeliberationStatus,
    Phase,
    ProgressEvent,
    Proposal,
    RankedProposal,
    Revision,
    Selection,
    Task,
    UsageRecord,
    Vote,
    rank_proposals,
)
from services.deliberation.prompts import (
    SCHEMA_CRITIQUE,
    SCHEMA_PROPOSAL,
    SCHEMA_REVISION,
    SCHEMA_SCORES,
    SCHEMA_SELECTION,
    AnswerError,
    Finalist,
    criterion_keys,
    critique_messages,
    critique_schema,
    generate_messages,
    labels,
    parse_critique,
    parse_scores,
    parse_selection,
    revise_messages,
    score_max_tokens,
    score_messages,
    score_schema,
    select_messages,
    selection_schema,
    system_prompt,
)

log = logging.getLogger("fleet.deliberation")

T = TypeVar("T")

# --- ports ------------------------------------------------------------------------------------------------------


class LLM(Protocol):
    """Raises services.common.errors.Unavailable when the server cannot be reached, LLMError for bad answers."""

    async def complete(
        self, request: LLMRequest, on_delta: Callable[[str], Awaitable[None]] | None = None
    ) -> LLMResponse: ...


ErrorKind = Literal["unavailable", "llm", "timeout", "cancelled", "error"]


@dataclass(frozen=True)
class AgentCall:
    request_id: str
    deliberation_id: str
    agent_id: str
    phase: Phase
    request: LLMRequest


@dataclass(frozen=True)
class CallOutcome:
    call: AgentCall
    response: LLMResponse | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def ok(self) -> bool:
        return self.response is not None and self.error is None


class Executor(Protocol):
    """Runs the calls concurrently; one outcome per call, in the same order; never raises for a failed call."""

    async def run(self, calls: Sequence[AgentCall]) -> list[CallOutcome]: ...


def call_id(deliberation_id: str, phase: Phase, round_: int, agent_id: str, target: str | None = None) -> str:
    base = f"{deliberation_id}:{phase}:{round_}:{agent_id}"
    return f"{base}:{target}" if target else base


def describe_error(exc: BaseException, timeout: float | None = None) -> tuple[str, ErrorKind]:
    """A failed call's message and kind (shared by every executor)."""
    if isinstance(exc, Unavailable):
        return f"LLM unavailable: {exc.message}", "unavailable"
    if isinstance(exc, LLMError):
        return f"LLM error: {exc.message}", "llm"
    if isinstance(exc, TimeoutError):
        return (f"timed out after {timeout:g}s" if timeout else "timed out"), "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", "cancelled"
    return f"{type(exc).__name__}: {exc}", "error"


class InProcessExecutor:
    """Agent calls as asyncio tasks on this event loop, each bounded by `per_call_timeout` (None: unbounded)."""

    name = "in-process"

    def __init__(self, llm: LLM, per_call_timeout: float | None = None) -> None:
        self.llm = llm
        self.per_call_timeout = per_call_timeout

    async def run(self, calls: Sequence[AgentCall]) -> list[CallOutcome]:
        return list(await asyncio.gather(*(self._one(c) for c in calls)))

    async def _one(self, call: AgentCall) -> CallOutcome:
        try:
            async with asyncio.timeout(self.per_call_timeout):
                response = await self.llm.complete(call.request)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller is being cancelled (e.g. the deliberation's deadline): let it through
            message, kind = describe_error(e)
            return CallOutcome(call, None, message, kind)
        except Exception as e:
            message, kind = describe_error(e, self.per_call_timeout)
            return CallOutcome(call, None, message, kind)
        return CallOutcome(call, response)


class ObservedExecutor:
    """Wraps an executor and publishes every call as events: agent.request dispatched, then the response
    completed or failed. Publishing trouble is logged, never passed on to the deliberation."""

    def __init__(
        self,
        inner: Executor,
        publish: Callable[[ev.Payload], Awaitable[None]],
        *,
        executor_name: str = "",
        publish_timeout: float = 5.0,
    ) -> None:
        self.inner = inner
        self.publish = publish
        self.executor_name = executor_name
        self.publish_timeout = publish_timeout

    async def run(self, calls: Sequence[AgentCall]) -> list[CallOutcome]:
        await self._publish_all(self._dispatched_event, calls)
        outcomes = await self.inner.run(calls)
        await self._publish_all(self._outcome_event, outcomes)
        return outcomes

    def _dispatched_event(self, c: AgentCall) -> ev.Payload:
        return ev.AgentRequestDispatched(
            request_id=c.request_id,
            deliberation_id=c.deliberation_id,
            agent_id=c.agent_id,
            phase=str(c.phase),
            executor=self.executor_name,
        )

    @staticmethod
    def _outcome_event(o: CallOutcome) -> ev.Payload:
        c = o.call
        if o.ok:
            assert o.response is not None
            return ev.AgentResponseCompleted(
                request_id=c.request_id,
                deliberation_id=c.deliberation_id,
                agent_id=c.agent_id,
                phase=str(c.phase),
                content=o.response.content,
                prompt_tokens=o.response.usage.prompt_tokens,
                completion_tokens=o.response.usage.completion_tokens,
                latency_ms=o.response.latency_ms,
            )
        return ev.AgentResponseFailed(
            request_id=c.request_id,
            deliberation_id=c.deliberation_id,
            agent_id=c.agent_id,
            phase=str(c.phase),
            error=o.error or "no response",
            error_kind=o.error_kind or "error",
        )

    async def _publish_all(self, build: Callable[[Any], ev.Payload], items: Sequence[Any]) -> None:
        await asyncio.gather(*(self._publish_one(build, item) for item in items))

    async def _publish_one(self, build: Callable[[Any], ev.Payload], item: Any) -> None:
        try:
            payload = build(item)  # may refuse an id that does not fit the catalog's pattern
            async with asyncio.timeout(self.publish_timeout):
                await self.publish(payload)
        except Exception as e:
            log.warning("could not publish an agent event: %s: %s", type(e).__name__, e)


# --- the engine -------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a deliberation early as FAILED (budget exceeded, nobody proposed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Run:
    """The mutable state of one run (the result is built from it at the end)."""

    task: Task
    council: Council
    architect: AgentSpec | None
    deliberation_id: str
    system: str
    keys: list[str]
    phase: Phase | None = None
    proposals: dict[str, Proposal] = field(default_factory=dict)  # author id -> proposal, council order
    critiques: list[Critique] = field(default_factory=list)
    checks: dict[str, tuple[CheckResult, ...]] = field(default_factory=dict)  # proposal id -> checks
    votes: list[Vote] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    failures: list[AgentFailure] = field(default_factory=list)
    durations: dict[Phase, float] = field(default_factory=dict)
    ranked: list[RankedProposal] = field(default_factory=list)
    selection: Selection | None = None

    @property
    def agents(self) -> tuple[AgentSpec, ...]:
        return self.council.agents

    @property
    def tokens(self) -> int:
        return sum(u.total_tokens for u in self.usage)

    def request(self, agent: AgentSpec, request_id: str, messages: Any, schema_name: str, **kw: Any) -> LLMRequest:
        return LLMRequest(
            messages=messages,
            request_id=request_id,
            temperature=agent.temperature,
            seed=agent.seed,
            max_tokens=kw.pop("max_tokens", self.task.constraints.max_tokens),
            schema_name=schema_name,
            enable_thinking=False,
            **kw,
        )


@dataclass
class _Note:
    """What a phase reports when it ends (its progress event's detail)."""

    detail: str = ""


class DeliberationEngine:
    """Runs one deliberation of a task by a council; see the module docstring for the phases and the bounds."""

    FALLBACK_BY = "engine"

    def __init__(
        self,
        executor: Executor,
        on_progress: Callable[[ProgressEvent], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor
        self.on_progress = on_progress
        self.clock = clock

    async def run(
        self, task: Task, council: Council, architect: AgentSpec | None, deliberation_id: str
    ) -> DeliberationResult:
        started_at, t0 = datetime.now(UTC), self.clock()
        r = _Run(
            task, council, architect, deliberation_id, system_prompt(task), criterion_keys(task.constraints.rubric)
        )
        timeout = task.constraints.timeout_seconds
        status, error = DeliberationStatus.COMPLETED, ""
        await self._emit(r, None, "deliberation_started", detail=f"{len(council.agents)} agents, deadline {timeout:g}s")
        try:
            if not council.agents:
                raise _Stop(f"council {council.council_id} has no agents")
            async with asyncio.timeout(timeout) as deadline:
                await self._deliberate(r)
        except TimeoutError:
            if not deadline.expired():
                raise
            status = DeliberationStatus.TIMEOUT
            error = f"deadline of {timeout:g}s exceeded during the {r.phase or 'first'} phase"
        except _Stop as stop:
            status, error = DeliberationStatus.FAILED, stop.reason
        if status != DeliberationStatus.COMPLETED and r.proposals:
            r.ranked = self._rank(r)  # whatever is known: checks and votes of the phases that finished
            if r.selection is None:
                r.selection = self._fallback(r, f"the deliberation stopped early ({error})")
        result = DeliberationResult(
            deliberation_id=deliberation_id,
            task_id=task.task_id,
            role=task.role,
            council_id=council.council_id,
            status=status,
            error_message=error,
            results=tuple(r.ranked),
            critiques=tuple(r.critiques),
            selection=r.selection,
            winner_id=r.selection.winner_id if r.selection else "",
            usage=_merge_usage(r.usage),
            phase_durations_ms={p: round(r.durations[p], 3) for p in Phase if p in r.durations},
            failures=tuple(r.failures),
            started_at=started_at,
            finished_at=datetime.now(UTC),
            duration_ms=round((self.clock() - t0) * 1000, 3),
            context_version=task.context_version,
            story_id=task.story_id,
        )
        outcome = f"{status}: {error}" if error else f"{status}: winner {result.winner_id or '-'}"
        await self._emit(r, None, "deliberation_completed", detail=outcome)
        return result

    # -- the phases

    async def _deliberate(self, r: _Run) -> None:
        await self._generate(r)
        for round_ in range(1, r.task.constraints.rounds + 1):
            await self._review(r, round_)
        # The checks call no LLM and peers score without them: they run while the peers score (the ARCHITECT's
        # selection is the first to need them), so they stay off the deliberation's critical path.
        checking = asyncio.ensure_future(self._check(r))
        try:
            no_judgement = await self._score(r)
        except BaseException:
            checking.cancel()
            with contextlib.suppress(BaseException):
                await checking
            raise
        await checking
        if no_judgement:  # the LLM went away: a ranking on checks alone is no deliberation
            raise _Stop(no_judgement)
        r.ranked = self._rank(r)
        await self._select(r)

    async def _generate(self, r: _Run) -> None:
        async with self._phase(r, Phase.GENERATE) as note:
            calls = []
            for a in r.agents:
                rid = call_id(r.deliberation_id, Phase.GENERATE, 0, a.agent_id)
                messages = generate_messages(r.system, r.task, a)
                calls.append(self._call(r, a, Phase.GENERATE, rid, r.request(a, rid, messages, SCHEMA_PROPOSAL)))
            for call, content in await self._fan_out(r, Phase.GENERATE, calls, lambda _, text: _free_text(text)):
                r.proposals[call.agent_id] = Proposal(
                    proposal_id=f"{r.deliberation_id}:{call.agent_id}",
                    author_id=call.agent_id,
                    author_role=r.task.role,
                    content=content,
                    revisions=(Revision(0, content, "original proposal"),),
                )
            note.detail = f"{len(r.proposals)}/{len(r.agents)} agents proposed"
        if not r.proposals:
            first = r.failures[0].error if r.failures else "no answer"
            raise _Stop(f"all {len(r.agents)} agents failed in GENERATE: {first}")

    async def _review(self, r: _Run, round_: int) -> None:
        """One round of peer review: critic of the proposal of council member i is member (i + offset) % n,
        offset = 1, 2, ... n-1 cycling by round, so a critic is never the author and rounds change critics."""
        n = len(r.agents)
        if n < 2:
            async with self._phase(r, Phase.CRITIQUE) as note:
                note.detail = "skipped: a council of one agent has no peer to review its proposal"
            return
        offset = (round_ - 1) % (n - 1) + 1
        targets: dict[str, tuple[AgentSpec, Proposal]] = {}  # request id -> (critic, proposal)
        calls = []
        for i, author in enumerate(r.agents):
            proposal = r.proposals.get(author.agent_id)
            if proposal is None:
                continue
            critic = r.agents[(i + offset) % n]
            rid = call_id(r.deliberation_id, Phase.CRITIQUE, round_, critic.agent_id, author.agent_id)
            messages = critique_messages(r.system, critic, proposal.content)
            request = r.request(critic, rid, messages, SCHEMA_CRITIQUE, json_schema=critique_schema())
            calls.append(self._call(r, critic, Phase.CRITIQUE, rid, request))
            targets[rid] = (critic, proposal)
        async with self._phase(r, Phase.CRITIQUE) as note:
            answered = await self._fan_out(r, Phase.CRITIQUE, calls, lambda _, text: parse_critique(text))
            new: list[Critique] = []
            for call, answer in answered:
                critic, proposal = targets[call.request_id]
                new.append(
                    Critique(
                        round=round_,
                        proposal_id=proposal.proposal_id,
                        critic_id=critic.agent_id,
                        author_id=proposal.author_id,
                        verdict=answer.verdict,  # type: ignore[arg-type]
                        summary=answer.summary,
                        issues=answer.issues,
                    )
                )
            r.critiques.extend(new)
            note.detail = f"round {round_}: {len(new)}/{len(calls)} proposals reviewed"
        await self._revise(r, round_, new)

    async def _revise(self, r: _Run, round_: int, critiques: list[Critique]) -> None:
        agents = {a.agent_id: a for a in r.agents}
        calls, by_request = [], {}
        for c in critiques:
            author, proposal = agents[c.author_id], r.proposals[c.author_id]
            rid = call_id(r.deliberation_id, Phase.REVISE, round_, author.agent_id)
            messages = revise_messages(r.system, r.task, author, proposal.content, c.verdict, c.summary, c.issues)
            calls.append(self._call(r, author, Phase.REVISE, rid, r.request(author, rid, messages, SCHEMA_REVISION)))
            by_request[rid] = c
        async with self._phase(r, Phase.REVISE) as note:
            revised = await self._fan_out(r, Phase.REVISE, calls, lambda _, text: _free_text(text))
            for call, content in revised:
                c = by_request[call.request_id]
                p = r.proposals[c.author_id]
                reason = f"round {round_}: {c.critic_id} said {c.verdict}: {c.summary}"
                r.proposals[c.author_id] = Proposal(
                    p.proposal_id,
                    p.author_id,
                    p.author_role,
                    content,
                    (*p.revisions, Revision(len(p.revisions), content, reason)),
                )
            note.detail = f"round {round_}: {len(revised)}/{len(calls)} proposals revised"

    async def _check(self, r: _Run) -> None:
        async with self._phase(r, Phase.CHECK) as note:
            proposals = list(r.proposals.values())
            requirements = r.task.constraints.requirements
            results = await asyncio.gather(*(asyncio.to_thread(run_checks, p.content, requirements) for p in proposals))
            for p, checks in zip(proposals, results, strict=True):
                r.checks[p.proposal_id] = tuple(checks)
                applicable = [c for c in checks if c.applicable]
                passed = sum(c.passed for c in applicable)
                await self._emit(
                    r, Phase.CHECK, "agent_completed", p.author_id, f"{passed}/{len(applicable)} checks passed"
                )
            note.detail = f"checked {len(proposals)} proposals"

    async def _score(self, r: _Run) -> str:
        """Each agent scores every proposal but its own, in one call. Voter i sees the proposals in council order
        rotated to start after itself (author k at position (k - i - 1) mod n), so when every agent proposed,
        each proposal is shown once in every position; labels (A, B, ...) follow the position, not the author.
        Returns why, when the LLM answered none of the scoring calls (it is down: no peer judgement at all), else
        "". Answers that came back unusable are the voters' failures: the ranking then rests on what is known."""
        n = len(r.agents)
        order = {a.agent_id: i for i, a in enumerate(r.agents)}
        rubric = r.task.constraints.rubric
        calls, shown = [], {}
        for i, voter in enumerate(r.agents):
            candidates = sorted(
                (p for p in r.proposals.values() if p.author_id != voter.agent_id),
                key=lambda p, i=i: (order[p.author_id] - i - 1) % n,
            )
            if not candidates:
                continue
            labs = labels(len(candidates))
            rid = call_id(r.deliberation_id, Phase.SCORE, 0, voter.agent_id)
            messages = score_messages(
                r.system, voter, [(lab, p.content) for lab, p in zip(labs, candidates, strict=True)], rubric
            )
            max_tokens = max(r.task.constraints.max_tokens, score_max_tokens(len(candidates), r.keys))
            request = r.request(
                voter, rid, messages, SCHEMA_SCORES, json_schema=score_schema(labs, r.keys), max_tokens=max_tokens
            )
            calls.append(self._call(r, voter, Phase.SCORE, rid, request))
            shown[rid] = dict(zip(labs, candidates, strict=True))
        async with self._phase(r, Phase.SCORE) as note:
            if not calls:
                note.detail = "skipped: no agent has a peer's proposal to score"
                return ""
            failures_before = len(r.failures)
            names = dict(zip(r.keys, (c.name for c in rubric), strict=True))
            answered = await self._fan_out(
                r, Phase.SCORE, calls, lambda call, text: parse_scores(text, list(shown[call.request_id]), r.keys)
            )
            for call, answers in answered:
                labs = list(shown[call.request_id])
                for a in answers:
                    r.votes.append(
                        Vote(
                            voter_id=call.agent_id,
                            proposal_id=shown[call.request_id][a.label].proposal_id,
                            position=labs.index(a.label) + 1,
                            scores={names[k]: v for k, v in a.scores.items()},
                            reason=a.reason,
                        )
                    )
            note.detail = f"{len(answered)}/{len(calls)} agents voted, {len(r.votes)} votes"
        if answered or any(u.phase == Phase.SCORE for u in r.usage):  # usage is recorded for every LLM answer
            return ""
        first = r.failures[failures_before].error if len(r.failures) > failures_before else "no answer"
        return f"no peer judgement: all {len(calls)} agents failed in SCORE: {first}"

    async def _select(self, r: _Run) -> None:
        async with self._phase(r, Phase.SELECT) as note:
            top = r.ranked[: r.task.constraints.top_k]
            architect = r.architect
            if architect is None:
                r.selection = self._fallback(r, "no ARCHITECT agent was available")
            elif len(top) == 1:
                r.selection = self._fallback(r, "only one proposal reached the final")
            else:
                labs = labels(len(top))
                finalists = [_finalist(lab, rp) for lab, rp in zip(labs, top, strict=True)]
                rid = call_id(r.deliberation_id, Phase.SELECT, 0, architect.agent_id)
                messages = select_messages(r.system, architect, finalists)
                request = r.request(architect, rid, messages, SCHEMA_SELECTION, json_schema=selection_schema(labs))
                call = self._call(r, architect, Phase.SELECT, rid, request)
                failures_before = len(r.failures)
                answered = await self._fan_out(r, Phase.SELECT, [call], lambda _, text: parse_selection(text, labs))
                if answered:
                    answer = answered[0][1]
                    winner = top[labs.index(answer.label)]
                    r.selection = Selection(
                        winner_id=winner.proposal.author_id,
                        method="ARCHITECT",
                        rationale=answer.rationale,
                        selected_by=architect.agent_id,
                    )
                else:
                    why = r.failures[-1].error if len(r.failures) > failures_before else "no answer"
                    r.selection = self._fallback(r, f"the architect {architect.agent_id} failed: {why}")
            note.detail = f"{r.selection.method}: {r.selection.winner_id}"

    # -- helpers

    def _rank(self, r: _Run) -> list[RankedProposal]:
        return rank_proposals(list(r.proposals.values()), r.checks, r.votes)

    def _fallback(self, r: _Run, why: str) -> Selection:
        """Deterministic: the best combined score, then the fewest check findings, then the author id
        (the ranking's order)."""
        best = r.ranked[0]
        return Selection(
            winner_id=best.proposal.author_id,
            method="FALLBACK",
            rationale=(
                f"Fallback selection because {why}. Chose {best.proposal.author_id}: the best combined score "
                f"({best.score:.2f}/10, {best.finding_count} check findings); ties go to fewer check findings, "
                "then the author id."
            ),
            selected_by=self.FALLBACK_BY,
        )

    @staticmethod
    def _call(r: _Run, agent: AgentSpec, phase: Phase, request_id: str, request: LLMRequest) -> AgentCall:
        return AgentCall(request_id, r.deliberation_id, agent.agent_id, phase, request)

    async def _fan_out(
        self, r: _Run, phase: Phase, calls: list[AgentCall], parse: Callable[[AgentCall, str], T]
    ) -> list[tuple[AgentCall, T]]:
        """One executor.run for the phase; usage recorded; failures and unusable answers recorded per agent."""
        if not calls:
            return []
        outcomes = await self.executor.run(calls)
        if len(outcomes) != len(calls):
            raise RuntimeError(f"executor returned {len(outcomes)} outcomes for {len(calls)} calls")
        done: list[tuple[AgentCall, T]] = []
        for call, outcome in zip(calls, outcomes, strict=True):
            response = outcome.response
            if response is not None:
                usage = response.usage
                r.usage.append(UsageRecord(call.agent_id, phase, usage.prompt_tokens, usage.completion_tokens))
            if response is None or outcome.error is not None:
                await self._fail(r, phase, call.agent_id, outcome.error or "no response")
                continue
            try:
                value = parse(call, response.content)
            except AnswerError as e:
                cut = " (cut at max_tokens)" if response.finish_reason == "length" else ""
                await self._fail(r, phase, call.agent_id, f"unusable answer{cut}: {e}")
                continue
            done.append((call, value))
            tokens = response.usage.total_tokens
            await self._emit(r, phase, "agent_completed", call.agent_id, f"{tokens} tokens")
        return done

    async def _fail(self, r: _Run, phase: Phase, agent_id: str, error: str) -> None:
        r.failures.append(AgentFailure(agent_id, phase, error))
        log.warning("deliberation %s: %s failed in %s: %s", r.deliberation_id, agent_id, phase, error)
        await self._emit(r, phase, "agent_failed", agent_id, error)

    @contextlib.asynccontextmanager
    async def _phase(self, r: _Run, phase: Phase) -> AsyncIterator[_Note]:
        r.phase, note = phase, _Note()
        await self._emit(r, phase, "phase_started")
        start = self.clock()
        try:
            yield note
        finally:
            r.durations[phase] = r.durations.get(phase, 0.0) + (self.clock() - start) * 1000
        await self._emit(r, phase, "phase_completed", detail=note.detail)
        budget = r.task.constraints.token_budget
        if budget and r.tokens > budget:
            raise _Stop(f"token budget of {budget} exceeded after the {phase} phase ({r.tokens} tokens used)")

    async def _emit(
        self, r: _Run, phase: Phase | None, kind: Any, agent_id: str | None = None, detail: str = ""
    ) -> None:
        if self.on_progress is None:
            return
        event = ProgressEvent(r.deliberation_id, r.task.task_id, r.task.role, phase, kind, agent_id, detail)
        try:
            await self.on_progress(event)
        except Exception:
            log.exception("progress callback failed for %s", r.deliberation_id)


def _free_text(text: str) -> str:
    content = text.strip()
    if not content:
        raise AnswerError("empty answer")
    return content


def _finalist(label: str, rp: RankedProposal) -> Finalist:
    applicable = [c for c in rp.checks if c.applicable]
    return Finalist(
        label=label,
        content=rp.proposal.content,
        score=rp.score,
        peer_score=rp.peer_score,
        checks_passed=sum(c.passed for c in applicable),
        checks_applicable=len(applicable),
        failed_checks=tuple(c.name for c in applicable if not c.passed),
    )


def _merge_usage(records: list[UsageRecord]) -> tuple[UsageRecord, ...]:
    """One record per (agent, phase), in order of first use."""
    merged: dict[tuple[str, Phase], UsageRecord] = {}
    for u in records:
        key = (u.agent_id, u.phase)
        if key in merged:
            m = merged[key]
            merged[key] = UsageRecord(
                u.agent_id, u.phase, m.prompt_tokens + u.prompt_tokens, m.completion_tokens + u.completion_tokens
            )
        else:
            merged[key] = u
    return tuple(merged.values())
