"""The deliberation engine over three ports: an LLM, an executor of agent calls, a checker.

    GENERATE -> (CHECK -> CRITIQUE -> REVISE) x rounds -> CHECK, while the peers SCORE -> SELECT

Each phase hands all its agent calls to the executor at once (`Executor.run`), so they run concurrently: in
this process with `InProcessExecutor`, or as Ray tasks with an executor that implements the same port
elsewhere. `AgentCall` and `CallOutcome` are plain picklable dataclasses, and every call has a deterministic
`request_id` ("<deliberation>:<phase>:<round>:<agent>[:<target>]") so a retried call is recognisable.

Grounding: every revision is checked (`Checker`: static checks, and for code tasks the code executed against the
task's tests and its own in the sandbox) before its critic reviews it, and the critic and the author are shown
what the checks found (failing tests with their assertions). The checks gate the finals: a proposal that fails a
gating check is no finalist while another passes them all; when none does, the best candidate still wins but the
result is not `verified` and says why. The architect never judges a deliberation it wrote a proposal in.

Every prompt fits the served model's context window when the engine is given it (`window`): the prompts module
cuts the material a prompt carries (context, proposals, findings, critiques) with a visible marker, never the task,
its tests or the rubric; the shared system prompt's context is cut once per deliberation to half of what the
GENERATE prompt leaves, so the council still shares one prefix, and further only for a call that cannot fit
otherwise. A call whose prompt cannot fit even cut is never sent: its agent fails with a `ContextOverflow`
("prompt too long: ..." naming the phase and the numbers, kind "overflow"), and for SELECT the fallback decides.

The whole run is bounded by the task's `timeout_seconds` (status TIMEOUT, the phase named) and its `token_budget`
(a phase whose projected tokens would not fit is not started: status FAILED; for SELECT the fallback decides
instead); either way the partial results are kept and ranked, with a fallback selection when any proposal exists.
One agent failing (an error, an unusable answer, a revision cut at max_tokens) is recorded in `failures` and the
others go on (an original proposal cut at max_tokens is kept, failing the gating check `complete`); all agents
failing in GENERATE ends the deliberation FAILED with the first error. `run()` never raises for LLM trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from services.common import events as ev
from services.common.errors import Unavailable
from services.deliberation.domain import (
    AgentFailure,
    AgentSpec,
    CheckResult,
    Council,
    Critique,
    DeliberationResult,
    DeliberationStatus,
    Finding,
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
    verification,
)
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import ChatMessage, ContextOverflow, ContextWindow, LLMError, LLMRequest, LLMResponse
from services.deliberation.prompts import (
    SCHEMA_CRITIQUE,
    SCHEMA_PROPOSAL,
    SCHEMA_REVISION,
    SCHEMA_SCORES,
    SCHEMA_SELECTION,
    AnswerError,
    Finalist,
    checks_summary,
    criterion_keys,
    critique_messages,
    critique_schema,
    fit_prompt,
    generate_messages,
    labels,
    parse_critique,
    parse_scores,
    parse_selection,
    review_text,
    revise_messages,
    score_max_tokens,
    score_messages,
    score_schema,
    select_messages,
    selection_schema,
    stop_sequences,
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


ErrorKind = Literal["unavailable", "llm", "overflow", "timeout", "cancelled", "error"]


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
    if isinstance(exc, ContextOverflow):
        return f"prompt too long: {exc.message}", "overflow"
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


class Checker(Protocol):
    """Checks one proposal of a task (grounding.ProposalChecker: static checks, and the code executed in the
    sandbox). Never raises for what it finds: every finding is a CheckResult."""

    async def check(self, task: Task, content: str) -> tuple[CheckResult, ...]: ...


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
    checks: dict[str, tuple[CheckResult, ...]] = field(default_factory=dict)  # proposal id -> its latest checks
    votes: list[Vote] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    failures: list[AgentFailure] = field(default_factory=list)
    durations: dict[Phase, float] = field(default_factory=dict)
    ranked: list[RankedProposal] = field(default_factory=list)
    selection: Selection | None = None
    notes: list[str] = field(default_factory=list)
    cut: set[str] = field(default_factory=set)  # proposal ids whose original was cut at max_tokens
    window: ContextWindow | None = None  # the served model's context window (None: prompts are not budgeted)
    trimmed: dict[Phase, int] = field(default_factory=dict)  # tokens of material cut to fit the window, per phase

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

    def fit(
        self,
        phase: Phase,
        agent_id: str,
        max_tokens: int,
        build: Callable[[str, list[str]], tuple[ChatMessage, ...]],
        texts: Sequence[str] = (),
    ) -> tuple[ChatMessage, ...]:
        """`build(system, texts)`, fitted to the model's window (as built when the window is unknown): the texts are
        cut beside the shared system prompt; when that is not enough, the context is cut too, for this call only.
        Raises ContextOverflow."""
        if self.window is None:
            return build(self.system, list(texts))
        what = f"the {phase} prompt of {agent_id}"
        try:
            fitted = fit_prompt(lambda t: build(self.system, t), texts, self.window, max_tokens, what)
        except ContextOverflow:
            if not self.task.context.strip():
                raise
            fitted = fit_prompt(
                lambda t: build(system_prompt(self.task, t[0]), t[1:]),
                [self.task.context, *texts],
                self.window,
                max_tokens,
                what,
            )
        if fitted.trimmed:
            self.trimmed[phase] = self.trimmed.get(phase, 0) + fitted.trimmed
        return fitted.messages

    def checks_of(self, proposal: Proposal) -> tuple[CheckResult, ...]:
        """The checks of the proposal's latest revision ((): not checked yet)."""
        return proposal.revisions[-1].checks if proposal.revisions else ()


