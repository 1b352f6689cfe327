"""Rendering: a story's context as a role's prompt text, trimmed to a token budget. Pure functions of the domain
model (`domain.py`); no I/O. The application calls `select()`, fetches the winning proposals it names
(`proposal_candidates()`) and calls `assemble()`; the gRPC adapter converts `RenderedContext` to protobuf.

Rehydration in one paragraph: SCOPES says what a role may see in a phase. `assemble()` turns the snapshot into
ranked items (the focus and the role's own tasks first, then the decisions affecting them, their winning proposals,
the dependencies and the decisions on those, story-wide decisions, then summary, milestones and everything else the
scopes allow), redacts secrets from every text, counts each item's tokens and fills the budget in rank order; what
does not fit is reported in `dropped` ("decision:D-17"). The version is a hash of the rendered text.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Protocol

from services.common.errors import InvalidArgument
from services.common.events import Role, StoryPhase
from services.context.domain import (
    LIVE,
    MAX_TEXT,
    MAX_TITLE,
    SCOPES,
    Decision,
    DecisionStatus,
    Proposal,
    Scope,
    StorySnapshot,
    Task,
    clip,
    redact,
    scopes_for,
    with_versions,
)

# --- token counting --------------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class CharEstimate:
    """A documented estimate when no tokenizer is installed: one token per 4 characters (rounded up).

    For English prose and code with BPE vocabularies of ~150k tokens this overestimates slightly, which errs on
    the side of fitting the budget.
    """

    name = "estimate:chars/4"

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4)


# --- rendering -------------------------------------------------------------------------------------------------

ROLE_FOCUS = {
    Role.ARCHITECT: "You own the overall design: coherence across tasks, interfaces, trade-offs and risks.",
    Role.DEV: "You write the implementation of your tasks: correct, idiomatic, tested code.",
    Role.QA: "You make sure the story works: acceptance criteria, test cases, edge cases, regressions.",
    Role.DEVOPS: "You make it run: build, deployment, Kubernetes manifests, observability, security.",
    Role.DATA: "You own the data: schemas, migrations, queries, data quality and privacy.",
}
PHASE_FOCUS = {
    StoryPhase.DESIGN: "StoryPhase DESIGN: decide how to build it before writing it.",
    StoryPhase.BUILD: "StoryPhase BUILD: produce the artefacts the decisions call for.",
    StoryPhase.TEST: "StoryPhase TEST: verify the artefacts against the requirements.",
    StoryPhase.DOCS: "StoryPhase DOCS: explain what was built and why.",
}
PHASE_TOOLS = {
    StoryPhase.DESIGN: "Answer with a design: components, interfaces, trade-offs. Use fenced blocks only for "
    "interfaces and schemas (python, yaml, json, sql).",
    StoryPhase.BUILD: "Put code in fenced blocks tagged with their language (python, yaml, json, sql): they are parsed, "
    "linted and policy-checked (no secrets, no privileged containers, no :latest images).",
    StoryPhase.TEST: "Put tests in fenced python blocks (pytest); name each case and the requirement it covers.",
    StoryPhase.DOCS: "Write Markdown; fenced blocks for examples, tagged with their language.",
}

# Rendering caps per item (characters) so one large entity cannot crowd out the rest.
ITEM_TEXT = 1200
ITEM_PROPOSAL = 4000
MAX_PROPOSALS = 20


@dataclass(frozen=True)
class ContextRequest:
    story_id: str
    role: Role
    phase: StoryPhase
    token_budget: int
    subtask_id: str = ""

    @property
    def cache_field(self) -> str:
        return f"{self.role}|{self.phase}|{self.subtask_id}|{self.token_budget}"


@dataclass(frozen=True)
class RenderedContext:
    story_id: str
    role: Role
    phase: StoryPhase
    system: str
    context: str
    tools: str
    token_count: int
    scopes: tuple[str, ...]
    version: str
    dropped: tuple[str, ...]
    tokenizer: str
    redactions: int = 0

    @property
    def text(self) -> str:
        return join_blocks(self.system, self.context, self.tools)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> RenderedContext:
        d = json.loads(raw)
        d["role"], d["phase"] = Role(d["role"]), StoryPhase(d["phase"])
        d["scopes"], d["dropped"] = tuple(d["scopes"]), tuple(d["dropped"])
        return cls(**d)


def join_blocks(*blocks: str) -> str:
    return "\n\n".join(b for b in blocks if b)


@dataclass
class _Item:
    key: str  # reported in `dropped` when left out, e.g. "decision:D-17"
    section: str
    rank: tuple[int, ...]
    text: str
    scope: Scope
    tokens: int = 0
    order: int = 0


SECTIONS = (
    "Story",
    "Plan",
    "Summary",
    "Focus",
    "Your tasks",
    "Decisions on your tasks",
    "Winning proposals",
    "Story-wide decisions",
    "Dependencies",
    "Decisions on dependencies",
    "Milestones",
    "Other tasks",
    "Other decisions",
    "Decision history",
)


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%MZ") if ms else "undated"


@lru_cache(maxsize=50_000)
def _task_line(t: Task) -> str:
    head = f"- [{t.task_id}] {t.role or 'unassigned'} · {t.status} · priority {t.priority}"
    if t.parent_task_id:
        head += f" · subtask of {t.parent_task_id}"
    body = clip(" ".join(x for x in (t.title, t.description) if x), ITEM_TEXT)
    lines = [f"{head}: {body}" if body else head]
    if t.requirements:
        lines.append("  requirements: " + "; ".join(clip(r, 200) for r in t.requirements))
    if t.depends_on:
        lines.append("  depends on: " + ", ".join(t.depends_on))
    return "\n".join(lines)


@lru_cache(maxsize=50_000)
def _decision_lines(d: Decision) -> str:
    head = f"- [{d.decision_id}] {d.status} · {_date(d.decided_at)}"
    if d.decided_by:
        head += f" · by {d.decided_by}"
    if d.affects_task_ids:
        head += " · affects " + ", ".join(sorted(d.affects_task_ids))
    lines = [head, f"  {clip(d.title, MAX_TITLE)}"]
    if d.rationale:
        lines.append(f"  rationale: {clip(d.rationale, ITEM_TEXT)}")
    if d.alternatives:
        lines.append("  alternatives considered: " + "; ".join(clip(a, 200) for a in d.alternatives))
    if d.supersedes:
        lines.append("  supersedes: " + ", ".join(sorted(d.supersedes)))
    return "\n".join(lines)


def _decision_order(d: Decision) -> tuple[int, int, str]:
    """Live decisions first (ACCEPTED before PROPOSED), newest first."""
    status_rank = {DecisionStatus.ACCEPTED: 0, DecisionStatus.PROPOSED: 1, DecisionStatus.REJECTED: 2}
    return (status_rank.get(d.status, 3), -d.decided_at, d.decision_id)


def _task_order(t: Task) -> tuple[int, str]:
    return (-t.priority, t.task_id)


@dataclass(frozen=True)
class Selection:
    """Which tasks and decisions fall in which relevance band for a (role, phase, subtask)."""

    scopes: frozenset[Scope]
    focus: tuple[Task, ...]
    own: tuple[Task, ...]
    dependencies: tuple[Task, ...]
    others: tuple[Task, ...]
    own_decisions: tuple[Decision, ...]
    story_wide: tuple[Decision, ...]
    dependency_decisions: tuple[Decision, ...]
    other_decisions: tuple[Decision, ...]
    history: tuple[Decision, ...]
    narrowed: bool


class SubtaskNotFound(LookupError):
    pass


def select(snapshot: StorySnapshot, role: Role, phase: StoryPhase, subtask_id: str = "") -> Selection:
    """Split the story's tasks and decisions into relevance bands, filtered by the role's scopes."""
    scopes = SCOPES[role][phase]
    tasks = {t.task_id: t for t in snapshot.tasks}
    focus: list[Task] = []
    if subtask_id:
        if subtask_id not in tasks:
            raise SubtaskNotFound(subtask_id)
        current: Task | None = tasks[subtask_id]
        seen: set[str] = set()
        while current is not None and current.task_id not in seen:  # the subtask, then its parents
            focus.append(current)
            seen.add(current.task_id)
            current = tasks.get(current.parent_task_id)
        own_ids = [t.task_id for t in focus]
    else:
        own_ids = [t.task_id for t in sorted(tasks.values(), key=_task_order) if t.role == role]
    own_set = set(own_ids)
    dep_ids: list[str] = []
    frontier = list(own_ids)
    while frontier:  # transitive dependencies, nearest first
        nxt = []
        for tid in frontier:
            for dep in tasks[tid].depends_on:
                if dep in tasks and dep not in own_set and dep not in dep_ids:
                    dep_ids.append(dep)
                    nxt.append(dep)
        frontier = nxt
    dep_set = set(dep_ids)
    others = [
        t for t in sorted(tasks.values(), key=_task_order) if t.task_id not in own_set and t.task_id not in dep_set
    ]

    own_d, wide_d, dep_d, other_d, hist_d = [], [], [], [], []
    known = tasks.keys()
    for d in sorted(snapshot.decisions, key=_decision_order):
        if d.status not in LIVE:
            hist_d.append(d)
            continue
        if not d.affects_task_ids:  # about the whole story
            wide_d.append(d)
            continue
        affects = known & set(d.affects_task_ids)
        if affects & own_set:
            own_d.append(d)
        elif affects & dep_set:
            dep_d.append(d)
        else:
            other_d.append(d)

    def allowed(scope: Scope, items: list) -> tuple:
        return tuple(items) if scope in scopes else ()

    narrowed = bool(subtask_id)
    return Selection(
        scopes=scopes,
        focus=tuple(focus) if Scope.TASKS_OWN in scopes else (),
        own=allowed(Scope.TASKS_OWN, [] if narrowed else [tasks[i] for i in own_ids]),
        dependencies=allowed(Scope.TASKS_DEPENDENCIES, [tasks[i] for i in dep_ids]),
        others=() if narrowed else allowed(Scope.TASKS_ALL, others),
        own_decisions=allowed(Scope.DECISIONS_RELEVANT, own_d),
        story_wide=allowed(Scope.DECISIONS_RELEVANT, wide_d),
        dependency_decisions=allowed(Scope.DECISIONS_RELEVANT, dep_d),
        other_decisions=() if narrowed else allowed(Scope.DECISIONS_ALL, other_d),
        history=allowed(
            Scope.DECISIONS_HISTORY, hist_d if not narrowed else [h for h in hist_d if _touches(h, own_set)]
        ),
        narrowed=narrowed,
    )


def _touches(d: Decision, task_ids: set[str]) -> bool:
    return bool(set(d.affects_task_ids) & task_ids)


def proposal_candidates(selection: Selection) -> list[str]:
    """Ids of the winning proposals worth fetching: those behind the decisions on the role's own tasks."""
    if Scope.PROPOSALS_WINNING not in selection.scopes:
        return []
    return [d.proposal_id for d in selection.own_decisions if d.proposal_id][:MAX_PROPOSALS]


