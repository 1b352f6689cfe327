"""The sandbox's rules without running anything: request validation (Execution.validate), the limits policy,
the report the script inside sends back, and how a run's end becomes an outcome with a reason."""

from __future__ import annotations

import json
import signal

import pytest

from services.common.errors import InvalidArgument
from services.common.execution import Execution, Outcome, TestCase
from services.sandbox.domain import Limits, Report, RunOutput, Stop, conclude, trim

TESTS = Execution(files={"solution.py": "x = 1\n"}, test_files={"test_x.py": "def test_x(): pass\n"})
SCRIPT = Execution(files={"main.py": "print(1)\n"}, entrypoint="main.py")


# --- validation -------------------------------------------------------------------------------------------------


def test_validation_applies_the_defaults():
    e = TESTS.validate()
    assert (e.timeout_seconds, e.memory_mb, e.language) == (10.0, 512, "python")
    assert Execution(test_files={"t.py": ""}).validate(max_timeout_seconds=5).timeout_seconds == 5


@pytest.mark.parametrize(
    ("execution", "field", "text"),
    [
        (Execution(files={"../x.py": ""}, entrypoint="../x.py"), "files['../x.py']", "relative path"),
        (Execution(files={"/abs.py": ""}, entrypoint="/abs.py"), "files['/abs.py']", "relative path"),
        (Execution(files={"a//b.py": ""}, entrypoint="a//b.py"), "files['a//b.py']", "relative path"),
        (Execution(files={".hidden": ""}, test_files={"t.py": ""}), "files['.hidden']", "relative path"),
        (Execution(test_files={"x/../../t.py": ""}), "test_files['x/../../t.py']", "relative path"),
        (Execution(files={"t.py": ""}, test_files={"t.py": ""}), "test_files", "'t.py' is also in files"),
        (Execution(files={"a": "", "a/b.py": ""}, entrypoint="a/b.py"), "files['a/b.py']", "'a' is a file"),
        (Execution(files={f"f{i}.py": "" for i in range(21)}, entrypoint="f0.py"), "files", "at most 20"),
        (Execution(files={"a.py": "x" * (1 << 20)}, test_files={"t.py": "y"}), "files", "at most 1048576 bytes"),
        (Execution(files={"a.py": ""}), "test_files", "give test files to run with pytest, or an entrypoint"),
        (Execution(files={"a.py": ""}, test_files={"t.py": ""}, entrypoint="a.py"), "entrypoint", "not both"),
        (Execution(files={"a.py": ""}, entrypoint="b.py"), "entrypoint", "'b.py' is not one of the files"),
        (Execution(test_files={"t.py": ""}, timeout_seconds=60.01), "timeout_seconds", "must be > 0 and <= 60"),
        (Execution(test_files={"t.py": ""}, timeout_seconds=-1), "timeout_seconds", "must be > 0"),
        (Execution(test_files={"t.py": ""}, timeout_seconds=float("nan")), "timeout_seconds", "must be > 0"),
        (Execution(test_files={"t.py": ""}, memory_mb=63), "memory_mb", "must be 64..4096"),
        (Execution(test_files={"t.py": ""}, memory_mb=4097), "memory_mb", "must be 64..4096"),
        (Execution(test_files={"t.py": ""}, language="rust"), "language", "must be one of python"),
    ],
)
def test_validation_names_the_field(execution: Execution, field: str, text: str):
    with pytest.raises(InvalidArgument) as info:
        execution.validate()
    assert info.value.field == field
    assert text in info.value.description


def test_the_service_maximum_bounds_the_timeout():
    with pytest.raises(InvalidArgument, match=r"timeout_seconds: must be > 0 and <= 5, got 6"):
        Execution(test_files={"t.py": ""}, timeout_seconds=6).validate(max_timeout_seconds=5)


