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
        the_cli_finds_and_authenticates_to_the_running_fleet(tmp_path, endpoints)
        down = subprocess.run([FLEET, "down", "--base-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert up.wait(30) == 0
        assert not any(pid_alive(pid) for pid in pids.values())
        assert not (tmp_path / "endpoints.json").exists()
        # A fleet killed without the chance to clean up leaves its endpoints.json: named as stale, not used.
        (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
        stale = fleet(tmp_path, "councils", "list")
        assert stale.returncode == 1 and "endpoints.json is stale" in stale.stderr, stale.stderr
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def fleet(base: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A `fleet` command as a user runs it in another terminal: no address variables, the fleet found in `base`."""
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("_ADDRESS", "_URL")) and k != "FLEET_TOKEN"}
    wide = {**clean, "COLUMNS": "240", "FLEET_DIR": str(base), **(env or {})}
    return subprocess.run([FLEET, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=wide)


def the_cli_finds_and_authenticates_to_the_running_fleet(base: Path, endpoints: dict[str, str]) -> None:
    status = fleet(base, "status", "--base-dir", str(base))
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("nats", "valkey", "falkordb", "sandbox", "context", "orchestrator", "monitoring", "issuer"):
        assert name in status.stdout
    assert status.stdout.count("SERVING") == 3 and "serving its keys" in status.stdout

    exported = fleet(base, "env", "--base-dir", str(base)).stdout
    assert f"export ORCHESTRATOR_ADDRESS={endpoints['orchestrator']}" in exported and "export FLEET_TOKEN=" in exported

    councils = fleet(base, "councils", "list")  # no ORCHESTRATOR_ADDRESS: the local fleet's, said on stderr
    assert councils.returncode == 0, councils.stderr
    assert "council-dev" in councils.stdout and f"orchestrator {endpoints['orchestrator']}" in councils.stderr

    # A variable wins over the running fleet's endpoints.json (here one that points nowhere).
    elsewhere = fleet(base, "councils", "list", env={"ORCHESTRATOR_ADDRESS": "127.0.0.1:9"})
    assert elsewhere.returncode == 1 and "127.0.0.1:9 not reachable" in elsewhere.stderr, elsewhere.stderr

    # Every call is authenticated: a viewer may list councils, not create them; no token at all is refused.
    viewer = fleet(base, "token", "--user", "vera@example.com", "--role", "viewer", "--base-dir", str(base))
    assert viewer.returncode == 0, viewer.stderr
    as_viewer = {"FLEET_TOKEN": viewer.stdout.strip()}
    assert fleet(base, "councils", "list", env=as_viewer).returncode == 0
    refused = fleet(base, "councils", "init", "--wait-seconds", "5", env=as_viewer)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    assert "vera@example.com lacks role admin" in refused.stderr
    forged = fleet(base, "councils", "list", env={"FLEET_TOKEN": "not-a-token"})
    assert forged.returncode == 1 and "malformed token" in forged.stderr
    bad_role = fleet(base, "token", "--user", "x", "--role", "root", "--base-dir", str(base))
    assert bad_role.returncode == 2 and "unknown root" in bad_role.stderr

    approved = fleet(base, "approve-plan", "--story", "S-CLI", "--plan", "P-1", "--roles", "DEV")
    assert approved.returncode == 0 and "published planning.plan.approved" in approved.stdout, approved.stderr
    missing = fleet(base, "deliberations", "show", "NO-SUCH-TASK")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
