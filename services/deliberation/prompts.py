"""Prompts, the bounded JSON schemas of the machine-read answers, and their tolerant parsers.

Every call of a deliberation starts with the same system message (role, task, rubric, requirements, context),
so vLLM's prefix cache serves it to the whole council and to the architect; what is specific to one agent and
one phase (material to read, persona, instruction) comes last, in the user message.

Schemas stay in a small JSON-Schema subset that guided decoding and the loopback test server both honour:
object (properties, required, additionalProperties false), array (items, minItems, maxItems), string (enum,
minLength, maxLength), integer (minimum, maximum), boolean. Everything is bounded: small models loop on
unbounded strings and numbers. Parsers strip ``` fences, take the first {...}, and check the bounds again
(guided decoding may be off): out-of-range integers, unknown enum values and missing fields make the answer
invalid (`AnswerError`); overlong strings and lists are cut to their bounds.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.llm import ChatMessage
from services.deliberation.domain import AgentSpec, Criterion, Role, Task

# LLMRequest.schema_name per phase (free-text phases name theirs too, so fakes and logs can tell them apart).
SCHEMA_PROPOSAL = "proposal"  # GENERATE: free text (markdown, code in fenced blocks)
SCHEMA_CRITIQUE = "critique"  # CRITIQUE: {verdict, summary, issues}
SCHEMA_REVISION = "revision"  # REVISE: free text, the complete revised proposal
SCHEMA_SCORES = "scores"  # SCORE: {<label>: {<criterion>: 1..10, reason}} for every candidate shown
SCHEMA_SELECTION = "selection"  # SELECT: {winner: label, rationale}

SUMMARY_MAX = 300
ISSUE_MAX = 200
ISSUES_MAX = 5
REASON_MAX = 200
RATIONALE_MAX = 600
SCORE_MIN, SCORE_MAX = 1, 10
VERDICTS = ("accept", "revise")
LABELS = string.ascii_uppercase

ROLE_DESCRIPTIONS: dict[Role, str] = {
    Role.DEV: "Software developers: you design and write production code that is correct, readable and tested.",
    Role.QA: "Quality engineers: you design test strategies, test cases and automated tests that find defects.",
    Role.ARCHITECT: "Software architects: you shape structure, boundaries, contracts and trade-offs.",
    Role.DEVOPS: "DevOps engineers: you build, deploy and operate: Kubernetes manifests, CI/CD, observability.",
    Role.DATA: "Data engineers: you design schemas, migrations, queries and pipelines, and guard data quality.",
}


class AnswerError(ValueError):
    """A machine-read answer that is not what the schema asked for."""


def labels(n: int) -> list[str]:
    if not 0 <= n <= len(LABELS):
        raise ValueError(f"at most {len(LABELS)} candidates, got {n}")
    return list(LABELS[:n])


def criterion_keys(rubric: Sequence[Criterion]) -> list[str]:
    """JSON keys for the rubric's criteria: lower-case, [a-z0-9_], unique, in rubric order."""
    keys: list[str] = []
    for i, c in enumerate(rubric, start=1):
        key = re.sub(r"[^a-z0-9]+", "_", c.name.lower()).strip("_")[:40] or f"criterion_{i}"
        while key in keys:
            key += f"_{i}"
        keys.append(key)
    return keys


# --- messages ---------------------------------------------------------------------------------------------------


def system_prompt(task: Task) -> str:
    """The shared prefix: identical for every call of one deliberation."""
    c = task.constraints
    keys = criterion_keys(c.rubric)
    rubric = "\n".join(f"- {k}: {cr.description or cr.name}" for k, cr in zip(keys, c.rubric, strict=True))
    requirements = "\n".join(f"- {r}" for r in c.requirements) or "- (none beyond the task)"
    parts = [
        f"You are an agent of SWE AI Fleet on the {task.role} council. {ROLE_DESCRIPTIONS[task.role]}",
        "Several agents solve the same task independently, review and revise each other's proposals, and score "
        "them against the rubric; an ARCHITECT agent picks the winner.",
        f"## Task {task.task_id}\n{task.description.strip()}",
        f"## Rubric\n{rubric}",
        f"## Requirements\n{requirements}",
    ]
    if task.context.strip():
        version = f" (version {task.context_version})" if task.context_version else ""
        parts.append(f"## Context{version}\n{task.context.strip()}")
    parts.append(
        "## Rules\n"
        "- Proposals are markdown: a short approach, the implementation with every piece of code in a fenced "
        "block tagged with its language (```python, ```yaml, ```json), then risks and how to verify.\n"
        "- Never write real secrets, credentials or tokens: use placeholders or environment references.\n"
        "- Container images carry a pinned tag; no privileged containers.\n"
        "- When asked for JSON, answer with the JSON object only."
    )
    return "\n\n".join(parts)


