"""Fixtures of the deliberation unit tests (the scripted LLM itself is in scripted_llm.py)."""

from __future__ import annotations

import pytest
from scripted_llm import ScriptedLLM, make_task

from services.deliberation.domain import Role, Task, make_council


@pytest.fixture
def llm() -> ScriptedLLM:
    return ScriptedLLM()


@pytest.fixture
def task() -> Task:
    return make_task()


@pytest.fixture
def council():
    return make_council(Role.DEV, 3)


@pytest.fixture
def architect():
    return make_council(Role.ARCHITECT, 1).agents[0]
