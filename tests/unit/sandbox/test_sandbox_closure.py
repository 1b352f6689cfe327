"""What the bwrap sandbox mounts of this environment: pytest and what it requires, nothing else."""

from __future__ import annotations

import importlib.metadata

from services.sandbox.adapters.bwrap import pytest_closure


def test_the_pytest_closure_is_pytest_and_its_requirements_only():
    closure = pytest_closure()
    assert {"pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments"} <= set(closure)
    assert not {"grpc", "services", "fleet", "nats", "valkey", "ray", "schemathesis", "pytest_asyncio"} & set(closure)
    pytest_dir = closure["pytest"]
    assert pytest_dir.is_dir() and pytest_dir.parent == importlib.metadata.distribution("pytest").locate_file("")
    assert all(path.exists() for path in closure.values())