def test_the_limits_follow_the_execution():
    limits = Limits.of(Execution(test_files={"t.py": ""}, timeout_seconds=2.5, memory_mb=256).validate())
    assert (limits.timeout_seconds, limits.memory_mb, limits.cpu_seconds) == (2.5, 256, 4)
    assert (limits.processes, limits.file_bytes, limits.output_bytes) == (64, 16 << 20, 16 << 10)


# --- the report -------------------------------------------------------------------------------------------------


def report_bytes(**doc: object) -> bytes:
    return json.dumps({"kind": "pytest", "exit_code": 0, "cases": [], **doc}).encode()


def test_a_report_is_parsed_and_its_messages_trimmed():
    cases = [{"name": "t.py::a", "outcome": "failed", "message": "E" * 2000}, {"name": "t.py::b", "outcome": "passed"}]
    report = Report.parse(report_bytes(exit_code=1, cases=cases))
    assert report is not None and report.exit_code == 1
    assert [c.name for c in report.cases] == ["t.py::a", "t.py::b"]
    assert report.cases[0].message == "E" * 500 + " … [1500 more chars]"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b"[]",
        report_bytes(kind="other"),
        report_bytes(exit_code="0"),
        report_bytes(exit_code=True),
        report_bytes(cases={"a": 1}),
        report_bytes(cases=[{"name": "a", "outcome": "exploded"}]),
        report_bytes(cases=[{"name": 1, "outcome": "passed"}]),
        report_bytes(cases=[{"outcome": "passed"}]),
        report_bytes(cases=[{"name": "a", "outcome": "passed"}] * 1001),
        b'{"kind": "pytest", "exit_code": 0}{"kind": "pytest", "exit_code": 0}',  # two writers
    ],
)
def test_a_malformed_report_is_no_report(raw: bytes):
    assert Report.parse(raw) is None


def test_trim_keeps_short_text_and_marks_a_cut():
    assert trim("  short \n") == "short"
    assert trim("abcdef", 3) == "abc … [3 more chars]"


# --- outcomes ---------------------------------------------------------------------------------------------------


def run(exit_code: int = 0, report: Report | None = None, **fields: object) -> RunOutput:
    return RunOutput(exit_code=exit_code, report=report, **fields)  # type: ignore[arg-type]


def pytest_report(exit_code: int, *cases: tuple[str, str, str]) -> Report:
    return Report("pytest", exit_code, tuple(TestCase(n, o, m) for n, o, m in cases))  # type: ignore[arg-type]


def outcome(execution: Execution, output: RunOutput) -> tuple[Outcome, int, str]:
    e = execution.validate()
    result = conclude(e, Limits.of(e), output, "bwrap")
    assert result.isolation == "bwrap"
    return result.outcome, result.exit_code, result.reason


def test_all_tests_passing_is_passed():
    report = pytest_report(0, ("t.py::a", "passed", ""), ("t.py::b", "passed", ""), ("t.py::c", "skipped", "later"))
    assert outcome(TESTS, run(0, report)) == (Outcome.PASSED, 0, "2 tests passed (1 skipped)")


def test_a_failing_test_is_failed_with_its_name_and_message():
    report = pytest_report(1, ("t.py::a", "passed", ""), ("t.py::b", "failed", "assert 1 == 2"))
    assert outcome(TESTS, run(1, report)) == (
        Outcome.FAILED,
        1,
        "1 of 2 tests failed; first: t.py::b: assert 1 == 2",
    )


def test_an_error_in_a_fixture_is_failed():
    report = pytest_report(1, ("t.py::a", "error", "fixture 'db' not found"))
    assert outcome(TESTS, run(1, report))[0] == Outcome.FAILED


def test_a_report_that_hides_its_failures_behind_exit_0_is_still_failed():
    report = pytest_report(0, ("t.py::a", "failed", "boom"))
    assert outcome(TESTS, run(0, report))[0] == Outcome.FAILED


