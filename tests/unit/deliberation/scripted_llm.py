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

from services.common.errors import Unavailable
from services.common.execution import Execution, ExecutionResult, Outcome, TestCase, TestCounts
from services.deliberation.domain import Role, Task, TaskConstraints
from services.deliberation.llm import LLMRequest, LLMResponse, TokenUsage

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
        return json.dumps(
            {"winner": labels[0], "rationale": "The clearest proposal of the finalists, and the best tested."}
        )
    raise AssertionError(f"unexpected schema {request.schema_name}")


@dataclass
class ScriptedLLM:
    """`answers[schema_name](request) -> text` overrides the defaults; `fail(request)` returns an exception to
    raise (or None); `delay` is seconds per call (or a function of the request); `tokens` per call."""

    answers: dict[str, Callable[[LLMRequest], str]] = field(default_factory=dict)
    fail: Callable[[LLMRequest], BaseException | None] = lambda _: None
    delay: float | Callable[[LLMRequest], float] = 0.0
    tokens: tuple[int, int] = (20, 10)
    finish: Callable[[LLMRequest], str] = lambda _: "stop"
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
            return LLMResponse(answer, TokenUsage(*self.tokens), model="scripted", finish_reason=self.finish(request))
        finally:
            self.active -= 1
            self._now[schema] -= 1
            self.spans.append((schema, start, time.perf_counter()))

    def __post_init__(self) -> None:
        self._now: Counter = Counter()

    def by_schema(self, schema_name: str) -> list[LLMRequest]:
        return [r for r in self.requests if r.schema_name == schema_name]


def make_task(base_code: str = "", **constraints: Any) -> Task:
    requirements = constraints.pop("requirements", ("tests",))
    return Task(
        task_id="T-1",
        description="Write a Python function that parses ISO dates, with tests.",
        role=Role.DEV,
        constraints=TaskConstraints.for_role(Role.DEV, requirements=requirements, **constraints),
        story_id="S-1",
        context="The service already uses pydantic.",
        context_version="v7",
        base_code=base_code,
    )


TASK_TESTS = """from solution import parse_iso


def test_parses_a_date():
    assert parse_iso("2024-02-29").day == 29


def test_rejects_garbage():
    import pytest

    with pytest.raises(ValueError):
        parse_iso("nope")
"""


@dataclass
class ScriptedSandbox:
    """The engine's sandbox port, scripted: it never runs anything (the real one is tested against real bwrap in
    tests/integration/sandbox). Every test function of the files "passes", except that code containing a
    `# BUG` marker fails every test of test_task.py; `down` makes it unavailable."""

    down: bool = False
    executions: list[Execution] = field(default_factory=list)

    async def execute(self, execution: Execution) -> ExecutionResult:
        self.executions.append(execution)
        if self.down:
            raise Unavailable("sandbox at 127.0.0.1:9: UNAVAILABLE: connection refused")
        buggy = "# BUG" in execution.files.get("solution.py", "")
        cases = []
        for path, source in sorted(execution.test_files.items()):
            for name in re.findall(r"^(?:async )?def (test\w*)", source, re.M):
                failed = buggy and path == "test_task.py"
                message = "AssertionError: assert 28 == 29" if failed else ""
                cases.append(TestCase(f"{path}::{name}", "failed" if failed else "passed", message))
        own = execution.test_files.get("test_proposal.py", "")
        if "from solution import *" in own:  # the proposal's tests live in solution.py: collected through the import
            for name in re.findall(r"^def (test\w*)", execution.files["solution.py"], re.M):
                cases.append(TestCase(f"test_proposal.py::{name}", "passed"))
        counts = TestCounts.of(cases)
        outcome = Outcome.FAILED if counts.failed else Outcome.PASSED if counts.passed else Outcome.ERROR
        return ExecutionResult(outcome, int(outcome != Outcome.PASSED), counts, duration_ms=12.0, isolation="scripted")
