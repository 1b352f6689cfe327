"""Prompts, the bounded JSON schemas of the machine-read answers, and their tolerant parsers.

Every call of a deliberation starts with the same system message (role, task, its tests, the code it builds on,
requirements, context), so vLLM's prefix cache serves it to the whole council and to the architect. The user
message goes from shared to specific: the task first (every call); in the phases that read the council's work
(CRITIQUE, SCORE, SELECT) then the rubric (shared by all three) and, in CRITIQUE and SCORE, the phase's
instructions (shared by its three calls, `_brief`); then the material one call reads (a proposal, what the checks
found, the candidates); the agent's id and persona last (SELECT, one call, keeps its instructions at the very end). REVISE replays its author's own GENERATE turn, whose KV the cache still holds. Measured with the real
vLLM in bench/bench_prefix_cache.py (results/prefix_cache.md). Written for small models: short, code-first, one
deliverable per answer.

Every prompt fits the served model's context window (`fit_prompt`, when the engine knows the window): the
material it carries (the context, proposals, what the checks found, a critique) is cut to its head, longest
first, with a visible marker; the task, its tests, the rubric and the instructions are never cut. A prompt that
cannot fit even so raises `ContextOverflow` with the numbers, and is never sent.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.deliberation.domain import AgentSpec, CheckResult, Criterion, Role, Task
from services.deliberation.llm import ChatMessage, ContextOverflow, ContextWindow, TokenCounter

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
RATIONALE_MIN = 30  # "C" is not a rationale: at least a sentence (and at least RATIONALE_MIN_WORDS words)
RATIONALE_MIN_WORDS = 3
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


def system_prompt(task: Task, context: str | None = None) -> str:
    """The shared prefix's first message, identical for every call of one deliberation: who the agents are and what
    the code must satisfy (the task's tests, the code it builds on), then the context. The task itself opens every
    user message (`task_block`): measured with SmolLM2-135M (bench/bench_prompts.py), a task put in the system
    message is all but ignored by a small model (25% of answers parsed, 0 of 40 HumanEval problems solved), while
    the same task first in the user message matches a plain "complete this function" prompt. `context` replaces
    the task's context (trimmed to fit the model's window)."""
    c = task.constraints
    context = task.context if context is None else context
    parts = [f"You are a member of the {task.role} council of SWE AI Fleet. {ROLE_DESCRIPTIONS[task.role]}"]
    if c.tests.strip():
        parts.append(f"The code is saved as solution.py and must pass these tests:\n```python\n{c.tests.strip()}\n```")
    if task.base_code.strip():
        parts.append(
            "It builds on this code, which solution.py already holds (what you write is added after it):\n"
            f"```python\n{task.base_code.strip()}\n```"
        )
    if context.strip():
        version = f" (version {task.context_version})" if task.context_version else ""
        parts.append(f"Context{version}:\n{context.strip()}")
    if not task.is_code_task:
        parts.append(
            "Rules: artefacts in fenced blocks tagged with their language (```yaml, ```json, ```sql); no real "
            "secrets, credentials or tokens (placeholders or environment references); container images carry a "
            "pinned tag; no privileged containers."
        )
    return "\n\n".join(parts)


def task_block(task: Task) -> str:
    """The task, first in every user message (after the system message: still one prefix the council shares)."""
    requirements = "".join(f"\n- {r}" for r in task.constraints.requirements)
    return f"Task {task.task_id}: {task.description.strip()}" + (
        f"\nRequirements:{requirements}" if requirements else ""
    )


def _you(agent: AgentSpec, what: str) -> str:
    return f"You are {agent.agent_id}, {what}. Your emphasis: {agent.persona}"


def deliverable(task: Task) -> str:
    """What an answer must be, in one line (GENERATE and REVISE say the same). For code, the plain prompt's wording
    a small model follows best (bench/bench_prompts.py)."""
    if task.is_code_task and task.role == Role.QA and not task.constraints.tests.strip():
        return (
            "one ```python block of pytest tests (def test_... functions) for the code in solution.py "
            "(`from solution import ...`), and nothing else"
        )
    if task.is_code_task:
        tests = "" if task.constraints.tests.strip() else " followed by a few pytest tests for it (def test_...)"
        return f"one ```python block containing the complete function{tests}, and nothing else"
    return (
        "a short approach in a few bullets, the artefact itself in fenced blocks (```yaml, ```json, ```sql ...), "
        "then the risks in one or two lines"
    )


# A code answer is one block: stopping at its closing fence saves the tokens a small model spends on repeating it.
CODE_STOP = ("\n```\n",)


def stop_sequences(task: Task) -> tuple[str, ...]:
    return CODE_STOP if task.is_code_task else ()


def generate_instruction(task: Task, agent: AgentSpec) -> str:
    return f"{task_block(task)}\n\nYou are {agent.agent_id}. Your emphasis: {agent.persona}\nAnswer with {deliverable(task)}."


def generate_messages(system: str, task: Task, agent: AgentSpec) -> tuple[ChatMessage, ...]:
    return (ChatMessage("system", system), ChatMessage("user", generate_instruction(task, agent)))


CHECKS_FINDINGS_SHOWN = 3


def checks_summary(checks: Sequence[CheckResult]) -> str:
    """What the checks found, for an agent to read: each failing check with its first findings (the failing tests
    and their assertions), then the passing ones on one line."""
    applicable = [c for c in checks if c.applicable]
    if not applicable:
        return "- nothing was checked"
    lines = []
    for c in applicable:
        if c.passed:
            continue
        shown = "; ".join(f.message for f in c.findings[:CHECKS_FINDINGS_SHOWN]) or c.detail
        more = f" (+{len(c.findings) - CHECKS_FINDINGS_SHOWN} more)" if len(c.findings) > CHECKS_FINDINGS_SHOWN else ""
        lines.append(
            f"- FAILED {c.name}{' (' + c.detail + ')' if c.detail and c.name.startswith('tests.') else ''}: "
            f"{shown}{more}"
        )
    passed = [c.name + (f" ({c.detail})" if c.name.startswith("tests.") else "") for c in applicable if c.passed]
    if passed:
        lines.append(f"- passed: {', '.join(passed)}")
    return "\n".join(lines)


def _rubric(rubric: Sequence[Criterion]) -> str:
    keys = criterion_keys(rubric)
    return "\n".join(f"- {k}: {c.description or c.name}" for k, c in zip(keys, rubric, strict=True))


JSON_ONLY = "Answer with the JSON object only."


def _head(task: Task) -> str:
    """How a reading phase's user message opens: the task and the rubric, the same in CRITIQUE, SCORE and SELECT."""
    return f"{task_block(task)}\n\n## Rubric\n{_rubric(task.constraints.rubric)}\n\n"


