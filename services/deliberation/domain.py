"""The deliberation's vocabulary: councils, tasks, proposals, critiques, checks, votes, results. No I/O.

Everything is a frozen dataclass; `dump`/`load` (pydantic's TypeAdapter over the dataclasses) turn any of them
into JSON-ready dicts and back, so a `DeliberationResult` persists in Valkey without per-class mappers.

`Role` and `DeliberationStatus` are the shared kernel's (services.common.events): one spelling everywhere.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter

from services.common import events as ev
from services.common.errors import InvalidArgument
from services.common.events import DeliberationStatus, Role
from services.common.execution import test_source_problem

__all__ = [
    "AgentFailure",
    "AgentSpec",
    "CheckResult",
    "Council",
    "Criterion",
    "Critique",
    "DeliberationResult",
    "DeliberationStatus",
    "Finding",
    "Phase",
    "ProgressEvent",
    "Proposal",
    "RankedProposal",
    "Revision",
    "Role",
    "Selection",
    "Task",
    "TaskConstraints",
    "UsageRecord",
    "Vote",
    "default_rubric",
    "dump",
    "load",
    "make_council",
    "rank_proposals",
]


class Phase(StrEnum):
    GENERATE = "GENERATE"
    CRITIQUE = "CRITIQUE"
    REVISE = "REVISE"
    CHECK = "CHECK"
    SCORE = "SCORE"
    SELECT = "SELECT"


# --- councils ---------------------------------------------------------------------------------------------------

MAX_AGENTS = 10
TEMPERATURES = (0.2, 0.4, 0.6)  # measured with SmolLM2-135M: at 1.0 half of the answers did not parse

# What each agent of a council emphasises, on purpose different: copies of one small model otherwise conform.
PERSONAS: dict[Role, tuple[str, ...]] = {
    Role.DEV: (
        "Correctness first: handle edge cases and invalid input explicitly, state invariants, and prove them with tests.",
        "Simplicity first: the smallest readable solution that works; no speculative abstraction, no new dependency.",
        "Performance-minded: mind complexity, memory and I/O; avoid needless work, but never at the cost of clarity.",
        "Test-driven: start from the tests that pin the behaviour down, including the unhappy paths.",
        "Security-minded: validate inputs at the boundary, never log or hard-code secrets, fail closed.",
    ),
    Role.QA: (
        "Edge-case hunter: boundaries, empty and huge inputs, concurrency, failure injection.",
        "Automation first: fast, deterministic automated tests that run in CI; no manual steps.",
        "Risk-based: test what is most likely to break and most costly when it does, first.",
        "The user's advocate: acceptance criteria written from the user's side, observable behaviour only.",
        "Non-functional: performance, load, resilience and recovery under realistic conditions.",
    ),
    Role.ARCHITECT: (
        "Pragmatist: the simplest design that meets the requirements; defer what can be deferred.",
        "Boundaries and contracts: clear module and service interfaces, dependencies pointing inward.",
        "Failure modes and scale: what happens under load, partial failure and retries; idempotency.",
        "Evolution: reversible decisions, migration paths, backward-compatible contracts.",
        "Security and compliance: least privilege, data protection, auditability.",
    ),
    Role.DEVOPS: (
        "Security hardening: least privilege, non-root, no privileged containers, pinned image tags, no inline secrets.",
        "Reliability: probes, resource requests and limits, safe rollouts and rollbacks.",
        "Automation and GitOps: declarative, reproducible, reviewed changes; nothing done by hand.",
        "Observability: metrics, logs and alerts that tell what is wrong and where.",
        "Cost and simplicity: right-sized resources and the fewest moving parts.",
    ),
    Role.DATA: (
        "Integrity first: constraints, transactions, and validation at ingestion.",
        "Performance: indexes, query plans, batching, and the cost of scans.",
        "Privacy: minimise personal data, mask or encrypt it, define retention.",
        "Robust pipelines: idempotent, restartable jobs with backfills and data-quality checks.",
        "Schema evolution: backward-compatible migrations and versioned contracts.",
    ),
}


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    role: Role
    persona: str
    temperature: float = 0.7
    seed: int | None = None


@dataclass(frozen=True)
class Council:
    council_id: str
    role: Role
    agents: tuple[AgentSpec, ...]


def make_council(role: Role | str, num_agents: int = 3) -> Council:
    """A council of `num_agents` (1..10) agents with distinct personas, spread temperatures and fixed seeds.

    Ids: `council-dev`, `agent-dev-001`, ... Seeds are 1000 x (position of the role) + agent number, so they are
    deterministic and distinct across every council.
    """
    role = Role.parse(role) if not isinstance(role, Role) else role
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or not 1 <= num_agents <= MAX_AGENTS:
        raise InvalidArgument("num_agents", f"must be 1..{MAX_AGENTS}, got {num_agents!r}")
    low = role.value.lower()
    personas = PERSONAS[role]
    agents = []
    for i in range(num_agents):
        persona = personas[i % len(personas)]
        if i >= len(personas):
            persona += f" (voice {i // len(personas) + 1}: challenge the consensus and look for what others miss.)"
        agents.append(
            AgentSpec(
                agent_id=f"agent-{low}-{i + 1:03d}",
                role=role,
                persona=persona,
                temperature=TEMPERATURES[i % len(TEMPERATURES)],
                seed=1000 * (list(Role).index(role) + 1) + i + 1,
            )
        )
    return Council(council_id=f"council-{low}", role=role, agents=tuple(agents))


# --- tasks ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str = ""


DEFAULT_RUBRICS: dict[Role, tuple[Criterion, ...]] = {
    Role.DEV: (
        Criterion("correctness", "Does what the task asks, including edge cases and errors."),
        Criterion("simplicity", "Small, readable, idiomatic; no needless abstraction."),
        Criterion("tests", "Comes with tests that pin the behaviour down."),
        Criterion("robustness", "Validates input, bounds resources, fails with clear messages."),
    ),
    Role.QA: (
        Criterion("coverage", "Covers the requirements and the risky paths."),
        Criterion("edge_cases", "Boundaries, invalid input, failures and concurrency."),
        Criterion("automation", "Deterministic tests that run in CI."),
        Criterion("clarity", "Each test states what it proves."),
    ),
    Role.ARCHITECT: (
        Criterion("soundness", "Meets the requirements with a coherent design."),
        Criterion("simplicity", "The fewest moving parts that do the job."),
        Criterion("scalability", "Holds under load and partial failure."),
        Criterion("risk", "Names the risks and trade-offs and how to reverse decisions."),
    ),
    Role.DEVOPS: (
        Criterion("correctness", "Valid manifests and pipelines that deploy what is asked."),
        Criterion("security", "Least privilege, no secrets inline, pinned images, no privileged containers."),
        Criterion("reliability", "Probes, resources, safe rollouts and rollbacks."),
        Criterion("operability", "Observable and easy to run and debug."),
    ),
    Role.DATA: (
        Criterion("correctness", "Schemas, queries and pipelines produce the right data."),
        Criterion("integrity", "Constraints, transactions and validation."),
        Criterion("performance", "Indexes, batching, bounded scans."),
        Criterion("privacy", "Personal data minimised and protected."),
    ),
}


def default_rubric(role: Role) -> tuple[Criterion, ...]:
    return DEFAULT_RUBRICS[Role(role)]


MAX_CRITERIA = 8
MAX_REQUIREMENTS = 20
MAX_ROUNDS = 5
# Roles whose deliverable is code: their proposals must contain it (a ```python block), and it is executed.
CODE_ROLES = frozenset({Role.DEV, Role.QA})


@dataclass(frozen=True)
class TaskConstraints:
    """Bounds of one deliberation. `token_budget` 0 = unlimited; `max_tokens` bounds each LLM call;
    `rounds` of peer review (0 = none); the architect chooses among the `top_k` best-scored proposals.
    `tests`: the task's visible acceptance tests (one pytest file that imports from `solution`), run against
    every proposal's code in the sandbox unless `execute` is off. An empty rubric is replaced by the role's default rubric when the Task
    is built."""

    rubric: tuple[Criterion, ...] = ()
    requirements: tuple[str, ...] = ()
    timeout_seconds: float = 300.0
    token_budget: int = 200_000
    max_tokens: int = 512
    rounds: int = 1
    top_k: int = 3
    tests: str = ""
    execute: bool = True  # run the proposals' code in the sandbox (False: the ablation without execution)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rubric", tuple(self.rubric))
        object.__setattr__(self, "requirements", tuple(r.strip() for r in self.requirements if r and r.strip()))
        _number("constraints.timeout_seconds", self.timeout_seconds, 0.001, 86_400.0, exclusive_low=True)
        _number("constraints.token_budget", self.token_budget, 0, 100_000_000, integer=True)
        _number("constraints.max_tokens", self.max_tokens, 1, 32_768, integer=True)
        _number("constraints.rounds", self.rounds, 0, MAX_ROUNDS, integer=True)
        _number("constraints.top_k", self.top_k, 1, 10, integer=True)
        if len(self.rubric) > MAX_CRITERIA:
            raise InvalidArgument("constraints.rubric", f"at most {MAX_CRITERIA} criteria, got {len(self.rubric)}")
        names = [c.name.strip().lower() for c in self.rubric]
        if any(not n for n in names):
            raise InvalidArgument("constraints.rubric", "every criterion needs a name")
        if len(set(names)) != len(names):
            raise InvalidArgument("constraints.rubric", f"criterion names must be unique, got {names}")
        if len(self.requirements) > MAX_REQUIREMENTS:
            raise InvalidArgument(
                "constraints.requirements", f"at most {MAX_REQUIREMENTS}, got {len(self.requirements)}"
            )
        if not isinstance(self.tests, str):
            raise InvalidArgument("constraints.tests", f"must be pytest source text, got {type(self.tests).__name__}")
        if self.tests.strip() and (problem := test_source_problem(self.tests)):
            raise InvalidArgument("constraints.tests", problem)

    @classmethod
    def for_role(cls, role: Role | str, **overrides: Any) -> TaskConstraints:
        """The defaults with the role's rubric (overrides win; an empty rubric still means the default)."""
        role = Role.parse(role)
        rubric = tuple(overrides.pop("rubric", ()) or ()) or default_rubric(role)
        return cls(rubric=rubric, **overrides)


