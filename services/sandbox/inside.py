"""The small trusted script that runs INSIDE the sandbox (standard library and pytest only; the service never
imports it, it runs it as a file):

    python -s inside.py REPORT_FD        stdin: {"files": {...}, "test_files": {...}, "entrypoint": "...",
                                                 "limits": {"memory_bytes": N, "cpu_seconds": N}}

It imports pytest first, then waits for its execution on stdin (the service starts it ahead of the execution, under
the largest limits an execution may have). Once the execution is read, it lowers its address-space and CPU limits
to the execution's own, soft and hard (a process cannot raise a hard limit again), before any of the execution's
code exists. Then it writes the files into the current directory (the work dir), then either runs pytest in-process on the test
files, with a tiny plugin that records each test's node id, outcome and message, or runs the entrypoint as
`__main__` (runpy). The report goes as JSON to the inherited file descriptor REPORT_FD, a pipe the service reads:
{"kind": "pytest" | "script", "exit_code": N, "cases": [{"name", "outcome", "message"}]}. Then it exits at once
(os._exit: threads or atexit handlers the code under test left behind cannot hold the run up).
"""

import json
import os
import resource
import runpy
import sys
import traceback

try:
    import pytest  # before the execution arrives: the import is most of a test run's start-up
except ImportError:  # a script-only interpreter: run_pytest says so
    pytest = None

MESSAGE_CHARS = 500
PYTEST_ARGS = ["-q", "--color=no", "--tb=short", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]


def message(report) -> str:
    """The assertion or exception of a failed (or skipped) test, short: pytest's one-line crash summary."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # skipped: (file, line, reason)
        return str(longrepr[2])[:MESSAGE_CHARS]
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message[:MESSAGE_CHARS]
    text = report.longreprtext
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = errors or text.strip().splitlines()[-1:]
    return "\n".join(lines)[-MESSAGE_CHARS:]


class Collector:
    """pytest plugin: one case per test (a failing setup or teardown is an error), one per collection error.
    A process the code under test forked that comes back into pytest ends there, silently."""

    def __init__(self) -> None:
        self.cases = []
        self.pid = os.getpid()

    def add(self, report, outcome: str) -> None:
        if os.getpid() != self.pid:
            os._exit(1)
        text = "" if outcome == "passed" else message(report)
        self.cases.append({"name": report.nodeid, "outcome": outcome, "message": text})

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call":
            self.add(report, report.outcome)
        elif report.failed:
            self.add(report, "error")
        elif report.skipped:
            self.add(report, "skipped")

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.add(report, "error")


def run_pytest(test_files: list) -> dict:
    if pytest is None:
        raise RuntimeError("pytest is not importable in the sandbox")
    collector = Collector()
    code = pytest.main([*test_files, "--rootdir", os.getcwd(), *PYTEST_ARGS], plugins=[collector])
    return {"kind": "pytest", "exit_code": int(code), "cases": collector.cases}


def run_script(entrypoint: str) -> dict:
    path = os.path.abspath(entrypoint)
    sys.argv = [entrypoint]
    sys.path[0] = os.path.dirname(path)  # as `python entrypoint` would
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter would exit
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    return {"kind": "script", "exit_code": code, "cases": []}


def limit(limits: dict) -> None:
    """Lower the address space to `memory_bytes` and the process's CPU time (counted from its start, pytest's
    import included, as before it waited) to `cpu_seconds` (SIGXCPU past it, SIGKILL a second later), soft and
    hard: the code that runs next cannot raise them again. Never above the limits the process started with. Fails
    (and nothing runs) if it cannot."""
    for which, soft, hard in (
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_CPU, limits["cpu_seconds"], limits["cpu_seconds"] + 1),
    ):
        _, now = resource.getrlimit(which)
        if now != resource.RLIM_INFINITY:
            soft, hard = min(soft, now), min(hard, now)
        resource.setrlimit(which, (soft, hard))


def main() -> None:
    report_fd = int(sys.argv[1])
    os.set_inheritable(report_fd, False)  # processes the code under test starts do not get it
    spec = json.loads(sys.stdin.buffer.read())
    limit(spec["limits"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code under test reads an empty stdin
    os.close(devnull)
    for path, content in {**spec["files"], **spec["test_files"]}.items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
    sys.path[0] = os.getcwd()  # not this script's dir: `from solution import ...` from tests in any folder
    me = os.getpid()
    if spec["test_files"]:
        report = run_pytest(sorted(spec["test_files"]))
    else:
        report = run_script(spec["entrypoint"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if os.getpid() != me:  # a process the code under test forked, leaving pytest: it reports nothing
        os._exit(1)
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(report_fd, data) :]
    code = report["exit_code"]
    os._exit(code if 0 <= code <= 255 else 1)


if __name__ == "__main__":
    main()