def test_exit_1_without_cases_is_failed():
    assert outcome(TESTS, run(1, pytest_report(1))) == (
        Outcome.FAILED,
        1,
        "pytest reported failures without naming them",
    )


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        (
            pytest_report(2, ("t.py", "error", "ModuleNotFoundError: No module named 'solution'")),
            "the tests could not be collected: t.py: ModuleNotFoundError: No module named 'solution'",
        ),
        (pytest_report(2), "pytest was interrupted"),
        (pytest_report(3), "pytest ended with an internal error: INTERNALERROR> boom"),
        (pytest_report(4), "pytest ended with a usage error: INTERNALERROR> boom"),
        (pytest_report(5), "no tests were collected from test_x.py"),
        (pytest_report(0, ("t.py::a", "skipped", "")), "no test ran: all 1 test were skipped"),
        (pytest_report(0), "no test ran: all 0 tests were skipped"),
    ],
)
def test_nothing_meaningful_ran_is_an_error(report: Report, reason: str):
    assert outcome(TESTS, run(report.exit_code, report, stderr="x\nINTERNALERROR> boom\n")) == (
        Outcome.ERROR,
        report.exit_code,
        reason,
    )


def test_no_report_is_an_error_quoting_stderr():
    assert outcome(TESTS, run(1, None, stderr="Traceback...\nSystemError: broken\n")) == (
        Outcome.ERROR,
        1,
        "no report came back (exit code 1): SystemError: broken",
    )


def test_a_script_passes_on_0_and_fails_on_anything_else():
    assert outcome(SCRIPT, run(0, Report("script", 0))) == (Outcome.PASSED, 0, "main.py exited with code 0")
    assert outcome(SCRIPT, run(3, Report("script", 3), stderr="ValueError: no\n")) == (
        Outcome.FAILED,
        3,
        "main.py exited with code 3: ValueError: no",
    )
    # the report's exit code, not the process's (which is cut to a byte)
    assert outcome(SCRIPT, run(1, Report("script", 1000)))[:2] == (Outcome.FAILED, 1000)


def test_our_kills_outrank_everything():
    passed = pytest_report(0, ("t.py::a", "passed", ""))
    wall = run(-9, passed, stopped=Stop.WALL_CLOCK)
    assert outcome(TESTS, wall) == (Outcome.TIMEOUT, -9, "wall-clock limit of 10s reached; everything was killed")
    flood = run(-9, passed, stopped=Stop.OUTPUT)
    assert outcome(TESTS, flood) == (
        Outcome.KILLED,
        -9,
        "output limit reached: more than 4 MiB of output; everything was killed",
    )


@pytest.mark.parametrize(
    ("sig", "expected", "reason"),
    [
        (signal.SIGXCPU, Outcome.TIMEOUT, "CPU-time limit of 11s reached (SIGXCPU)"),
        (signal.SIGXFSZ, Outcome.KILLED, "file-size limit of 16 MiB exceeded (SIGXFSZ)"),
        (signal.SIGKILL, Outcome.KILLED, "killed by SIGKILL"),
        (signal.SIGSEGV, Outcome.KILLED, "killed by SIGSEGV"),
    ],
)
def test_a_death_by_signal_before_reporting(sig: int, expected: Outcome, reason: str):
    assert outcome(TESTS, run(-sig, None)) == (expected, -sig, reason)


def test_the_result_carries_the_output_and_counts():
    report = pytest_report(1, ("t.py::a", "passed", ""), ("t.py::b", "failed", "no"), ("t.py::c", "error", "x"))
    e = TESTS.validate()
    result = conclude(e, Limits.of(e), run(1, report, stdout="o", stderr="e", truncated=True, duration_ms=12.5), "pod")
    assert (result.tests.passed, result.tests.failed, result.tests.errors, result.tests.ran) == (1, 1, 1, 3)
    assert (result.stdout, result.stderr, result.truncated, result.duration_ms, result.isolation) == (
        "o",
        "e",
        True,
        12.5,
        "pod",
    )