def _items(snapshot: StorySnapshot, sel: Selection, proposals: Mapping[str, Proposal]) -> list[_Item]:
    items: list[_Item] = []
    s = snapshot.story

    def add(key: str, section: str, band: int, text: str, scope: Scope) -> None:
        items.append(_Item(key, section, (band, len(items)), text, scope))

    if s.description:
        add("story.description", "Story", 1, clip(s.description, MAX_TEXT), Scope.STORY)
    plan = snapshot.current_plan
    if plan is not None and Scope.PLAN in sel.scopes:
        versions = {p.plan_id: p.version for p in with_versions(snapshot.plans)}
        roles = ", ".join(plan.roles) if plan.roles else "all roles"
        line = f"{plan.plan_id} (version {versions[plan.plan_id]})"
        if plan.approved_by:
            line += f", approved by {plan.approved_by} at {_date(plan.approved_at)}"
        add("plan", "Plan", 1, f"{line}; roles: {roles}", Scope.PLAN)
    for t in sel.focus:
        add(f"task:{t.task_id}", "Focus", 2, _task_line(t), Scope.TASKS_OWN)
    for t in sel.own:
        add(f"task:{t.task_id}", "Your tasks", 3, _task_line(t), Scope.TASKS_OWN)
    for d in sel.own_decisions:
        add(f"decision:{d.decision_id}", "Decisions on your tasks", 4, _decision_lines(d), Scope.DECISIONS_RELEVANT)
    for d in sel.own_decisions:
        p = proposals.get(d.proposal_id)
        if p is not None:
            head = f"### {p.proposal_id} behind {d.decision_id} (by {p.author_id}, score {p.score:.2f})"
            add(
                f"proposal:{p.proposal_id}",
                "Winning proposals",
                5,
                f"{head}\n{clip(p.content, ITEM_PROPOSAL)}",
                Scope.PROPOSALS_WINNING,
            )
    for d in sel.story_wide:
        add(f"decision:{d.decision_id}", "Story-wide decisions", 6, _decision_lines(d), Scope.DECISIONS_RELEVANT)
    for t in sel.dependencies:
        add(f"task:{t.task_id}", "Dependencies", 7, _task_line(t), Scope.TASKS_DEPENDENCIES)
    for d in sel.dependency_decisions:
        add(f"decision:{d.decision_id}", "Decisions on dependencies", 8, _decision_lines(d), Scope.DECISIONS_RELEVANT)
    if snapshot.summary and snapshot.summary.text and Scope.SUMMARY in sel.scopes:
        add("summary", "Summary", 9, clip(snapshot.summary.text, ITEM_TEXT), Scope.SUMMARY)
    if Scope.MILESTONES in sel.scopes:
        for m in sorted(snapshot.milestones, key=lambda m: (-m.at, m.milestone_id)):
            text = f"- {_date(m.at)} {clip(m.name, MAX_TITLE)}"
            if m.description:
                text += f": {clip(m.description, 400)}"
            add(f"milestone:{m.milestone_id}", "Milestones", 10, text, Scope.MILESTONES)
    for t in sel.others:
        add(f"task:{t.task_id}", "Other tasks", 11, _task_line(t), Scope.TASKS_ALL)
    for d in sel.other_decisions:
        add(f"decision:{d.decision_id}", "Other decisions", 12, _decision_lines(d), Scope.DECISIONS_ALL)
    for d in sel.history:
        add(f"decision:{d.decision_id}", "Decision history", 13, _decision_lines(d), Scope.DECISIONS_HISTORY)
    return items


