"""`fleet demo --once`, `fleet up` and `fleet down` as a user runs them (the LLM: the loopback OpenAI-compatible
server; the real vLLM and the Ray executor are exercised by the e2e suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.local.processes import pid_alive, read_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
FLEET = str(Path(sys.executable).with_name("fleet"))


def test_demo_once_approves_a_plan_prints_the_winners_and_leaves_nothing_running(tmp_path: Path, llm_server):
    args = ["--executor", "in-process", "--llm-url", llm_server.url, "--llm-model", "test", "--base-dir", str(tmp_path)]
    done = subprocess.run([FLEET, "demo", "--once", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "published planning.plan.approved" in out
    assert out.count("winner: agent-dev-") == 1 and out.count("winner: agent-qa-") == 1, out[-3000:]
    assert "winner's score" in out and "python.syntax" in out and "dashboard: http://127.0.0.1:" in out
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