def _brief(task: Task, instructions: str) -> str:
    """`_head` and the phase's instructions (the same for all its calls), ahead of the material and the agent, so
    the cache serves all of it to every call of the phase (bench/bench_prefix_cache.py)."""
    return f"{_head(task)}{instructions} {JSON_ONLY}"


def critique_messages(
    system: str,
    task: Task,
    critic: AgentSpec,
    content: str,
    checks: Sequence[CheckResult] = (),
    *,
    findings: str | None = None,
) -> tuple[ChatMessage, ...]:
    """`findings` replaces `checks_summary(checks)` (trimmed to fit the model's window)."""
    findings = checks_summary(checks) if findings is None else findings
    brief = _brief(
        task,
        "Review the proposal below, written by a peer. "
        "verdict: 'accept' if it can ship as it is, 'revise' otherwise (always 'revise' when a check failed). "
        f"summary: one or two sentences (at most {SUMMARY_MAX} characters). issues: at most {ISSUES_MAX} concrete "
        f"problems, most important first, each at most {ISSUE_MAX} characters (a failing test: say what the code "
        "must do instead).",
    )
    user = (
        f"{brief}\n\n## Proposal under review (written by a peer)\n{content.strip()}\n\n"
        f"## What the checks found (the code was run against the tests)\n{findings}\n\n"
        f"{_you(critic, 'reviewing this proposal')}\n{JSON_ONLY}"
    )
    return (ChatMessage("system", system), ChatMessage("user", user))


def review_text(verdict: str, summary: str, issues: Sequence[str]) -> str:
    listed = "\n".join(f"- {i}" for i in issues) or "- (no specific issue)"
    return f"Verdict: {verdict}.\nSummary: {summary}\nIssues:\n{listed}"


def revise_messages(
    system: str,
    task: Task,
    author: AgentSpec,
    current: str,
    verdict: str,
    summary: str,
    issues: Sequence[str],
    checks: Sequence[CheckResult] = (),
    *,
    findings: str | None = None,
    review: str | None = None,
) -> tuple[ChatMessage, ...]:
    """The author's own generation turn replayed (so its prefix is cached too), then the evidence and the critique.
    `findings` and `review` replace `checks_summary(checks)` and `review_text(...)` (trimmed to fit the window)."""
    findings = checks_summary(checks) if findings is None else findings
    review = review_text(verdict, summary, issues) if review is None else review
    user = (
        f"What the checks found when your proposal was run:\n{findings}\n\n"
        f"A peer reviewed it. {review}\n\n"
        "Fix what the checks and the review show is wrong, keep what works. Answer with the complete revised "
        f"proposal (not a diff): {deliverable(task)}."
    )
    return (
        ChatMessage("system", system),
        ChatMessage("user", generate_instruction(task, author)),
        ChatMessage("assistant", current.strip()),
        ChatMessage("user", user),
    )


