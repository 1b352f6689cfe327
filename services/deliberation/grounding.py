"""Grounding: a proposal's code is executed against tests in the sandbox, and what happens becomes checks.

`ProposalChecker.check(task, content)` is the engine's checker (its `Checker` port): the static checks of
checks.py (in a thread) plus, for a code task (`Task.is_code_task`),

  deliverable   the proposal contains its code in a ```python block (a code task answered without code fails here,
                never "nothing to check")
  tests.task    the task's visible tests (test_task.py) run against the proposal's code saved as solution.py
  tests.own     the tests the proposal wrote (its `def test_...` functions) run against the same code

Both test checks come from one sandbox execution; failing cases become findings (test name and assertion), which
the critic and the author are shown. The code never runs here: it is sent to the sandbox service (the `Sandbox`
port, services/common/sandbox.py over gRPC), the only process that executes it. A sandbox that is down or busy
makes the test checks fail with "sandbox unavailable" (the deliberation is then not verified), never a crash.

Which block is what (the one rule): among the proposal's Python blocks, one whose top-level functions are all
`test_*` is a test block; every other block is code. solution.py is the code the task builds on (`Task.base_code`:
its dependencies' winning code — a QA task tests DEV's code — or a stub's imports and helpers) followed by the
code blocks joined. The test blocks, or the test functions inside the code, are the proposal's own tests
(test_proposal.py). A test block that imports the code under another module name (`from slugify import slugify`)
gets that module as a copy of solution.py.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import FleetError
from services.common.execution import Execution, ExecutionResult, Outcome, TestCase
from services.deliberation.checks import CodeBlock, extract_blocks, parse_python, run_checks
from services.deliberation.domain import CheckResult, Finding, Task

log = logging.getLogger("fleet.deliberation.grounding")

SOLUTION = "solution.py"
TASK_TESTS = "test_task.py"
OWN_TESTS = "test_proposal.py"
MAX_FINDINGS = 5
MESSAGE_MAX = 300
_NOT_ALIASED = frozenset({"pytest", "solution", "hypothesis", *sys.stdlib_module_names})


class Sandbox(Protocol):
    """Executes code against tests, isolated (services/common/sandbox.py's SandboxClient). Raises a FleetError
    (Unavailable, ResourceExhausted, InvalidArgument) when it cannot."""

    async def execute(self, execution: Execution) -> ExecutionResult: ...


@dataclass(frozen=True)
class Program:
    """What a proposal gives the sandbox: the code, its own tests, and module aliases for those tests."""

    code: str  # solution.py: the base code, then the proposal's ("" when there is neither)
    own_tests: str  # test_proposal.py ("" when the proposal wrote no test)
    aliases: tuple[str, ...] = ()  # other module names the own tests import the code under
    from_base: bool = False  # the proposal brought no code: solution.py is the task's base code alone


def _is_test_function(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")


def _python_blocks(content: str) -> list[tuple[CodeBlock, ast.Module]]:
    out = []
    for b in extract_blocks(content):
        if b.language != "python":
            continue
        try:
            out.append((b, parse_python(b.code)))
        except SyntaxError:
            out.append((b, ast.Module(body=[], type_ignores=[])))  # python.syntax reports it; the code still runs
    return out


def program_of(content: str, base_code: str = "") -> Program:
    """The rule of the module docstring: solution.py, test_proposal.py and aliases from a proposal's blocks."""
    code_blocks, test_blocks = [], []
    for block, tree in _python_blocks(content):
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        if functions and all(_is_test_function(n) for n in functions):
            test_blocks.append((block, tree))
        else:
            code_blocks.append((block, tree))
    own_code = "\n\n".join(b.code.rstrip() for b, _ in code_blocks)
    from_base = not own_code.strip() and bool(base_code.strip())
    code = "\n\n".join(part.rstrip() for part in (base_code, own_code) if part.strip())
    own = ""
    aliases: set[str] = set()
    if test_blocks:
        own = "from solution import *  # noqa: F403  (the code under test)\n\n" + "\n\n".join(
            b.code.rstrip() for b, _ in test_blocks
        )
        for _, tree in test_blocks:
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                aliases |= {n for n in names if n.isidentifier() and n not in _NOT_ALIASED}
    elif any(_is_test_function(n) for _, tree in code_blocks for n in tree.body):
        own = "from solution import *  # noqa: F403  (the proposal's tests live in its code)\n"
    if code.strip():
        code = code.rstrip() + "\n"
    return Program(code, own + ("\n" if own and not own.endswith("\n") else ""), tuple(sorted(aliases)), from_base)


def check_deliverable(task: Task, content: str) -> CheckResult:
    if not task.is_code_task:
        return CheckResult("deliverable", True, False, detail="not a code task: no code is required")
    has_python = any(True for _ in _python_blocks(content))
    if has_python:
        return CheckResult("deliverable", True, True, detail="the code is in a ```python block")
    return CheckResult(
        "deliverable",
        False,
        True,
        (Finding("a code task's proposal must contain its code in a ```python block; this one has none"),),
        "looked for a ```python block",
    )


def _trim(text: str, limit: int = MESSAGE_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _case_findings(cases: Sequence[TestCase]) -> tuple[Finding, ...]:
    bad = [c for c in cases if c.outcome in ("failed", "error")]
    found = [Finding(_trim(f"{c.name.split('::', 1)[-1]} {c.outcome}: {c.message or 'no message'}")) for c in bad]
    if len(found) > MAX_FINDINGS:
        found = [*found[:MAX_FINDINGS], Finding(f"... and {len(found) - MAX_FINDINGS} more failing tests")]
    return tuple(found)


def tests_check(name: str, what: str, result: ExecutionResult, file: str) -> CheckResult:
    """One test check from the cases of `file` in an execution (several files may run in one)."""
    cases = [c for c in result.tests.cases if c.file == file]
    passed = sum(c.outcome == "passed" for c in cases)
    ran = sum(c.outcome in ("passed", "failed", "error") for c in cases)
    where = f"sandbox {result.isolation or '?'}, {result.duration_ms:.0f} ms"
    if result.outcome in (Outcome.TIMEOUT, Outcome.KILLED):
        return CheckResult(
            name, False, True, (Finding(_trim(f"{result.outcome}: {result.reason}")),), f"{what} ({where})"
        )
    if ran and passed == ran:
        return CheckResult(name, True, True, (), f"{what}: {passed}/{ran} passed ({where})")
    if ran:
        return CheckResult(name, False, True, _case_findings(cases), f"{what}: {passed}/{ran} passed ({where})")
    # nothing of this file ran: the code or the tests do not import, or collection failed
    why = result.reason or "no test ran"
    detail = _trim(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else ""
    finding = Finding(_trim(f"{result.outcome}: {why}" + (f" ({detail})" if detail and detail not in why else "")))
    return CheckResult(name, False, True, (finding, *_case_findings(result.tests.cases)), f"{what}: none ran ({where})")


class ProposalChecker:
    """The engine's `Checker`: static checks plus the executing checks (module docstring). Without a sandbox
    (SANDBOX_ADDRESS unset), a code task's test checks fail saying so: such a deliberation is never verified."""

    def __init__(self, sandbox: Sandbox | None, *, timeout_seconds: float = 10.0, memory_mb: int = 512) -> None:
        self.sandbox = sandbox
        self.timeout_seconds = timeout_seconds
        self.memory_mb = memory_mb

    async def check(self, task: Task, content: str) -> tuple[CheckResult, ...]:
        static = asyncio.ensure_future(asyncio.to_thread(run_checks, content, task.constraints.requirements))
        try:
            executed = await self._executed(task, content) if task.is_code_task else ()
        finally:
            found = await static
        return (check_deliverable(task, content), *found, *executed)

    async def _executed(self, task: Task, content: str) -> tuple[CheckResult, ...]:
        if not task.constraints.execute:
            off = "execution is off for this task: the code was not run"
            return (
                CheckResult("tests.task", True, False, detail=off),
                CheckResult("tests.own", True, False, detail=off),
            )
        program = program_of(content, task.base_code)
        tests = task.constraints.tests
        what_own = "the proposal's own tests" + (" against the code it builds on" if program.from_base else "")
        if not program.code.strip():
            return (
                CheckResult("tests.task", False, bool(tests), (Finding("no code to run the task's tests on"),)),
                CheckResult("tests.own", True, False, detail="no code and no code to build on: nothing to run"),
            )
        test_files = {}
        if tests.strip():
            test_files[TASK_TESTS] = tests
        if program.own_tests.strip():
            test_files[OWN_TESTS] = program.own_tests
        if not test_files:
            return (
                CheckResult("tests.task", True, False, detail="the task has no tests"),
                CheckResult("tests.own", True, False, detail="the proposal wrote no test (def test_...)"),
            )
        files = {SOLUTION: program.code, **{f"{m}.py": program.code for m in program.aliases}}
        execution = Execution(
            files=files, test_files=test_files, timeout_seconds=self.timeout_seconds, memory_mb=self.memory_mb
        )
        try:
            if self.sandbox is None:
                raise FleetError("no sandbox configured (SANDBOX_ADDRESS): the code was not executed")
            result = await self.sandbox.execute(execution)
        except FleetError as e:
            log.warning("task %s: the proposal's code was not executed: %s", task.task_id, e.message)
            finding = (Finding(_trim(f"sandbox unavailable: {e.message}")),)
            return tuple(
                CheckResult(name, False, True, finding, "not executed")
                for name, file in (("tests.task", TASK_TESTS), ("tests.own", OWN_TESTS))
                if file in test_files
            ) + tuple(
                CheckResult(name, True, False, detail=why)
                for name, file, why in (
                    ("tests.task", TASK_TESTS, "the task has no tests"),
                    ("tests.own", OWN_TESTS, "the proposal wrote no test (def test_...)"),
                )
                if file not in test_files
            )
        out = []
        if TASK_TESTS in test_files:
            out.append(tests_check("tests.task", "the task's tests", result, TASK_TESTS))
        else:
            out.append(CheckResult("tests.task", True, False, detail="the task has no tests"))
        if OWN_TESTS in test_files:
            out.append(tests_check("tests.own", what_own, result, OWN_TESTS))
        else:
            out.append(CheckResult("tests.own", True, False, detail="the proposal wrote no test (def test_...)"))
        return tuple(out)
