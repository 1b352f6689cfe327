"""Executing code against tests: the vocabulary the sandbox service and its clients share (no I/O).

An `Execution` is what to run (files, pytest files or an entrypoint, limits); an `ExecutionResult` is what
happened (an `Outcome`, per-test cases, capped output, why). The sandbox service (services/sandbox) is the only
process that runs one; the deliberation engine asks for them through its sandbox port, and `fleet eval` scores
answers with them. `Execution.validate()` is the one place the request's bounds are enforced; it raises
`InvalidArgument` naming the field.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from services.common.errors import InvalidArgument

__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_FILES",
    "MAX_TIMEOUT_SECONDS",
    "MAX_TOTAL_BYTES",
    "Execution",
    "ExecutionResult",
    "Outcome",
    "TestCase",
    "TestCounts",
]

LANGUAGES = ("python",)
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = 60.0
DEFAULT_MEMORY_MB = 512
MIN_MEMORY_MB, MAX_MEMORY_MB = 64, 4096
MAX_FILES = 20  # files and test files together
MAX_TOTAL_BYTES = 1 << 20  # all contents together (UTF-8)
MAX_PATH = 100
_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*")


class Outcome(StrEnum):
    PASSED = "PASSED"  # every test ran and passed (at least one), or the script exited 0
    FAILED = "FAILED"  # tests ran and at least one failed, or the script exited non-zero
    ERROR = "ERROR"  # nothing meaningful ran: import errors, no test collected, usage errors
    TIMEOUT = "TIMEOUT"  # the wall-clock or CPU-time limit was reached
    KILLED = "KILLED"  # another limit (processes, output, a signal): `reason` says which


CaseOutcome = Literal["passed", "failed", "error", "skipped"]


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest test class

    name: str  # pytest node id, "test_task.py::test_x"
    outcome: CaseOutcome
    message: str = ""  # the assertion or exception, trimmed; "" when it passed

    @property
    def file(self) -> str:
        return self.name.split("::", 1)[0]


@dataclass(frozen=True)
class TestCounts:
    __test__ = False

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    cases: tuple[TestCase, ...] = ()

    @classmethod
    def of(cls, cases: tuple[TestCase, ...] | list[TestCase]) -> TestCounts:
        cases = tuple(cases)
        count = {o: sum(c.outcome == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
        return cls(count["passed"], count["failed"], count["error"], count["skipped"], cases)

    @property
    def ran(self) -> int:
        return self.passed + self.failed + self.errors


@dataclass(frozen=True)
class Execution:
    """What to run. With `test_files`, pytest runs them in a work dir holding `files` and the test files; without,
    `entrypoint` (one of `files`) runs as a script. Limits of 0 mean the service's defaults."""

    files: dict[str, str] = field(default_factory=dict)
    test_files: dict[str, str] = field(default_factory=dict)
    entrypoint: str = ""
    timeout_seconds: float = 0.0
    memory_mb: int = 0
    language: str = "python"

    def validate(
        self, max_timeout_seconds: float = MAX_TIMEOUT_SECONDS, max_memory_mb: int = MAX_MEMORY_MB
    ) -> Execution:
        """This execution with its defaults applied; `InvalidArgument` naming the field when it is out of bounds."""
        if self.language not in LANGUAGES:
            raise InvalidArgument("language", f"must be one of {', '.join(LANGUAGES)}, got {self.language!r}")
        for kind, files in (("files", self.files), ("test_files", self.test_files)):
            for path in files:
                _check_path(kind, path)
        clash = set(self.files) & set(self.test_files)
        if clash:
            raise InvalidArgument("test_files", f"{sorted(clash)[0]!r} is also in files")
        paths = {*self.files, *self.test_files}
        for path in sorted(paths):
            folders = ("/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1))
            if file := next((f for f in folders if f in paths), None):
                kind = "files" if path in self.files else "test_files"
                raise InvalidArgument(f"{kind}[{path!r:.60}]", f"{file!r} is a file, so it cannot be a folder")
        if len(self.files) + len(self.test_files) > MAX_FILES:
            raise InvalidArgument("files", f"at most {MAX_FILES} files and test files together")
        size = sum(len(c.encode()) for c in (*self.files.values(), *self.test_files.values()))
        if size > MAX_TOTAL_BYTES:
            raise InvalidArgument("files", f"at most {MAX_TOTAL_BYTES} bytes of content in all, got {size}")
        if not self.test_files and not self.entrypoint:
            raise InvalidArgument("test_files", "give test files to run with pytest, or an entrypoint to run")
        if self.entrypoint and self.test_files:
            raise InvalidArgument("entrypoint", "give either test files or an entrypoint, not both")
        if self.entrypoint and self.entrypoint not in self.files:
            raise InvalidArgument("entrypoint", f"{self.entrypoint!r} is not one of the files")
        timeout = self.timeout_seconds or min(DEFAULT_TIMEOUT_SECONDS, max_timeout_seconds)
        if not 0 < timeout <= max_timeout_seconds:
            raise InvalidArgument("timeout_seconds", f"must be > 0 and <= {max_timeout_seconds:g}, got {timeout!r}")
        memory = self.memory_mb or min(DEFAULT_MEMORY_MB, max_memory_mb)
        if not MIN_MEMORY_MB <= memory <= max_memory_mb:
            raise InvalidArgument("memory_mb", f"must be {MIN_MEMORY_MB}..{max_memory_mb}, got {memory}")
        return Execution(dict(self.files), dict(self.test_files), self.entrypoint, timeout, memory, self.language)


MAX_TESTS_CHARS = 64_000


def test_source_problem(source: str) -> str | None:
    """Why `source` is not a usable pytest file (too long, not Python, no test function), or None. Parsed with
    `ast`, never run: tests run only in the sandbox."""
    if len(source) > MAX_TESTS_CHARS:
        return f"at most {MAX_TESTS_CHARS} characters, got {len(source)}"
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return f"is not valid Python: line {e.lineno}: {e.msg}"
    if not any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test") for n in tree.body):
        return "defines no test function (def test_...)"
    return None


test_source_problem.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def _check_path(kind: str, path: str) -> None:
    if not isinstance(path, str) or len(path) > MAX_PATH or not _PATH.fullmatch(path) or ".." in path.split("/"):
        raise InvalidArgument(
            f"{kind}[{path!r:.60}]", f"must be a relative path of letters, digits, '_', '-', '.' (<= {MAX_PATH} chars)"
        )


@dataclass(frozen=True)
class ExecutionResult:
    outcome: Outcome
    exit_code: int = 0  # negative: killed by that signal
    tests: TestCounts = field(default_factory=TestCounts)
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False  # stdout or stderr was cut to the cap
    duration_ms: float = 0.0
    reason: str = ""  # why it ended as it did
    isolation: str = ""  # "bwrap" or "pod"

    @property
    def passed(self) -> bool:
        return self.outcome == Outcome.PASSED
