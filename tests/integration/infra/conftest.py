"""Registers the `ray` marker (pyproject belongs to everyone; this suite adds its own)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: starts a real Ray head (skipped when ray is not installed)")