@dataclass
class _Note:
    """What a phase reports when it ends (its progress event's detail)."""

    detail: str = ""


def projected_tokens(calls: Sequence[AgentCall]) -> int:
    """A phase's tokens at most, before it runs: each prompt estimated at 3 characters a token (generous for
    English and code, which average 3.5-4), each completion at its max_tokens."""
    return sum(
        sum(len(m.content) for m in c.request.messages) // 3 + 4 * len(c.request.messages) + c.request.max_tokens
        for c in calls
    )


def score_answer_tokens(task: Task, n_candidates: int, keys: Sequence[str], window: ContextWindow | None) -> int:
    """max_tokens of a SCORE call: room for the longest answer its schema allows (characters counted as tokens:
    generous), at most half a known window, at least the task's max_tokens."""
    room = score_max_tokens(n_candidates, keys)
    if window is not None:
        room = min(room, window.tokens // 2)
    return max(task.constraints.max_tokens, room)


def shared_system(task: Task, agents: Sequence[AgentSpec], window: ContextWindow | None) -> str:
    """The system prompt every call of the deliberation shares: with a known window, its context cut to half of
    what the GENERATE prompt (the longest persona's) leaves beside the task, its tests and the longest answer of
    any phase (SCORE's, usually), so the later phases' material has the other half. When even that cannot fit, it
    stays whole: each call then cuts or refuses on its own, naming the numbers."""
    system = system_prompt(task)
    if window is None or not task.context.strip() or not agents:
        return system
    agent = max(agents, key=lambda a: len(a.agent_id) + len(a.persona))
    keys = criterion_keys(task.constraints.rubric)
    max_tokens = max(task.constraints.max_tokens, score_answer_tokens(task, len(agents) - 1, keys, window))
    fixed = window.prompt_tokens(generate_messages(system_prompt(task, ""), task, agent))
    room = window.prompt_budget(max_tokens) - fixed
    if room <= 0:
        return system
    try:
        fitted = fit_prompt(
            lambda t: generate_messages(system_prompt(task, t[0]), task, agent),
            [task.context],
            window,
            max_tokens + room - room // 2,  # what the context may not take
        )
    except ContextOverflow:
        return system
    return fitted.messages[0].content


class DeliberationEngine:
    """Runs one deliberation of a task by a council; see the module docstring for the phases and the bounds."""

    FALLBACK_BY = "engine"

    def __init__(
        self,
        executor: Executor,
        on_progress: Callable[[ProgressEvent], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        checker: Checker | None = None,
        window: ContextWindow | None = None,
    ) -> None:
        self.executor = executor
        self.on_progress = on_progress
        self.clock = clock
        self.checker: Checker = checker if checker is not None else ProposalChecker(None)
        self.window = window

    async def run(
        self, task: Task, council: Council, architect: AgentSpec | None, deliberation_id: str
    ) -> DeliberationResult:
        started_at, t0 = datetime.now(UTC), self.clock()
        r = _Run(
            task,
            council,
            architect,
            deliberation_id,
            shared_system(task, council.agents, self.window),
            criterion_keys(task.constraints.rubric),
            window=self.window,
        )
        timeout = task.constraints.timeout_seconds
        status, error = DeliberationStatus.COMPLETED, ""
        window = f", a {self.window.tokens:,}-token window" if self.window else ""
        await self._emit(
            r, None, "deliberation_started", detail=f"{len(council.agents)} agents, deadline {timeout:g}s{window}"
        )
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
        if r.trimmed and r.window:
            cuts = ", ".join(f"{p} {n:,}" for p, n in r.trimmed.items())
            r.notes.append(f"material cut to fit the model's {r.window.describe()}: tokens cut by phase: {cuts}")
        if status != DeliberationStatus.COMPLETED and r.proposals:
            r.ranked = self._rank(r)  # whatever is known: checks and votes of the phases that finished
            if r.selection is None:
                r.selection = self._fallback(r, f"the deliberation stopped early ({error})")
        winner_id = r.selection.winner_id if r.selection else ""
        if status == DeliberationStatus.COMPLETED:
            verified, why = verification(task, r.ranked, winner_id)
        else:
            verified, why = False, f"the deliberation ended {status} before its checks could verify a winner"
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
            winner_id=winner_id,
            usage=_merge_usage(r.usage),
            phase_durations_ms={p: round(r.durations[p], 3) for p in Phase if p in r.durations},
            failures=tuple(r.failures),
            started_at=started_at,
            finished_at=datetime.now(UTC),
            duration_ms=round((self.clock() - t0) * 1000, 3),
            context_version=task.context_version,
            story_id=task.story_id,
            verified=verified,
            verified_reason=why,
            notes=tuple(r.notes),
        )
        outcome = f"{status}: {error}" if error else f"{status}: winner {result.winner_id or '-'}"
        verdict = "verified" if verified else "not verified"
        await self._emit(r, None, "deliberation_completed", detail=f"{outcome} ({verdict}: {why})")
        return result

    # -- the phases

    async def _deliberate(self, r: _Run) -> None:
        await self._generate(r)
        for round_ in range(1, r.task.constraints.rounds + 1):
            await self._check(r)  # the critic and the author are shown what the checks found
            await self._review(r, round_)
        # The last checks call no LLM and peers score without them: they run while the peers score (the ranking
        # and the ARCHITECT's selection are the first to need them), off the deliberation's critical path.
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
        calls, refused = [], []
        max_tokens = r.task.constraints.max_tokens
        for a in r.agents:
            rid = call_id(r.deliberation_id, Phase.GENERATE, 0, a.agent_id)
            try:
                messages = r.fit(
                    Phase.GENERATE, a.agent_id, max_tokens, lambda system, _, a=a: generate_messages(system, r.task, a)
                )
            except ContextOverflow as e:
                refused.append((a.agent_id, e))
                continue
            request = r.request(a, rid, messages, SCHEMA_PROPOSAL, stop=stop_sequences(r.task))
            calls.append(self._call(r, a, Phase.GENERATE, rid, request))
        self._within_budget(r, Phase.GENERATE, calls)
        async with self._phase(r, Phase.GENERATE) as note:
            await self._refuse(r, Phase.GENERATE, refused)
            cut: set[str] = set()
            for call, content in await self._fan_out(r, Phase.GENERATE, calls, _free_text, whole=True, cut=cut):
                if call.request_id in cut:
                    r.cut.add(f"{r.deliberation_id}:{call.agent_id}")
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
        calls, refused = [], []
        for i, author in enumerate(r.agents):
            proposal = r.proposals.get(author.agent_id)
            if proposal is None:
                continue
            critic = r.agents[(i + offset) % n]
            rid = call_id(r.deliberation_id, Phase.CRITIQUE, round_, critic.agent_id, author.agent_id)
            try:
                messages = r.fit(
                    Phase.CRITIQUE,
                    critic.agent_id,
                    r.task.constraints.max_tokens,
                    lambda system, t, critic=critic: critique_messages(system, r.task, critic, t[0], findings=t[1]),
                    [proposal.content, checks_summary(r.checks_of(proposal))],
                )
            except ContextOverflow as e:
                refused.append((critic.agent_id, e))
                continue
            request = r.request(critic, rid, messages, SCHEMA_CRITIQUE, json_schema=critique_schema())
            calls.append(self._call(r, critic, Phase.CRITIQUE, rid, request))
            targets[rid] = (critic, proposal)
        self._within_budget(r, Phase.CRITIQUE, calls)
        async with self._phase(r, Phase.CRITIQUE) as note:
            await self._refuse(r, Phase.CRITIQUE, refused)
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
            note.detail = f"round {round_}: {len(new)}/{len(calls) + len(refused)} proposals reviewed"
        await self._revise(r, round_, new)

    async def _revise(self, r: _Run, round_: int, critiques: list[Critique]) -> None:
        agents = {a.agent_id: a for a in r.agents}
        calls, by_request, refused = [], {}, []
        for c in critiques:
            author, proposal = agents[c.author_id], r.proposals[c.author_id]
            rid = call_id(r.deliberation_id, Phase.REVISE, round_, author.agent_id)

            def build(
                system: str, t: list[str], author: AgentSpec = author, c: Critique = c
            ) -> tuple[ChatMessage, ...]:
                return revise_messages(
                    system, r.task, author, t[0], c.verdict, c.summary, c.issues, findings=t[1], review=t[2]
                )

            texts = [
                proposal.content,
                checks_summary(r.checks_of(proposal)),
                review_text(c.verdict, c.summary, c.issues),
            ]
            try:
                messages = r.fit(Phase.REVISE, author.agent_id, r.task.constraints.max_tokens, build, texts)
            except ContextOverflow as e:
                refused.append((author.agent_id, e))
                continue
            request = r.request(author, rid, messages, SCHEMA_REVISION, stop=stop_sequences(r.task))
            calls.append(self._call(r, author, Phase.REVISE, rid, request))
            by_request[rid] = c
        self._within_budget(r, Phase.REVISE, calls)
        async with self._phase(r, Phase.REVISE) as note:
            await self._refuse(r, Phase.REVISE, refused)
            revised = await self._fan_out(r, Phase.REVISE, calls, _free_text, whole=True)
            for call, content in revised:
                c = by_request[call.request_id]
                p = r.proposals[c.author_id]
                reason = f"round {round_}: {c.critic_id} said {c.verdict}: {c.summary}"
                r.proposals[c.author_id] = replace(
                    p, content=content, revisions=(*p.revisions, Revision(len(p.revisions), content, reason))
                )
            note.detail = f"round {round_}: {len(revised)}/{len(calls) + len(refused)} proposals revised"

    async def _check(self, r: _Run) -> None:
        """Check every proposal whose latest revision has not been checked (a failed revision keeps its checks)."""
        todo = [p for p in r.proposals.values() if not r.checks_of(p)]
        if not todo:
            return
        async with self._phase(r, Phase.CHECK) as note:
            results = await asyncio.gather(*(self.checker.check(r.task, p.content) for p in todo))
            for p, checks in zip(todo, results, strict=True):
                if p.proposal_id in r.cut and len(p.revisions) == 1:
                    checks = (_cut_check(r.task.constraints.max_tokens), *checks)
                latest = replace(p.revisions[-1], checks=tuple(checks))
                r.proposals[p.author_id] = replace(p, revisions=(*p.revisions[:-1], latest))
                r.checks[p.proposal_id] = tuple(checks)
                applicable = [c for c in checks if c.applicable]
                blocking = [c.name for c in checks if c.blocks]
                summary = f"{sum(c.passed for c in applicable)}/{len(applicable)} checks passed"
                await self._emit(
                    r,
                    Phase.CHECK,
                    "agent_completed",
                    p.author_id,
                    summary + (f"; failed {', '.join(blocking)}" if blocking else ""),
                )
            note.detail = f"checked {len(todo)} proposal{'s' * (len(todo) != 1)}"

    async def _score(self, r: _Run) -> str:
        """Each agent scores every proposal but its own, in one call. Voter i sees the proposals in council order
        rotated to start after itself (author k at position (k - i - 1) mod n), so when every agent proposed,
        each proposal is shown once in every position; labels (A, B, ...) follow the position, not the author.
        Returns why, when the LLM answered none of the scoring calls (it is down: no peer judgement at all), else
        "". Answers, or candidates' scores within them, that came back unusable are recorded as the voters'
        failures; with no usable vote at all the ranking rests on the checks, and the result notes it."""
        n = len(r.agents)
        order = {a.agent_id: i for i, a in enumerate(r.agents)}
        rubric = r.task.constraints.rubric
        calls, shown, refused = [], {}, []
        for i, voter in enumerate(r.agents):
            candidates = sorted(
                (p for p in r.proposals.values() if p.author_id != voter.agent_id),
                key=lambda p, i=i: (order[p.author_id] - i - 1) % n,
            )
            if not candidates:
                continue
            labs = labels(len(candidates))
            rid = call_id(r.deliberation_id, Phase.SCORE, 0, voter.agent_id)
            max_tokens = score_answer_tokens(r.task, len(candidates), r.keys, r.window)
            try:
                messages = r.fit(
                    Phase.SCORE,
                    voter.agent_id,
                    max_tokens,
                    lambda system, t, voter=voter, labs=labs: score_messages(
                        system, r.task, voter, list(zip(labs, t, strict=True))
                    ),
                    [p.content for p in candidates],
                )
            except ContextOverflow as e:
                refused.append((voter.agent_id, e))
                continue
            request = r.request(
                voter, rid, messages, SCHEMA_SCORES, json_schema=score_schema(labs, r.keys), max_tokens=max_tokens
            )
            calls.append(self._call(r, voter, Phase.SCORE, rid, request))
            shown[rid] = dict(zip(labs, candidates, strict=True))
        self._within_budget(r, Phase.SCORE, calls)
        async with self._phase(r, Phase.SCORE) as note:
            failures_before = len(r.failures)
            await self._refuse(r, Phase.SCORE, refused)
            if not calls and not refused:
                note.detail = "skipped: no agent has a peer's proposal to score"
                return ""
            names = dict(zip(r.keys, (c.name for c in rubric), strict=True))
            answered = await self._fan_out(
                r, Phase.SCORE, calls, lambda call, text: parse_scores(text, list(shown[call.request_id]), r.keys)
            )
            dropped = 0
            for call, (answers, problems) in answered:
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
                for label, problem in problems:  # a dropped score leaves a trace: whose, and why
                    dropped += 1
                    author = shown[call.request_id][label].author_id
                    await self._fail(r, Phase.SCORE, call.agent_id, f"unusable score for {author}: {problem}")
            note.detail = f"{len(answered)}/{len(calls) + len(refused)} agents voted, {len(r.votes)} votes" + (
                f", {dropped} candidate scores unusable" if dropped else ""
            )
        if answered or any(u.phase == Phase.SCORE for u in r.usage):  # usage is recorded for every LLM answer
            if not r.votes:
                r.notes.append("no usable peer vote: the ranking rests on the checks alone")
            return ""
        first = r.failures[failures_before].error if len(r.failures) > failures_before else "no answer"
        return f"no peer judgement: all {len(calls) + len(refused)} agents failed in SCORE: {first}"

    async def _select(self, r: _Run) -> None:
        async with self._phase(r, Phase.SELECT) as note:
            gated = [x for x in r.ranked if x.gated]
            if not gated:
                r.notes.append("no proposal passed every gating check: the best candidate won, unverified")
            top = (gated or r.ranked)[: r.task.constraints.top_k]
            architect = r.architect
            authors = {p.author_id for p in r.proposals.values()}
            if architect is None:
                r.selection = self._fallback(r, "no ARCHITECT agent was available")
            elif architect.agent_id in authors:
                r.notes.append(
                    f"the architect {architect.agent_id} wrote a proposal: it may not judge, the fallback did"
                )
                r.selection = self._fallback(r, f"the architect {architect.agent_id} is an author of a proposal")
            elif len(top) == 1:
                why = "only one proposal passed every gating check" if gated else "only one proposal reached the final"
                r.selection = self._fallback(r, why)
            else:
                labs = labels(len(top))
                finalists = [_finalist(lab, rp) for lab, rp in zip(labs, top, strict=True)]
                rid = call_id(r.deliberation_id, Phase.SELECT, 0, architect.agent_id)
                try:
                    messages = r.fit(
                        Phase.SELECT,
                        architect.agent_id,
                        r.task.constraints.max_tokens,
                        lambda system, t: select_messages(
                            system,
                            r.task,
                            architect,
                            [replace(f, content=text) for f, text in zip(finalists, t, strict=True)],
                        ),
                        [f.content for f in finalists],
                    )
                except ContextOverflow as e:
                    await self._refuse(r, Phase.SELECT, [(architect.agent_id, e)])
                    messages = ()
                request = r.request(architect, rid, messages, SCHEMA_SELECTION, json_schema=selection_schema(labs))
                call = self._call(r, architect, Phase.SELECT, rid, request)
                budget = r.task.constraints.token_budget
                if not messages:
                    why = r.failures[-1].error
                    r.selection = self._fallback(r, f"the architect {architect.agent_id} could not be asked: {why}")
                elif budget and r.tokens + projected_tokens([call]) > budget:
                    r.notes.append(f"the token budget of {budget} left no room for the architect's selection")
                    r.selection = self._fallback(r, "the token budget left no room for the architect's call")
                else:
                    failures_before = len(r.failures)
                    answered = await self._fan_out(r, Phase.SELECT, [call], lambda _, t: parse_selection(t, labs))
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
        """Deterministic: the ranking's first (gating checks passed, then the best combined score, then the fewest
        error findings, then the author id)."""
        best = r.ranked[0]
        return Selection(
            winner_id=best.proposal.author_id,
            method="FALLBACK",
            rationale=(
                f"Fallback selection because {why}. Chose {best.proposal.author_id}: "
                + ("it passed every gating check and had " if best.gated else "")
                + f"the best combined score ({best.score:.2f}/10, {best.error_count} error findings); ties go to "
                "fewer error findings, then the author id."
            ),
            selected_by=self.FALLBACK_BY,
        )

    @staticmethod
    def _within_budget(r: _Run, phase: Phase, calls: list[AgentCall]) -> None:
        """Before a phase is dispatched: its projected tokens must fit in what is left of the budget."""
        budget = r.task.constraints.token_budget
        if not budget or not calls:
            return
        projected = projected_tokens(calls)
        if r.tokens + projected > budget:
            r.phase = phase
            raise _Stop(
                f"token budget of {budget} would be exceeded by the {phase} phase ({r.tokens} tokens used, "
                f"{projected} projected): not started"
            )

    @staticmethod
    def _call(r: _Run, agent: AgentSpec, phase: Phase, request_id: str, request: LLMRequest) -> AgentCall:
        return AgentCall(request_id, r.deliberation_id, agent.agent_id, phase, request)

    async def _fan_out(
        self,
        r: _Run,
        phase: Phase,
        calls: list[AgentCall],
        parse: Callable[..., T],
        *,
        whole: bool = False,
        cut: set[str] | None = None,
    ) -> list[tuple[AgentCall, T]]:
        """One executor.run for the phase; usage recorded; failures and unusable answers recorded per agent.
        `whole`: an answer cut at max_tokens is a failure (a revision cut mid-code is broken: the previous revision
        stands) unless `cut` is given, which collects the request ids of such answers instead (an original proposal
        has no previous revision: it is kept, and a failing gating check says it was cut). `parse` takes
        (call, text) or, for free text, (text,)."""
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
            was_cut = response.finish_reason == "length"
            if whole and was_cut:
                if cut is None:
                    stands = " (the previous revision stands)" if phase == Phase.REVISE else ""
                    await self._fail(
                        r, phase, call.agent_id, f"answer cut at max_tokens ({call.request.max_tokens}){stands}"
                    )
                    continue
                cut.add(call.request_id)
            try:
                value = parse(response.content) if whole else parse(call, response.content)
            except AnswerError as e:
                await self._fail(r, phase, call.agent_id, f"unusable answer{' (cut at max_tokens)' * was_cut}: {e}")
                continue
            done.append((call, value))
            usage = response.usage
            await self._emit(
                r, phase, "agent_completed", call.agent_id, f"{usage.total_tokens} tokens", usage.completion_tokens
            )
        return done

    async def _refuse(self, r: _Run, phase: Phase, refused: Sequence[tuple[str, ContextOverflow]]) -> None:
        """Calls whose prompt cannot fit the model's window, even cut: never sent, their agents failed."""
        for agent_id, overflow in refused:
            await self._fail(r, phase, agent_id, describe_error(overflow)[0])

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

    async def _emit(
        self,
        r: _Run,
        phase: Phase | None,
        kind: Any,
        agent_id: str | None = None,
        detail: str = "",
        completion_tokens: int = 0,
    ) -> None:
        if self.on_progress is None:
            return
        event = ProgressEvent(
            r.deliberation_id, r.task.task_id, r.task.role, phase, kind, agent_id, detail, completion_tokens
        )
        try:
            await self.on_progress(event)
        except Exception:
            log.exception("progress callback failed for %s", r.deliberation_id)


def _cut_check(max_tokens: int) -> CheckResult:
    return CheckResult(
        "complete",
        False,
        True,
        (Finding(f"the answer was cut at max_tokens ({max_tokens}): it is probably incomplete"),),
        "finish_reason of the answer",
    )


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