def _number(
    name: str, value: Any, low: float, high: float, *, integer: bool = False, exclusive_low: bool = False
) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise InvalidArgument(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (value <= low if exclusive_low else value < low) or value > high:
        bound = f"> {low:g}" if exclusive_low else f">= {low:g}"
        raise InvalidArgument(name, f"must be {bound} and <= {high:g}, got {value!r}")


@dataclass(frozen=True)
class Task:
    """What a council deliberates on. `context` (from the context service) joins the council's shared prompt;
    `context_version` is recorded in the result. `base_code` is the code the task builds on (its plan
    dependencies' winning code): shown to the agents, and saved as solution.py when a proposal brings no code of
    its own (a QA task's tests run against DEV's code)."""

    task_id: str
    description: str
    role: Role
    constraints: TaskConstraints = field(default_factory=TaskConstraints)
    story_id: str = ""
    context: str = ""
    context_version: str = ""
    base_code: str = ""
    requested_by: str = ""  # who asked: the authenticated caller of Deliberate, or the approver of the plan

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id.strip():
            raise InvalidArgument("task_id", "is required")
        if not isinstance(self.description, str) or not self.description.strip():
            raise InvalidArgument("description", "is required")
        object.__setattr__(self, "task_id", self.task_id.strip())
        object.__setattr__(self, "role", Role.parse(self.role))
        if not self.constraints.rubric:
            object.__setattr__(self, "constraints", replace(self.constraints, rubric=default_rubric(self.role)))

    @property
    def is_code_task(self) -> bool:
        """The one rule: a task that carries tests, or whose role's deliverable is code (DEV, QA), is a code task:
        its proposals must contain the code (a ```python block), which is executed in the sandbox."""
        return bool(self.constraints.tests.strip()) or self.role in CODE_ROLES

    @classmethod
    def create(
        cls,
        task_id: str,
        description: str,
        role: Role | str,
        *,
        requirements: tuple[str, ...] = (),
        story_id: str = "",
        context: str = "",
        context_version: str = "",
        base_code: str = "",
        **constraints: Any,
    ) -> Task:
        """A task with the role's default constraints (keyword `constraints` fields override them)."""
        return cls(
            task_id=task_id,
            description=description,
            role=Role.parse(role),
            constraints=TaskConstraints.for_role(role, requirements=tuple(requirements), **constraints),
            story_id=story_id,
            context=context,
            context_version=context_version,
            base_code=base_code,
        )


# --- what agents produce ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revision:
    number: int  # 0 = the original proposal
    content: str
    reason: str
    checks: tuple[CheckResult, ...] = ()  # what this revision's checks found (shown to its critic and author)


@dataclass(frozen=True)
class Proposal:
    proposal_id: str
    author_id: str
    author_role: Role
    content: str  # the latest revision
    revisions: tuple[Revision, ...] = ()


@dataclass(frozen=True)
class Critique:
    round: int
    proposal_id: str
    critic_id: str
    author_id: str
    verdict: Literal["accept", "revise"]
    summary: str
    issues: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    message: str
    severity: Literal["error", "warning"] = "error"
    line: int | None = None  # in the code block when `block` is set, else in the whole proposal
    block: int | None = None  # 1-based index of the fenced code block


# Checks that keep a proposal out of the finals while another passes them all (`passes_gates`).
GATING_CHECKS = frozenset(
    {"complete", "deliverable", "python.syntax", "tests.task", "tests.own", "kubernetes.schema", "policy.secrets"}
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    applicable: bool = True
    findings: tuple[Finding, ...] = ()
    detail: str = ""  # what was checked
    gating: bool | None = None  # None: decided by the name (GATING_CHECKS)

    def __post_init__(self) -> None:
        if self.gating is None:
            object.__setattr__(self, "gating", self.name in GATING_CHECKS)

    @property
    def blocks(self) -> bool:
        """A gating check that applied and failed."""
        return bool(self.gating) and self.applicable and not self.passed


def passes_gates(checks: tuple[CheckResult, ...] | list[CheckResult]) -> bool:
    return not any(c.blocks for c in checks)


@dataclass(frozen=True)
class Vote:
    voter_id: str
    proposal_id: str
    position: int  # 1-based place of the proposal in the order this voter was shown
    scores: dict[str, int]  # criterion name -> 1..10
    reason: str = ""

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else 0.0


@dataclass(frozen=True)
class RankedProposal:
    rank: int
    score: float
    peer_score: float
    check_score: float
    proposal: Proposal
    checks: tuple[CheckResult, ...] = ()
    votes: tuple[Vote, ...] = ()

    @property
    def finding_count(self) -> int:
        return sum(len(c.findings) for c in self.checks if c.applicable)

    @property
    def error_count(self) -> int:
        """Error findings of the applicable checks (warnings do not count: they break no tie)."""
        return sum(f.severity == "error" for c in self.checks if c.applicable for f in c.findings)

    @property
    def gated(self) -> bool:
        """Passes every gating check that applied."""
        return passes_gates(self.checks)


@dataclass(frozen=True)
class Selection:
    winner_id: str  # the winning proposal's author
    method: Literal["ARCHITECT", "FALLBACK"]
    rationale: str
    selected_by: str  # the architect's agent id, or "engine" for the fallback


@dataclass(frozen=True)
class UsageRecord:
    agent_id: str
    phase: Phase
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class AgentFailure:
    agent_id: str
    phase: Phase
    error: str


# --- scoring ----------------------------------------------------------------------------------------------------

PEER_WEIGHT = 0.7
CHECK_WEIGHT = 0.3


def check_score(checks: tuple[CheckResult, ...] | list[CheckResult]) -> float | None:
    """10 x the fraction of applicable checks that passed; None when no check applied (or none ran)."""
    applicable = [c for c in checks if c.applicable]
    return 10.0 * sum(c.passed for c in applicable) / len(applicable) if applicable else None


def rank_proposals(
    proposals: list[Proposal],
    checks: dict[str, tuple[CheckResult, ...]],
    votes: list[Vote],
) -> list[RankedProposal]:
    """Rank proposals (best first): those that pass every gating check before those that do not, then by the
    combined score.

    peer  = mean over the proposal's votes of each vote's mean criterion score (1..10); a proposal that got no
            vote while others did takes the mean peer score of those others (its voters failed, not it).
    check = 10 x passed / applicable checks (`check_score`).
    score = 0.7 x peer + 0.3 x check; peer alone when no check ran; check alone when nobody voted at all.
    Ties: fewer error findings first (warnings break no tie), then author id. `checks` is keyed by proposal id.
    """
    by_proposal = {p.proposal_id: [v for v in votes if v.proposal_id == p.proposal_id] for p in proposals}
    peers = {pid: sum(v.mean for v in vs) / len(vs) for pid, vs in by_proposal.items() if vs}
    imputed = sum(peers.values()) / len(peers) if peers else None
    rows = []
    for p in proposals:
        own_checks = tuple(checks.get(p.proposal_id, ()))
        cs = check_score(own_checks)
        peer = peers.get(p.proposal_id, imputed)
        if peer is None and cs is None:
            score = 0.0
        elif peer is None:
            score = cs
        elif cs is None:
            score = peer
        else:
            score = PEER_WEIGHT * peer + CHECK_WEIGHT * cs
        errors = sum(f.severity == "error" for c in own_checks if c.applicable for f in c.findings)
        rows.append((round(score, 4), errors, p, own_checks, peer, cs))
    rows.sort(key=lambda r: (not passes_gates(r[3]), -r[0], r[1], r[2].author_id))
    return [
        RankedProposal(
            rank=i,
            score=score,
            peer_score=round(peer or 0.0, 4),
            check_score=round(cs or 0.0, 4),
            proposal=p,
            checks=own_checks,
            votes=tuple(by_proposal[p.proposal_id]),
        )
        for i, (score, _, p, own_checks, peer, cs) in enumerate(rows, start=1)
    ]


def verification(
    task: Task, ranked: list[RankedProposal] | tuple[RankedProposal, ...], winner_id: str
) -> tuple[bool, str]:
    """Is the winner verified, and why (or why not): it must pass every gating check that applied, and for a code
    task some tests must have been executed against it (the task's or its own)."""
    winner = next((r for r in ranked if r.proposal.author_id == winner_id), None)
    if winner is None:
        return False, "no winner"
    blocking = [c for c in winner.checks if c.blocks]
    if blocking:
        others = "no proposal passed every gating check" if not any(r.gated for r in ranked) else ""
        what = "; ".join(f"{c.name}: {c.findings[0].message if c.findings else c.detail}" for c in blocking)
        return False, f"the winner failed {what}" + (f" ({others})" if others else "")
    executed = [c for c in winner.checks if c.name.startswith("tests.") and c.applicable]
    if task.is_code_task and not task.constraints.execute:
        return False, "execution was off for this task: no test ran against the winner"
    if task.is_code_task and not executed:
        return False, "no test was executed against the winner (the task has none and the proposal wrote none)"
    gates = sorted(c.name for c in winner.checks if c.gating and c.applicable)
    if not gates:
        return True, "nothing to gate on: no code, manifest or secret to check"
    passed = ", ".join(
        f"{c.name} ({c.detail})" if c.name.startswith("tests.") else c.name
        for c in winner.checks
        if c.gating and c.applicable
    )
    return True, f"passed {passed}"


# --- the result -------------------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DeliberationResult:
    deliberation_id: str
    task_id: str
    role: Role
    council_id: str
    status: DeliberationStatus
    error_message: str = ""
    results: tuple[RankedProposal, ...] = ()  # best first
    critiques: tuple[Critique, ...] = ()
    selection: Selection | None = None
    winner_id: str = ""  # the winning proposal's author
    usage: tuple[UsageRecord, ...] = ()  # one record per (agent, phase)
    phase_durations_ms: dict[Phase, float] = field(default_factory=dict)
    failures: tuple[AgentFailure, ...] = ()
    started_at: datetime = field(default_factory=_now)
    finished_at: datetime | None = None
    duration_ms: float = 0.0
    context_version: str = ""
    executor: str = ""  # which executor ran the agent calls (set by the caller)
    story_id: str = ""
    context_note: str = ""  # why there was no context, when there was none (set by the caller)
    verified: bool = False  # the winner passed every gating check (`verification`)
    verified_reason: str = ""
    notes: tuple[str, ...] = ()  # what went less than well without failing the deliberation
    interrupted: bool = False  # FAILED because its runner went away mid-deliberation (a plan's redelivery reruns it)
    requested_by: str = ""  # who asked for it (the task's `requested_by`)

    @classmethod
    def pending(cls, deliberation_id: str, task: Task, council_id: str, executor: str = "") -> DeliberationResult:
        """The record of a deliberation that has been accepted but has not produced anything yet."""
        return cls(
            deliberation_id=deliberation_id,
            task_id=task.task_id,
            role=task.role,
            council_id=council_id,
            status=DeliberationStatus.PENDING,
            context_version=task.context_version,
            executor=executor,
            story_id=task.story_id,
            requested_by=task.requested_by,
        )

    @property
    def winner(self) -> RankedProposal | None:
        return (
            next((r for r in self.results if r.proposal.author_id == self.winner_id), None) if self.winner_id else None
        )

    @property
    def total_tokens(self) -> int:
        return sum(u.total_tokens for u in self.usage)

    @property
    def tokens_by_phase(self) -> dict[Phase, int]:
        out: dict[Phase, int] = {}
        for u in self.usage:
            out[u.phase] = out.get(u.phase, 0) + u.total_tokens
        return out

    @property
    def tokens_by_agent(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.usage:
            out[u.agent_id] = out.get(u.agent_id, 0) + u.total_tokens
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (json.dumps works on it); `from_dict` reads it back."""
        return dump(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeliberationResult:
        return load(cls, data)

    def outcome_event(self, plan_id: str = "") -> ev.DeliberationCompleted | ev.DeliberationFailed:
        """The event announcing how it ended: the winner, or FAILED/TIMEOUT and why."""
        common: dict[str, Any] = {
            "deliberation_id": self.deliberation_id,
            "task_id": self.task_id,
            "role": self.role,
            "story_id": self.story_id,
            "plan_id": plan_id,
            "duration_ms": int(self.duration_ms),
        }
        winner = self.winner
        if self.status == DeliberationStatus.COMPLETED and winner is not None and self.selection is not None:
            applicable = [c for c in winner.checks if c.applicable]
            return ev.DeliberationCompleted(
                **common,
                winner_id=winner.proposal.author_id,
                winner_proposal_id=winner.proposal.proposal_id,
                winner_content=winner.proposal.content,
                winner_score=winner.score,
                selection_method=self.selection.method,
                rationale=self.selection.rationale,
                checks_passed=sum(c.passed for c in applicable),
                checks_failed=sum(not c.passed for c in applicable),
                total_tokens=self.total_tokens,
                context_version=self.context_version,
                verified=self.verified,
                verified_reason=self.verified_reason,
            )
        status = self.status if self.status in (DeliberationStatus.FAILED, DeliberationStatus.TIMEOUT) else "FAILED"
        return ev.DeliberationFailed(**common, status=status, error=self.error_message or "no winner")


ProgressKind = Literal[
    "deliberation_started",
    "phase_started",
    "phase_completed",
    "agent_completed",
    "agent_failed",
    "deliberation_completed",
]


@dataclass(frozen=True)
class ProgressEvent:
    deliberation_id: str
    task_id: str
    role: Role
    phase: Phase | None
    kind: ProgressKind
    agent_id: str | None = None
    detail: str = ""
    completion_tokens: int = 0  # agent_completed of an answer: its completion tokens
    at: datetime = field(default_factory=_now)


# --- serialisation: one generic pair for every dataclass above ------------------------------------------------

T = TypeVar("T")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def dump(obj: Any) -> dict[str, Any]:
    """Any domain dataclass as a JSON-ready dict (enums as strings, datetimes ISO-8601, tuples as lists)."""
    return _adapter(type(obj)).dump_python(obj, mode="json")


def load(cls: type[T], data: Any) -> T:
    """The inverse of `dump` (validated: a corrupt record raises pydantic.ValidationError)."""
    return _adapter(cls).validate_python(data)
