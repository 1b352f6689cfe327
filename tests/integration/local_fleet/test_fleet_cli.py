"""`fleet demo --once`, `fleet up` and `fleet down` as a user runs them (the LLM: the loopback OpenAI-compatible
server; the real vLLM and the Ray executor are exercised by the e2e suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.local.processes import pid_alive, read_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
FLEET = str(Path(sys.executable).with_name("fleet"))


WRONG = "```python\ndef slugify(title):\n    return title.lower()\n```\n"
RIGHT = (
    "```python\nimport re\n\n\ndef slugify(title):\n    return '-'.join(re.findall(r'[a-z0-9]+', title.lower()))\n```\n"
)
QA_TESTS = "```python\nfrom solution import slugify\n\n\ndef test_empty():\n    assert slugify('') == ''\n```\n"


def test_demo_once_approves_a_plan_prints_the_winners_and_leaves_nothing_running(tmp_path: Path, llm_server):
    """The demo's plan with the agents' answers scripted: DEV's code runs against the visible tests in the real
    sandbox (one agent's fails), QA's tests then run against DEV's winning code; both winners are verified."""
    llm_server.control(
        answer_when_contains={
            "You are agent-dev-001": WRONG,
            "You are agent-dev-002": RIGHT,
            "You are agent-dev-003": RIGHT,
            "You are agent-qa-": QA_TESTS,
        }
    )
    args = ["--executor", "in-process", "--llm-url", llm_server.url, "--llm-model", "test", "--base-dir", str(tmp_path)]
    try:
        wide = {**os.environ, "COLUMNS": "240"}  # rich wraps at 80 columns without a terminal
        done = subprocess.run(
            [FLEET, "demo", "--once", *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=wide
        )
    finally:
        llm_server.control(reset=True)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "published planning.plan.approved" in out
    assert out.count("winner: agent-dev-") == 1 and out.count("winner: agent-qa-") == 1, out[-3000:]
    assert "re.findall" in out and "def test_empty" in out, out[-3000:]  # each winner's code
    assert out.count("VERIFIED: passed") == 2 and "NOT VERIFIED" not in out, out[-3000:]
    assert "tests.task (gating) the task's tests: 3/3 passed" in out
    assert "tests.own (gating) the proposal's own tests against the code it builds on: 1/1 passed" in out
    assert out.count("verified ") >= 2 and "dashboard: http://127.0.0.1:" in out
    assert not (tmp_path / "state.json").exists() and not (tmp_path / "endpoints.json").exists()
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert {"nats.log", "orchestrator.log", "context.log", "monitoring.log", "councils.log"} <= logs


def test_up_in_the_background_then_down(tmp_path: Path, llm_server):
    args = ["--executor", "in-process", "--llm-url", llm_server.url, "--base-dir", str(tmp_path)]
    up = subprocess.Popen([FLEET, "up", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "Ctrl-C stops everything" in line:
                break
        else:
            pytest.fail(f"`fleet up` ended early with {up.wait()}")
        endpoints = json.loads((tmp_path / "endpoints.json").read_text())
        assert set(endpoints) >= {"nats", "valkey", "falkordb", "sandbox", "context", "orchestrator", "monitoring"}
        pids = {name: entry["pid"] for name, entry in read_state(tmp_path / "state.json").items()}
        assert set(pids) == {"nats", "valkey", "falkordb", "sandbox", "context", "orchestrator", "monitoring"}
        # The orchestrator finds the sandbox; the sandbox knows nothing of the infrastructure.
        assert psutil.Process(pids["orchestrator"]).environ()["SANDBOX_ADDRESS"] == endpoints["sandbox"]
        assert not {"NATS_URL", "VALKEY_URL", "NEO4J_URI"} & set(psutil.Process(pids["sandbox"]).environ())
        down = subprocess.run([FLEET, "down", "--base-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert up.wait(30) == 0
        assert not any(pid_alive(pid) for pid in pids.values())
        assert not (tmp_path / "endpoints.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