def score_messages(
    system: str, task: Task, voter: AgentSpec, candidates: Sequence[tuple[str, str]]
) -> tuple[ChatMessage, ...]:
    """`candidates`: (label, content) in the order this voter sees them."""
    shown = "\n\n".join(f"## Candidate {label}\n{content.strip()}" for label, content in candidates)
    keys = ", ".join(criterion_keys(task.constraints.rubric))
    brief = _brief(
        task,
        f"Score every candidate below ({', '.join(label for label, _ in candidates)}), each written by a peer, on "
        f"each rubric criterion ({keys}) with an integer from {SCORE_MIN} (poor) to {SCORE_MAX} (excellent), "
        "judging the content only; the labels and the order mean nothing. Give each a reason of at most "
        f"{REASON_MAX} characters.",
    )
    user = f"{brief}\n\n{shown}\n\n{_you(voter, 'scoring proposals written by your peers')}\n{JSON_ONLY}"
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


def select_messages(
    system: str, task: Task, architect: AgentSpec, finalists: Sequence[Finalist]
) -> tuple[ChatMessage, ...]:
    parts = []
    for f in finalists:
        failed = f"; failed checks: {', '.join(f.failed_checks)}" if f.failed_checks else ""
        parts.append(
            f"## Candidate {f.label} (combined score {f.score:.2f}/10, peer score {f.peer_score:.2f}, "
            f"checks {f.checks_passed}/{f.checks_applicable} passed{failed})\n{f.content.strip()}"
        )
    # One call: its instructions stay last, where a small model follows them best (no other call would share them).
    user = (
        f"{_head(task)}The council's finalists, best scored first:\n\n" + "\n\n".join(parts) + "\n\n"
        f"{_you(architect, 'the ARCHITECT who decides this deliberation')}\n"
        "Pick the candidate that best solves the task under the rubric and the requirements; the scores advise, "
        f"you decide. winner: the candidate's label. rationale: why, at most {RATIONALE_MAX} characters. {JSON_ONLY}"
    )
    return (ChatMessage("system", system), ChatMessage("user", user))


# --- fitting the model's window ---------------------------------------------------------------------------------

TRIM_MARKER = "[... {trimmed:,} tokens trimmed to fit the model's {window:,}-token window ...]"
MIN_KEPT = 32  # tokens a cut text keeps at least (its head: a signature, a first sentence)
_FIT_ATTEMPTS = 4  # token counts of joined texts differ from their sum by a few: re-cut by the difference


@dataclass(frozen=True)
class Fitted:
    messages: tuple[ChatMessage, ...]
    tokens: int  # the prompt as counted against the window
    trimmed: int = 0  # tokens cut from the material, in all
    texts_cut: int = 0


def fit_prompt(
    build: Callable[[list[str]], tuple[ChatMessage, ...]],
    texts: Sequence[str],
    window: ContextWindow,
    max_tokens: int,
    what: str = "the prompt",
) -> Fitted:
    """`build(texts)` with the texts cut so that the prompt leaves `max_tokens` for the answer in the window.

    Everything `build` adds around the texts is never cut; the texts share what is left as water fills vessels:
    the short ones whole, the long ones cut to one common length, each keeping its head and ending with
    `TRIM_MARKER`. Raises `ContextOverflow` naming `what` and the numbers when even `MIN_KEPT` tokens of each
    text do not fit."""
    budget = window.prompt_budget(max_tokens)
    messages = build(list(texts))
    total = window.prompt_tokens(messages)
    if total <= budget:
        return Fitted(messages, total)
    counter = window.counter
    fixed = window.prompt_tokens(build([""] * len(texts)))
    counts = [counter.count(t) for t in texts]
    marker = counter.count(TRIM_MARKER.format(trimmed=max(counts, default=0), window=window.tokens)) + 1
    room = budget - fixed
    for _ in range(_FIT_ATTEMPTS):
        level = _level(counts, room, marker) if texts else None
        if level is None:
            break
        cut = [
            _cut(t, level, c, counter, window.tokens) if c > level + marker else (t, 0)
            for t, c in zip(texts, counts, strict=True)
        ]
        messages = build([t for t, _ in cut])
        total = window.prompt_tokens(messages)
        if total <= budget:
            return Fitted(messages, total, sum(n for _, n in cut), sum(n > 0 for _, n in cut))
        room -= total - budget
    least = sum(min(c, MIN_KEPT + marker) for c in counts)
    raise ContextOverflow(
        f"{what} does not fit the model's {window.tokens:,}-token window: {fixed:,} tokens that are never cut "
        f"(task, tests, rubric, instructions) + at least {least:,} of the {sum(counts):,} tokens of material "
        f"({len(texts)} text{'s' * (len(texts) != 1)}, cut to {MIN_KEPT} tokens each) + {max_tokens:,} for the "
        f"answer (max_tokens) > {window.tokens:,}",
        metadata={"window": str(window.tokens), "fixed": str(fixed), "max_tokens": str(max_tokens)},
    )