def _system(req: ContextRequest) -> str:
    where = f"story {req.story_id}" + (f", subtask {req.subtask_id}" if req.subtask_id else "")
    return (
        f"You are the {req.role} member of a council of agents working on {where}.\n"
        f"{ROLE_FOCUS[req.role]} {PHASE_FOCUS[req.phase]}\n"
        "ACCEPTED decisions are binding unless you argue for superseding them. The context below is scoped to "
        "your role and phase and may have been trimmed to fit a token budget."
    )


def _render(header: str, items: Sequence[_Item]) -> str:
    by_section: dict[str, list[_Item]] = {}
    for it in sorted(items, key=lambda i: i.rank):
        by_section.setdefault(it.section, []).append(it)
    parts = [header]
    for section in SECTIONS:
        chunk = by_section.get(section)
        if not chunk:
            continue
        body = "\n".join(i.text for i in chunk)
        parts.append(body if section == "Story" else f"## {section}\n{body}")
    return "\n\n".join(parts)


def assemble(
    snapshot: StorySnapshot,
    req: ContextRequest,
    counter: TokenCounter,
    proposals: Mapping[str, Proposal] | None = None,
    selection: Selection | None = None,
) -> RenderedContext:
    """The role's context for the phase, trimmed to `req.token_budget` tokens, secrets redacted."""
    sel = selection or select(snapshot, req.role, req.phase, req.subtask_id)
    redactions = 0

    def clean(text: str) -> str:
        nonlocal redactions
        out, n = redact(text)
        redactions += n
        return out

    system = clean(_system(req))
    tools = PHASE_TOOLS[req.phase]
    header = clean(f"# Story {snapshot.story.story_id}: {clip(snapshot.story.title, MAX_TITLE) or '(untitled)'}")
    items = _items(snapshot, sel, proposals or {})
    for it in items:
        it.text = clean(it.text)
        it.tokens = counter.count(it.text + "\n")
    separators = counter.count("\n\n") * 2
    fixed = counter.count(system) + counter.count(tools) + counter.count(header) + separators
    heading_cost = {s: counter.count(f"\n\n## {s}\n") for s in SECTIONS}
    remaining = req.token_budget - fixed
    chosen: list[_Item] = []
    dropped: list[_Item] = []
    opened: set[str] = set()
    for it in sorted(items, key=lambda i: i.rank):
        cost = it.tokens + (0 if it.section in opened or it.section == "Story" else heading_cost[it.section])
        if cost <= remaining:
            chosen.append(it)
            opened.add(it.section)
            remaining -= cost
        else:
            dropped.append(it)
    # Per-item counts are close but not exact (tokens can merge across joins): check the whole, trim if over.
    while True:
        context = _render(header, chosen)
        total = counter.count(join_blocks(system, context, tools))
        if total <= req.token_budget or not chosen:
            break
        dropped.append(chosen.pop())
    version = hashlib.sha256(join_blocks(system, context, tools).encode()).hexdigest()[:16]
    scopes = [s.value for s in scopes_for(req.role, req.phase)]
    if req.subtask_id:
        scopes.append("subtask")
    return RenderedContext(
        story_id=snapshot.story.story_id,
        role=req.role,
        phase=req.phase,
        system=system,
        context=context,
        tools=tools,
        token_count=total,
        scopes=tuple(scopes),
        version=version,
        dropped=tuple(i.key for i in sorted(dropped, key=lambda i: i.rank)),
        tokenizer=counter.name,
        redactions=redactions,
    )


@dataclass(frozen=True)
class Budget:
    default: int
    minimum: int
    maximum: int

    def resolve(self, asked: int, field: str = "token_budget") -> int:
        """0 means the default; below the minimum or above the maximum is InvalidArgument naming `field`."""
        if asked == 0:
            return self.default
        if asked < self.minimum:
            raise InvalidArgument(
                field, f"must be at least {self.minimum} tokens (0 = default {self.default}), got {asked}"
            )
        if asked > self.maximum:
            raise InvalidArgument(field, f"must be at most {self.maximum} tokens, got {asked}")
        return asked
