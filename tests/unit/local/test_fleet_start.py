"""LocalFleet starts vLLM alongside the other components, on a port chosen up front: a missing vLLM setup is
found before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.local.fleet import FleetOptions, LocalFleet
from services.local.vllm import VLLMNotInstalled


def test_without_the_vllm_setup_nothing_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CACHE_DIR", str(tmp_path / "empty-cache"))
    fleet = LocalFleet(FleetOptions(base_dir=tmp_path / "fleet"))
    with pytest.raises(VLLMNotInstalled, match="make llm"):
        fleet.start()
    logs = tmp_path / "fleet" / "logs"
    assert not logs.exists() or not list(logs.glob("*.log"))  # no process was spawned


def test_the_llm_address_is_known_before_it_starts(tmp_path: Path) -> None:
    given = LocalFleet(FleetOptions(base_dir=tmp_path, llm_url="http://127.0.0.1:9/", llm_model="m"))
    assert given._llm_address() == ("http://127.0.0.1:9", "m", None)
    # The local vLLM's address (a port chosen up front) needs the setup: tests/integration/llm/test_llm_setup_cli.py
