"""The sandbox's rules, pure (no I/O): the limits an execution runs under, the report the trusted script inside
sends back, and how a run's end becomes an `Outcome` with a reason.

The report is written by our script inside the sandbox, but in the same process as the code under test: it is
evidence, not proof (code that means to can forge it). So it is parsed defensively (`Report.parse`), every
message is trimmed, and the process's own end (our kills, signals) outranks it.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from services.common.execution import Execution, ExecutionResult, Outcome, TestCase, TestCounts

KIB, MIB = 1 << 10, 1 << 20
MESSAGE_CHARS = 500  # a case's message, and any quoted text in a reason
MAX_CASES = 1000  # a bigger report is no report (the response must stay far below gRPC's 4 MiB)
CASE_OUTCOMES = ("passed", "failed", "error", "skipped")

# pytest's exit codes (pytest.ExitCode)
PYTEST_OK, PYTEST_FAILED, PYTEST_INTERRUPTED, PYTEST_INTERNAL, PYTEST_USAGE, PYTEST_NO_TESTS = range(6)


@dataclass(frozen=True)
class Limits:
    """What one execution may use. The wall clock is enforced by the runner; the rest by the kernel (rlimits,
    a size-limited tmpfs)."""

    timeout_seconds: float
    memory_mb: int  # address space
    cpu_seconds: int  # CPU time of each process: SIGXCPU past it
    processes: int = 64  # processes and threads together
    open_files: int = 256
    file_bytes: int = 16 * MIB  # the largest file a process may write
    disk_bytes: int = 64 * MIB  # each of the work dir and /tmp (bwrap: tmpfs)
    output_bytes: int = 16 * KIB  # stdout and stderr each, as returned
    output_hard_cap: int = 4 * MIB  # all output read (stdout, stderr, report); past it everything is killed

    @classmethod
    def of(cls, execution: Execution) -> Limits:
        """The limits of a validated execution (its timeout and memory already defaulted)."""
        return cls.at(execution.timeout_seconds, execution.memory_mb)

    @classmethod
    def at(cls, timeout_seconds: float, memory_mb: int) -> Limits:
        """The limits of an execution with this timeout and memory (the service's maxima give the largest)."""
        return cls(timeout_seconds=timeout_seconds, memory_mb=memory_mb, cpu_seconds=math.ceil(timeout_seconds) + 1)


class Stop(StrEnum):
    """Why the runner killed an execution itself."""

    WALL_CLOCK = "wall_clock"
    OUTPUT = "output"


@dataclass(frozen=True)
class Report:
    """What the trusted script inside reports: pytest's exit code and each test, or the script's exit code."""

    kind: Literal["pytest", "script"]
    exit_code: int
    cases: tuple[TestCase, ...] = ()

    @classmethod
    def parse(cls, raw: bytes) -> Report | None:
        """The report, or None when it is missing or malformed (never trusted further than its shape)."""
        try:
            doc = json.loads(raw)
            kind, exit_code, cases = doc["kind"], doc["exit_code"], doc.get("cases", [])
            if kind not in ("pytest", "script") or type(exit_code) is not int or not isinstance(cases, list):
                return None
            if len(cases) > MAX_CASES:
                return None
            parsed = []
            for c in cases:
                name, outcome, message = c["name"], c["outcome"], c.get("message", "")
                if not (isinstance(name, str) and isinstance(message, str) and outcome in CASE_OUTCOMES):
                    return None
                parsed.append(TestCase(trim(name, 300), outcome, trim(message)))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None
        return cls(kind, exit_code, tuple(parsed))


@dataclass(frozen=True)
class RunOutput:
    """How a run ended, as the runner saw it."""

    exit_code: int  # of the process; negative: killed by that signal
    report: Report | None
    stopped: Stop | None = None  # the runner killed it
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    duration_ms: float = 0.0


def trim(text: str, limit: int = MESSAGE_CHARS) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()} … [{len(text) - limit} more chars]"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return trim(lines[-1], 200) if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def conclude(execution: Execution, limits: Limits, run: RunOutput, isolation: str) -> ExecutionResult:
    """The result of a run: its outcome, the exit code to report, and a readable reason."""
    report = run.report
    tests = TestCounts.of(report.cases) if report is not None else TestCounts()
    outcome, exit_code, reason = _classify(execution, limits, run, tests)
    return ExecutionResult(
        outcome=outcome,
        exit_code=exit_code,
        tests=tests,
        stdout=run.stdout,
        stderr=run.stderr,
        truncated=run.truncated,
        duration_ms=run.duration_ms,
        reason=reason,
        isolation=isolation,
    )


