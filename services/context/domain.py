"""The context domain: the story graph's entities, role x phase scopes, what a completed deliberation becomes,
UpdateContext changes, and secret redaction.

No I/O here. The application loads a `StorySnapshot` through its ports; `rendering.py` turns it into a role's
prompt text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum, nonmember
from functools import lru_cache

from services.common.errors import InvalidArgument
from services.common.events import ID_PATTERN, Role, StoryPhase, Vocabulary
from services.common.secrets import CREDENTIALS, HINTS, KEY_WORDS, CredentialPattern, is_placeholder

# --- vocabulary --------------------------------------------------------------------------------------------


class DecisionStatus(Vocabulary):
    FIELD = nonmember("status")
    PROPOSED = "PROPOSED"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    SUPERSEDED = "SUPERSEDED"


class TaskStatus(Vocabulary):
    FIELD = nonmember("status")
    PLANNED = "PLANNED"
    IN_PROGRESS = "IN_PROGRESS"
    DECIDED = "DECIDED"  # a council chose a proposal for it
    BLOCKED = "BLOCKED"
    DONE = "DONE"


LIVE = (DecisionStatus.ACCEPTED, DecisionStatus.PROPOSED)  # the decisions in force


_ID = re.compile(ID_PATTERN)


def check_id(value: str, field: str) -> str:
    """`value` stripped, or InvalidArgument naming `field` (ids travel in Valkey keys and event payloads)."""
    value = (value or "").strip()
    if not value:
        raise InvalidArgument(field, "is required")
    if not _ID.match(value):
        raise InvalidArgument(field, f"must be 1-128 characters of letters, digits, _ : - (got {value[:40]!r})")
    return value


# Text limits. They keep every graph write under the Bolt message size FalkorDB handles
# (services/common/falkordb.py, point 2).
MAX_TITLE = 300
MAX_TEXT = 4000
MAX_PROPOSAL = 8000
MAX_LIST_ITEMS = 20
MAX_LIST_ITEM = 300


def clip(text: str, limit: int) -> str:
    """`text` without NUL characters, cut to `limit` characters with an ellipsis when longer."""
    text = (text or "").replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --- scopes ---------------------------------------------------------------------------------------------------


class Scope(StrEnum):
    STORY = "story"  # title and description
    PLAN = "plan"  # the current plan: id, version, approver, roles
    SUMMARY = "summary"  # the latest summary of what happened
    MILESTONES = "milestones"  # the story's timeline
    TASKS_OWN = "tasks.own"  # the role's tasks (with a subtask: that subtask and its parents)
    TASKS_DEPENDENCIES = "tasks.dependencies"  # tasks the own tasks depend on
    TASKS_ALL = "tasks.all"  # every other task
    DECISIONS_RELEVANT = "decisions.relevant"  # affecting the own tasks, then story-wide, then the dependencies
    DECISIONS_ALL = "decisions.all"  # every other live (ACCEPTED/PROPOSED) decision
    DECISIONS_HISTORY = "decisions.history"  # superseded and rejected decisions too
    PROPOSALS_WINNING = "proposals.winning"  # the winning proposal behind the relevant decisions


_BASE = (Scope.STORY, Scope.PLAN, Scope.TASKS_OWN, Scope.DECISIONS_RELEVANT)
_S = Scope

# The one definition of what each role sees in each phase. Same role and phase names as the API.
SCOPES: dict[Role, dict[StoryPhase, frozenset[Scope]]] = {
    Role.ARCHITECT: {
        StoryPhase.DESIGN: frozenset(
            {*_BASE, _S.SUMMARY, _S.MILESTONES, _S.TASKS_DEPENDENCIES, _S.TASKS_ALL, _S.DECISIONS_ALL}
            | {_S.DECISIONS_HISTORY}
        ),
        StoryPhase.BUILD: frozenset({*_BASE, _S.SUMMARY, _S.TASKS_DEPENDENCIES, _S.TASKS_ALL, _S.DECISIONS_ALL}),
        StoryPhase.TEST: frozenset({*_BASE, _S.SUMMARY, _S.TASKS_DEPENDENCIES, _S.TASKS_ALL, _S.DECISIONS_ALL}),
        StoryPhase.DOCS: frozenset(
            {*_BASE, _S.SUMMARY, _S.MILESTONES, _S.TASKS_ALL, _S.DECISIONS_ALL, _S.DECISIONS_HISTORY}
        ),
    },
    Role.DEV: {
        StoryPhase.DESIGN: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.BUILD: frozenset({*_BASE, _S.TASKS_DEPENDENCIES, _S.PROPOSALS_WINNING}),
        StoryPhase.TEST: frozenset({*_BASE, _S.TASKS_DEPENDENCIES, _S.PROPOSALS_WINNING}),
        StoryPhase.DOCS: frozenset({*_BASE, _S.SUMMARY, _S.MILESTONES, _S.PROPOSALS_WINNING}),
    },
    Role.QA: {
        StoryPhase.DESIGN: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.BUILD: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.TEST: frozenset({*_BASE, _S.TASKS_DEPENDENCIES, _S.TASKS_ALL, _S.PROPOSALS_WINNING}),
        StoryPhase.DOCS: frozenset({*_BASE, _S.SUMMARY, _S.MILESTONES}),
    },
    Role.DEVOPS: {
        StoryPhase.DESIGN: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.BUILD: frozenset({*_BASE, _S.TASKS_DEPENDENCIES, _S.PROPOSALS_WINNING}),
        StoryPhase.TEST: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.DOCS: frozenset({*_BASE, _S.SUMMARY, _S.MILESTONES}),
    },
    Role.DATA: {
        StoryPhase.DESIGN: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.BUILD: frozenset({*_BASE, _S.TASKS_DEPENDENCIES, _S.PROPOSALS_WINNING}),
        StoryPhase.TEST: frozenset({*_BASE, _S.TASKS_DEPENDENCIES}),
        StoryPhase.DOCS: frozenset({*_BASE, _S.SUMMARY, _S.MILESTONES}),
    },
}

SCOPE_ORDER = {s: i for i, s in enumerate(Scope)}


def scopes_for(role: Role, phase: StoryPhase) -> tuple[Scope, ...]:
    """The scopes `role` sees in `phase`, in catalog order."""
    return tuple(sorted(SCOPES[role][phase], key=SCOPE_ORDER.__getitem__))


@dataclass(frozen=True)
class ScopeCheck:
    allowed: bool
    denied: tuple[str, ...]  # asked for, not granted
    missing: tuple[str, ...]  # granted, not asked for
    reason: str


def check_scopes(role: Role, phase: StoryPhase, asked: Sequence[str], field: str = "scopes") -> ScopeCheck:
    """Whether `role` may see every scope in `asked` during `phase`. Unknown scope names are InvalidArgument."""
    wanted: list[Scope] = []
    for i, name in enumerate(asked):
        try:
            wanted.append(Scope(str(name).strip().lower()))
        except ValueError:
            raise InvalidArgument(f"{field}[{i}]", f"unknown scope {name!r}; known: {', '.join(Scope)}") from None
    granted = set(SCOPES[role][phase])
    denied = tuple(dict.fromkeys(s.value for s in wanted if s not in granted))
    missing = tuple(s.value for s in scopes_for(role, phase) if s not in set(wanted))
    if denied:
        reason = f"{role} may not see {', '.join(denied)} in {phase}"
    else:
        reason = f"{role} may see every scope asked for in {phase}"
    return ScopeCheck(not denied, denied, missing, reason)


# --- entities --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Story:
    story_id: str
    title: str = ""
    description: str = ""


@dataclass(frozen=True)
class Plan:
    plan_id: str
    approved_by: str = ""
    approved_at: int = 0  # unix ms
    roles: tuple[Role, ...] = ()
    version: int = 0  # 1 for the story's first plan (by approval time); set by `with_versions`


@dataclass(frozen=True)
class Task:
    task_id: str
    title: str = ""
    description: str = ""
    role: Role | None = None
    status: TaskStatus = TaskStatus.PLANNED
    priority: int = 0  # 0..10, higher first
    depends_on: tuple[str, ...] = ()
    parent_task_id: str = ""
    requirements: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    decision_id: str
    title: str
    rationale: str = ""
    status: DecisionStatus = DecisionStatus.ACCEPTED
    decided_by: str = ""
    decided_at: int = 0  # unix ms
    alternatives: tuple[str, ...] = ()
    affects_task_ids: tuple[str, ...] = ()
    supersedes: tuple[str, ...] = ()
    # Set when a council's deliberation produced it.
    task_id: str = ""
    role: Role | None = None
    deliberation_id: str = ""
    proposal_id: str = ""


@dataclass(frozen=True)
class Proposal:
    proposal_id: str
    author_id: str
    content: str
    score: float = 0.0


@dataclass(frozen=True)
class Deliberation:
    deliberation_id: str
    task_id: str
    role: Role
    selection_method: str
    winner_score: float
    duration_ms: int = 0
    total_tokens: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    context_version: str = ""
    completed_at: int = 0


@dataclass(frozen=True)
class Milestone:
    milestone_id: str
    name: str
    description: str = ""
    at: int = 0  # unix ms


@dataclass(frozen=True)
class Summary:
    text: str
    at: int = 0


@dataclass(frozen=True)
class StorySnapshot:
    """Everything rehydration reads about a story (proposal contents are fetched on demand)."""

    story: Story
    plans: tuple[Plan, ...] = ()
    tasks: tuple[Task, ...] = ()
    decisions: tuple[Decision, ...] = ()
    milestones: tuple[Milestone, ...] = ()
    summary: Summary | None = None

    @property
    def current_plan(self) -> Plan | None:
        return max(self.plans, key=lambda p: (p.approved_at, p.plan_id)) if self.plans else None


def with_versions(plans: Iterable[Plan]) -> tuple[Plan, ...]:
    """Plans numbered 1..n by approval time (then id): the same versions whatever order the events arrived in."""
    ordered = sorted(plans, key=lambda p: (p.approved_at, p.plan_id))
    return tuple(replace(p, version=i) for i, p in enumerate(ordered, start=1))


def plan_chain(plans: Iterable[Plan]) -> list[tuple[str, str]]:
    """(newer, older) plan id pairs: each plan SUPERSEDES the one approved just before it."""
    ordered = with_versions(plans)
    return [(b.plan_id, a.plan_id) for a, b in itertools.pairwise(ordered)]


def story_version(snapshot: StorySnapshot) -> str:
    """Content hash of the whole story (graph + timeline + summary); independent of the order things were read."""
    doc = {
        "story": asdict(snapshot.story),
        "plans": sorted((asdict(p) for p in with_versions(snapshot.plans)), key=lambda p: p["plan_id"]),
        "tasks": sorted((asdict(t) for t in snapshot.tasks), key=lambda t: t["task_id"]),
        "decisions": sorted(
            (
                {**asdict(d), "affects_task_ids": sorted(d.affects_task_ids), "supersedes": sorted(d.supersedes)}
                for d in snapshot.decisions
            ),
            key=lambda d: d["decision_id"],
        ),
        "milestones": sorted((asdict(m) for m in snapshot.milestones), key=lambda m: m["milestone_id"]),
        "summary": asdict(snapshot.summary) if snapshot.summary else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- what a completed deliberation becomes ----------------------------------------------------------------------


def decision_id_for(deliberation_id: str) -> str:
    return f"DEC-{deliberation_id}"


def title_from(content: str, fallback: str, limit: int = 120) -> str:
    """A decision title from a proposal: its first line of prose (headings and list marks stripped)."""
    in_code = False
    for raw in (content or "").splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = line.lstrip("#>*-+ \t").strip().strip("*_`").strip()
        if len(line) >= 3:
            if len(line) > limit:
                cut = line[: limit - 1].rsplit(" ", 1)[0] or line[: limit - 1]
                line = cut.rstrip(" ,.;:") + "…"
            return line
    return fallback


def supersession(decisions: Iterable[Decision]) -> tuple[dict[str, DecisionStatus], list[tuple[str, str]]]:
    """Statuses and SUPERSEDES edges (newer, older) among the decisions of one (task, role) from deliberations.

    The newest (by decided_at, then id) stays ACCEPTED; each older one is SUPERSEDED by the one just after it.
    Works whatever order the deliberations were recorded in.
    """
    ordered = sorted(decisions, key=lambda d: (d.decided_at, d.decision_id))
    statuses = {d.decision_id: DecisionStatus.SUPERSEDED for d in ordered[:-1]}
    if ordered:
        statuses[ordered[-1].decision_id] = DecisionStatus.ACCEPTED
    edges = [(b.decision_id, a.decision_id) for a, b in itertools.pairwise(ordered)]
    return statuses, edges


# --- changes (UpdateContext) ---------------------------------------------------------------------------------


class Operation(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Change:
    """One UpdateContext change. `fields` names what an UPDATE sets (the others stay as they are)."""

    operation: Operation
    entity: Decision | Task | Milestone
    fields: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        return {Decision: "decision", Task: "task", Milestone: "milestone"}[type(self.entity)]

    @property
    def entity_id(self) -> str:
        e = self.entity
        if isinstance(e, Decision):
            return e.decision_id
        if isinstance(e, Task):
            return e.task_id
        return e.milestone_id


# --- secret redaction ------------------------------------------------------------------------------------------

REDACTED = "[REDACTED:{kind}]"

# The key of a `password = ...` assignment and its value, which is hidden unless it is a placeholder, a short
# number or shorter than 4 characters.
_ASSIGNMENT = re.compile(
    rf"""(?ix)
    (?P<key>[A-Za-z0-9_.-]*(?:{KEY_WORDS})[A-Za-z0-9_.-]*)
    (?P<quote_key>["']?)
    (?P<sep>[ \t]*[:=][ \t]*)
    (?P<quote>["']?)
    (?P<value>[^\s"',;]+)
    """
)


def _assignment(m: re.Match[str], counter: list[int]) -> str:
    value = m.group("value")
    if is_placeholder(value) or (value.isdigit() and len(value) < 8) or len(value) < 4:
        return m.group(0)
    counter[0] += 1
    return f"{m.group('key')}{m.group('quote_key')}{m.group('sep')}{m.group('quote')}{REDACTED.format(kind='secret')}"


def _hide(pattern: CredentialPattern, m: re.Match[str]) -> str:
    start, end = pattern.span(m)
    whole = m.group(0)
    return whole[: start - m.start()] + REDACTED.format(kind=pattern.kind) + whole[end - m.start() :]


@lru_cache(maxsize=50_000)
def redact(text: str) -> tuple[str, int]:
    """`text` with credentials (services.common.secrets) replaced by [REDACTED:<kind>], and how many were replaced
    (memoized: the same items are rendered again for every role, budget and rebuild)."""
    if not text:
        return text, 0
    low = text.lower()
    if not any(h in low for h in HINTS):  # every credential pattern contains one of them
        return text, 0
    counter = [0]
    for pattern in CREDENTIALS:
        text, n = pattern.regex.subn(lambda m, p=pattern: _hide(p, m), text)
        counter[0] += n
    text = _ASSIGNMENT.sub(lambda m: _assignment(m, counter), text)
    return text, counter[0]