def _you(agent: AgentSpec, what: str) -> str:
    return f"You are {agent.agent_id}, {what}. Your emphasis: {agent.persona}"


def generate_instruction(task: Task, agent: AgentSpec) -> str:
    return (
        f"Write your proposal for task {task.task_id}.\n\n"
        f"{_you(agent, f'a member of the {task.role} council')}\n"
        "Be concrete and concise: the approach in a few bullets, the implementation (code in fenced blocks), "
        "then risks and tests. Cover every requirement explicitly."
    )


def generate_messages(system: str, task: Task, agent: AgentSpec) -> tuple[ChatMessage, ...]:
    return (ChatMessage("system", system), ChatMessage("user", generate_instruction(task, agent)))


def critique_messages(system: str, critic: AgentSpec, content: str) -> tuple[ChatMessage, ...]:
    user = (
        f"## Proposal under review (written by a peer)\n{content.strip()}\n\n"
        f"{_you(critic, 'reviewing this proposal')}\n"
        "Review it against the rubric and the requirements. verdict: 'accept' if it can ship as it is, 'revise' "
        f"otherwise. summary: one or two sentences (at most {SUMMARY_MAX} characters). issues: at most "
        f"{ISSUES_MAX} concrete problems, most important first (at most {ISSUE_MAX} characters each). "
        "Answer with the JSON object only."
    )
    return (ChatMessage("system", system), ChatMessage("user", user))


def revise_messages(
    system: str, task: Task, author: AgentSpec, current: str, verdict: str, summary: str, issues: Sequence[str]
) -> tuple[ChatMessage, ...]:
    """The author's own generation turn replayed (so its prefix is cached too), then the critique."""
    listed = "\n".join(f"- {i}" for i in issues) or "- (no specific issue)"
    user = (
        f"A peer reviewed your proposal. Verdict: {verdict}.\nSummary: {summary}\nIssues:\n{listed}\n\n"
        "Revise your proposal: fix the issues that are right, keep what works, and answer with the complete "
        "revised proposal (not a diff), in the same format."
    )
    return (
        ChatMessage("system", system),
        ChatMessage("user", generate_instruction(task, author)),
        ChatMessage("assistant", current.strip()),
        ChatMessage("user", user),
    )


def score_messages(
    system: str, voter: AgentSpec, candidates: Sequence[tuple[str, str]], rubric: Sequence[Criterion]
) -> tuple[ChatMessage, ...]:
    """`candidates`: (label, content) in the order this voter sees them."""
    shown = "\n\n".join(f"## Candidate {label}\n{content.strip()}" for label, content in candidates)
    keys = ", ".join(criterion_keys(rubric))
    user = (
        f"{shown}\n\n"
        f"{_you(voter, 'scoring proposals written by your peers')}\n"
        f"Score every candidate ({', '.join(label for label, _ in candidates)}) on each rubric criterion ({keys}) "
        f"with an integer from {SCORE_MIN} (poor) to {SCORE_MAX} (excellent), judging the content only; the "
        f"labels and the order mean nothing. Give each a reason of at most {REASON_MAX} characters. "
        "Answer with the JSON object only."
    )
    return (ChatMessage("system", system), ChatMessage("user", user))


@dataclass(frozen=True)
class Finalist:
    label: str
    content: str
    score: float
    peer_score: float
    checks_passed: int
    checks_applicable: int
    failed_checks: tuple[str, ...]


def select_messages(system: str, architect: AgentSpec, finalists: Sequence[Finalist]) -> tuple[ChatMessage, ...]:
    parts = []
    for f in finalists:
        failed = f"; failed checks: {', '.join(f.failed_checks)}" if f.failed_checks else ""
        parts.append(
            f"## Candidate {f.label} (combined score {f.score:.2f}/10, peer score {f.peer_score:.2f}, "
            f"checks {f.checks_passed}/{f.checks_applicable} passed{failed})\n{f.content.strip()}"
        )
    user = (
        "The council's finalists, best scored first:\n\n" + "\n\n".join(parts) + "\n\n"
        f"{_you(architect, 'the ARCHITECT who decides this deliberation')}\n"
        "Pick the candidate that best solves the task under the rubric and the requirements; the scores advise, "
        f"you decide. winner: the candidate's label. rationale: why, at most {RATIONALE_MAX} characters. "
        "Answer with the JSON object only."
    )
    return (ChatMessage("system", system), ChatMessage("user", user))


# --- schemas ----------------------------------------------------------------------------------------------------


def _string(max_length: int, min_length: int = 1) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def critique_schema() -> dict[str, Any]:
    return _object(
        {
            "verdict": {"type": "string", "enum": list(VERDICTS)},
            "summary": _string(SUMMARY_MAX),
            "issues": {"type": "array", "items": _string(ISSUE_MAX), "minItems": 0, "maxItems": ISSUES_MAX},
        }
    )