def _classify(e: Execution, limits: Limits, run: RunOutput, tests: TestCounts) -> tuple[Outcome, int, str]:
    code = run.exit_code
    if run.stopped == Stop.WALL_CLOCK:
        return Outcome.TIMEOUT, code, f"wall-clock limit of {limits.timeout_seconds:g}s reached; everything was killed"
    if run.stopped == Stop.OUTPUT:
        return (
            Outcome.KILLED,
            code,
            f"output limit reached: more than {limits.output_hard_cap // MIB} MiB of output; everything was killed",
        )
    report = run.report
    if code < 0 and report is None:  # died by a signal before reporting (after reporting, the report decides)
        if -code == signal.SIGXCPU:
            return Outcome.TIMEOUT, code, f"CPU-time limit of {limits.cpu_seconds}s reached (SIGXCPU)"
        if -code == signal.SIGXFSZ:
            return Outcome.KILLED, code, f"file-size limit of {limits.file_bytes // MIB} MiB exceeded (SIGXFSZ)"
        return Outcome.KILLED, code, f"killed by {_signal_name(-code)}"
    if report is None:
        why = _last_line(run.stderr)
        return Outcome.ERROR, code, f"no report came back (exit code {code}){': ' + why if why else ''}"
    if report.kind == "script":
        return _script(e, report.exit_code, run.stderr)
    return _pytest(e, report.exit_code, tests, run)


def _script(e: Execution, code: int, stderr: str) -> tuple[Outcome, int, str]:
    if code == 0:
        return Outcome.PASSED, 0, f"{e.entrypoint} exited with code 0"
    why = _last_line(stderr)
    return Outcome.FAILED, code, f"{e.entrypoint} exited with code {code}{': ' + why if why else ''}"


def _pytest(e: Execution, code: int, tests: TestCounts, run: RunOutput) -> tuple[Outcome, int, str]:
    bad = [c for c in tests.cases if c.outcome in ("failed", "error")]
    if code in (PYTEST_OK, PYTEST_FAILED) and bad:
        first = bad[0]
        return (
            Outcome.FAILED,
            code,
            f"{len(bad)} of {_plural(tests.ran, 'test')} failed; first: {first.name}: {trim(first.message, 300)}",
        )
    if code == PYTEST_OK:
        if tests.passed:
            skipped = f" ({tests.skipped} skipped)" if tests.skipped else ""
            return Outcome.PASSED, code, f"{_plural(tests.passed, 'test')} passed{skipped}"
        return Outcome.ERROR, code, f"no test ran: all {_plural(tests.skipped, 'test')} were skipped"
    if code == PYTEST_FAILED:
        return Outcome.FAILED, code, "pytest reported failures without naming them"
    if code == PYTEST_INTERRUPTED:
        if bad:  # errors during collection: the code or the tests do not import
            first = bad[0]
            return Outcome.ERROR, code, f"the tests could not be collected: {first.name}: {trim(first.message, 300)}"
        return Outcome.ERROR, code, "pytest was interrupted"
    if code == PYTEST_NO_TESTS:
        return Outcome.ERROR, code, f"no tests were collected from {', '.join(sorted(e.test_files))}"
    what = {PYTEST_INTERNAL: "an internal error", PYTEST_USAGE: "a usage error"}.get(code, f"exit code {code}")
    why = _last_line(run.stderr) or _last_line(run.stdout)
    return Outcome.ERROR, code, f"pytest ended with {what}{': ' + why if why else ''}"
