"""A scripted LLM port for the engine's unit tests (imported by conftest.py and the tests): answers per phase (by `schema_name`), can fail or delay
chosen calls, counts tokens, and records every request and the peak concurrency."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.llm import LLMRequest, LLMResponse, TokenUsage
from services.deliberation.domain import Role, Task, TaskConstraints

PROPOSAL = """## Proposal by {agent}

Parse ISO dates strictly and return a `date`; tests cover invalid input.

```python
from datetime import date


def parse_iso(text: str) -> date:
    return date.fromisoformat(text.strip())
```

Tests: `parse_iso("2024-02-29")` works, `parse_iso("nope")` raises ValueError.
"""


def parts(request: LLMRequest) -> dict[str, str]:
    """The pieces of a request id "<deliberation>:<phase>:<round>:<agent>[:<target>]" (test ids have no ':')."""
    keys = ("deliberation", "phase", "round", "agent", "target")
    return dict(zip(keys, request.request_id.split(":"), strict=False))


def candidate_labels(request: LLMRequest) -> list[str]:
    return list((request.json_schema or {}).get("properties", {}))


def candidates_shown(request: LLMRequest) -> dict[str, str]:
    """label -> the author named in the candidate's content ("Proposal by agent-...")."""
    text = request.messages[-1].content
    out = {}
    for label, body in re.findall(r"## Candidate (\w)\n(.*?)(?=\n## Candidate |\Z)", text, re.S):
        found = re.search(r"by (agent-[\w-]+)", body)
        out[label] = found.group(1) if found else "?"
    return out


def default_scores(request: LLMRequest) -> str:
    schema = request.json_schema or {}
    out = {}
    for label, sub in schema["properties"].items():
        keys = [k for k in sub["properties"] if k != "reason"]
        out[label] = {**dict.fromkeys(keys, 7), "reason": "solid"}
    return json.dumps(out)


def default_answer(request: LLMRequest) -> str:
    agent = parts(request).get("agent", "?")
    if request.schema_name == "proposal":
        return PROPOSAL.format(agent=agent)
    if request.schema_name == "revision":
        previous = request.messages[2].content  # system, generate instruction, the current proposal, critique
        return f"{previous}\n\nRevision {previous.count('Revision ') + 1}: added a docstring."
    if request.schema_name == "critique":
        return json.dumps({"verdict": "revise", "summary": "Mostly fine.", "issues": ["Add a docstring."]})
    if request.schema_name == "scores":
        return default_scores(request)
    if request.schema_name == "selection":
        labels = request.json_schema["properties"]["winner"]["enum"]
        return json.dumps({"winner": labels[0], "rationale": "Clearest and best tested."})
    raise AssertionError(f"unexpected schema {request.schema_name}")


@dataclass
class ScriptedLLM:
    """`answers[schema_name](request) -> text` overrides the defaults; `fail(request)` returns an exception to
    raise (or None); `delay` is seconds per call (or a function of the request); `tokens` per call."""

    answers: dict[str, Callable[[LLMRequest], str]] = field(default_factory=dict)
    fail: Callable[[LLMRequest], BaseException | None] = lambda _: None
    delay: float | Callable[[LLMRequest], float] = 0.0
    tokens: tuple[int, int] = (20, 10)
    requests: list[LLMRequest] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    peak_by_schema: Counter = field(default_factory=Counter)  # most calls of one schema (phase) at once
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (schema, start, end) per call

    async def complete(self, request: LLMRequest, on_delta: Any = None) -> LLMResponse:
        self.requests.append(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        schema, start = request.schema_name, time.perf_counter()
        self._now[schema] += 1
        self.peak_by_schema[schema] = max(self.peak_by_schema[schema], self._now[schema])
        try:
            delay = self.delay(request) if callable(self.delay) else self.delay
            if delay:
                await asyncio.sleep(delay)
            if (error := self.fail(request)) is not None:
                raise error
            answer = self.answers.get(request.schema_name, default_answer)(request)
            return LLMResponse(answer, TokenUsage(*self.tokens), model="scripted", finish_reason="stop")
        finally:
            self.active -= 1
            self._now[schema] -= 1
            self.spans.append((schema, start, time.perf_counter()))

    def __post_init__(self) -> None:
        self._now: Counter = Counter()

    def by_schema(self, schema_name: str) -> list[LLMRequest]:
        return [r for r in self.requests if r.schema_name == schema_name]


def make_task(**constraints: Any) -> Task:
    requirements = constraints.pop("requirements", ("tests",))
    return Task(
        task_id="T-1",
        description="Write a Python function that parses ISO dates, with tests.",
        role=Role.DEV,
        constraints=TaskConstraints.for_role(Role.DEV, requirements=requirements, **constraints),
        story_id="S-1",
        context="The service already uses pydantic.",
        context_version="v7",
    )