def score_schema(candidate_labels: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """One required object per candidate label, each with every criterion (integer 1..10) and a reason.

    Keyed by label rather than an array of {candidate: enum}: guided decoding then cannot skip or repeat a
    candidate, and the properties come in the order the voter was shown.
    """
    one = _object(
        {
            **{k: {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX} for k in keys},
            "reason": _string(REASON_MAX),
        }
    )
    return _object({label: one for label in candidate_labels})


def score_max_tokens(n_candidates: int, keys: Sequence[str]) -> int:
    """Room for the longest answer `score_schema` allows, counted in characters (a token is at least one), so a
    voter who fills every reason is never cut off: per candidate its label, the reason, each criterion's quoted
    key and two-digit score, the punctuation."""
    return n_candidates * (REASON_MAX + sum(len(k) + 6 for k in keys) + 24) + 16


def selection_schema(candidate_labels: Sequence[str]) -> dict[str, Any]:
    return _object({"winner": {"type": "string", "enum": list(candidate_labels)}, "rationale": _string(RATIONALE_MAX)})


# --- parsing ----------------------------------------------------------------------------------------------------

_FENCED = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)


def parse_json(text: str) -> dict[str, Any]:
    """The JSON object in an answer: fenced or bare, possibly with prose around it."""
    if not isinstance(text, str) or not text.strip():
        raise AnswerError("empty answer")
    candidates = [m.group(1) for m in _FENCED.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        start = candidate.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except ValueError:
                start = candidate.find("{", start + 1)
                continue
            if isinstance(value, dict):
                return value
            start = candidate.find("{", start + 1)
    raise AnswerError(f"no JSON object in the answer: {text.strip()[:120]!r}")


def _text(data: dict[str, Any], key: str, max_length: int, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise AnswerError(f"{key!r} must be a non-empty string, got {value!r:.80}")
    value = " ".join(value.split())
    return value if len(value) <= max_length else value[: max_length - 3].rstrip() + "..."


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise AnswerError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise AnswerError(f"{where} must be an integer, got {value!r:.40}")
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise AnswerError(f"{where} must be {SCORE_MIN}..{SCORE_MAX}, got {value}")
    return value


@dataclass(frozen=True)
class CritiqueAnswer:
    verdict: str
    summary: str
    issues: tuple[str, ...]


def parse_critique(text: str) -> CritiqueAnswer:
    data = parse_json(text)
    verdict = str(data.get("verdict", "")).strip().lower()
    if verdict not in VERDICTS:
        raise AnswerError(f"'verdict' must be one of {', '.join(VERDICTS)}, got {data.get('verdict')!r:.40}")
    summary = _text(data, "summary", SUMMARY_MAX)
    raw = data.get("issues", [])
    if not isinstance(raw, list):
        raise AnswerError(f"'issues' must be a list, got {type(raw).__name__}")
    issues = []
    for item in raw:
        if isinstance(item, str) and item.strip():
            issues.append(_text({"issue": item}, "issue", ISSUE_MAX))
    return CritiqueAnswer(verdict, summary, tuple(issues[:ISSUES_MAX]))


@dataclass(frozen=True)
class ScoreAnswer:
    label: str
    scores: dict[str, int]  # criterion key -> 1..10
    reason: str


def parse_scores(text: str, candidate_labels: Sequence[str], keys: Sequence[str]) -> list[ScoreAnswer]:
    """The scores of the candidates answered validly (others are left out); none valid is an AnswerError."""
    data = parse_json(text)
    if isinstance(data.get("scores"), dict) and not any(label in data for label in candidate_labels):
        data = data["scores"]  # tolerate a wrapper object
    out, problems = [], []
    for label in candidate_labels:
        entry = data.get(label)
        if not isinstance(entry, dict):
            problems.append(f"no scores for candidate {label}")
            continue
        try:
            scores = {k: _integer(entry.get(k), f"{label}.{k}") for k in keys}
            reason = _text(entry, "reason", REASON_MAX, required=False)
        except AnswerError as e:
            problems.append(str(e))
            continue
        out.append(ScoreAnswer(label, scores, reason))
    if not out:
        raise AnswerError("; ".join(problems) or "no candidate scored")
    return out


@dataclass(frozen=True)
class SelectionAnswer:
    label: str
    rationale: str


def parse_selection(text: str, candidate_labels: Sequence[str]) -> SelectionAnswer:
    data = parse_json(text)
    raw = str(data.get("winner", "")).strip()
    label = re.sub(r"(?i)^candidate\s+", "", raw).strip().upper()
    if label not in candidate_labels:
        raise AnswerError(f"'winner' must be one of {', '.join(candidate_labels)}, got {raw!r:.40}")
    return SelectionAnswer(label, _text(data, "rationale", RATIONALE_MAX))