def _level(counts: Sequence[int], room: int, marker: int) -> int | None:
    """The largest length L (>= MIN_KEPT) such that the texts, each whole when it has at most L + marker tokens
    and else cut to L plus the marker, take at most `room` tokens; None when none does."""

    def cost(level: int) -> int:
        return sum(c if c <= level + marker else level + marker for c in counts)

    if cost(MIN_KEPT) > room:
        return None
    lo, hi = MIN_KEPT, max(max(counts, default=0), MIN_KEPT)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cut(text: str, keep: int, count: int, counter: TokenCounter, window: int) -> tuple[str, int]:
    """The head of `text` with at most `keep` tokens (at a line end when one is near), then the marker; and how
    many tokens were cut."""
    lo, hi = 0, len(text)
    guess = min(hi, len(text) * keep // max(count, 1))
    if counter.count(text[:guess]) <= keep:
        lo = guess
    else:
        hi = guess
    while lo < hi:  # the longest prefix that fits
        mid = (lo + hi + 1) // 2
        if counter.count(text[:mid]) <= keep:
            lo = mid
        else:
            hi = mid - 1
    head = text[:lo]
    line_end = head.rfind("\n")
    if line_end >= len(head) * 3 // 4:
        head = head[:line_end]
    head = head.rstrip()
    trimmed = max(1, count - counter.count(head))
    return f"{head}\n{TRIM_MARKER.format(trimmed=trimmed, window=window)}", trimmed


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
    return _object(
        {
            "winner": {"type": "string", "enum": list(candidate_labels)},
            "rationale": _string(RATIONALE_MAX, RATIONALE_MIN),
        }
    )


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


def parse_scores(
    text: str, candidate_labels: Sequence[str], keys: Sequence[str]
) -> tuple[list[ScoreAnswer], list[tuple[str, str]]]:
    """The scores of the candidates answered validly, and (label, problem) for each candidate whose score was
    unusable (so the caller can record it); none valid is an AnswerError."""
    data = parse_json(text)
    if isinstance(data.get("scores"), dict) and not any(label in data for label in candidate_labels):
        data = data["scores"]  # tolerate a wrapper object
    out: list[ScoreAnswer] = []
    problems: list[tuple[str, str]] = []
    for label in candidate_labels:
        entry = data.get(label)
        if not isinstance(entry, dict):
            problems.append((label, f"no scores for candidate {label}"))
            continue
        try:
            scores = {k: _integer(entry.get(k), f"{label}.{k}") for k in keys}
            reason = _text(entry, "reason", REASON_MAX, required=False)
        except AnswerError as e:
            problems.append((label, str(e)))
            continue
        out.append(ScoreAnswer(label, scores, reason))
    if not out:
        raise AnswerError("; ".join(p for _, p in problems) or "no candidate scored")
    return out, problems


@dataclass(frozen=True)
class SelectionAnswer:
    label: str
    rationale: str


def parse_selection(text: str, candidate_labels: Sequence[str]) -> SelectionAnswer:
    """The winner must be a label the architect was shown, with a real reason: at least RATIONALE_MIN characters
    and RATIONALE_MIN_WORDS words."""
    data = parse_json(text)
    raw = str(data.get("winner", "")).strip()
    label = re.sub(r"(?i)^candidate\s+", "", raw).strip().upper()
    if label not in candidate_labels:
        raise AnswerError(f"'winner' must be one of {', '.join(candidate_labels)}, got {raw!r:.40}")
    rationale = _text(data, "rationale", RATIONALE_MAX)
    if len(rationale) < RATIONALE_MIN or len(rationale.split()) < RATIONALE_MIN_WORDS:
        raise AnswerError(
            f"'rationale' must give a reason (at least {RATIONALE_MIN} characters, {RATIONALE_MIN_WORDS} words), "
            f"got {rationale!r:.80}"
        )
    return SelectionAnswer(label, rationale)
