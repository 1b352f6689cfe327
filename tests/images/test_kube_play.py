"""The CPU overlay's manifests run by `podman kube play` and the e2e Job's pod passing against them
(scripts/kube_play.py, also `make kube-play`): the closest this machine gets to `kubectl apply -k` on a cluster.

podman only (`kube play` is podman's): `make test-images` deselects it, by its marker, when the engine is docker.
About 2 minutes here. What podman cannot emulate, and what stands in for it, is in the script's docstring and
deploy/k8s/README.md ("Run the manifests with podman kube play").
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from .conftest import ROOT, Engine

pytestmark = [pytest.mark.images, pytest.mark.kube_play, pytest.mark.integration, pytest.mark.timeout(1800)]


def test_the_cpu_overlay_under_podman_kube_play_passes_the_e2e_job(engine: Engine):
    if not engine.podman:
        pytest.fail(f"`podman kube play` needs podman, the engine is {engine.path} (deselect with -m 'not kube_play')")
    for image in ("orchestrator", "context", "ray-executor", "monitoring", "sandbox", "ray", "e2e"):
        engine.image(image)  # fails saying `make images` when one is missing
    script = [sys.executable, str(ROOT / "scripts" / "kube_play.py"), "--timeout", "300", "--e2e-timeout", "900"]
    process = subprocess.Popen(script, env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the script tears everything down on SIGTERM (or Ctrl-C)
        output, _ = process.communicate(timeout=300)
        pytest.fail("scripts/kube_play.py still running after 25 min\n" + "\n".join(output.splitlines()[-150:]))
    lines = output.splitlines()
    assert process.returncode == 0, f"scripts/kube_play.py exit {process.returncode}\n" + "\n".join(lines[-150:])
    summary = [line for line in lines if " passed" in line and line.startswith("=")]
    assert summary and not re.search(r"failed|error", summary[-1]), "\n".join(lines[-150:])
    # The e2e tests that need no local control of the fleet (the fault and scripted-LLM ones skip on an external
    # fleet, saying so): all of them ran, not merely none failed.
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed >= 4, summary[-1]
    print("\n".join(lines))
