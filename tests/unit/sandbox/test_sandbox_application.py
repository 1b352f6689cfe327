"""The use case with a fake runner: validation before anything runs, slots and a bounded wait queue."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.execution import Execution, Outcome
from services.sandbox.application import SandboxService
from services.sandbox.domain import Limits, Report, RunOutput

EXECUTION = Execution(files={"main.py": ""}, entrypoint="main.py")


class FakeRunner:
    """Every run passes; a run waits until the test releases it. Records (slot, limits) of each run."""

    isolation = "fake"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.runs: list[tuple[int, Limits]] = []
        self.running = 0

    async def run(self, execution: Execution, limits: Limits, slot: int) -> RunOutput:
        self.runs.append((slot, limits))
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return RunOutput(exit_code=0, report=Report("script", 0))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_run_gets_the_validated_execution_and_its_limits():
    runner = FakeRunner()
    runner.release.set()
    result = await SandboxService(runner).execute(Execution(test_files={"t.py": ""}, timeout_seconds=3))
    assert result.outcome == Outcome.PASSED and result.isolation == "fake"
    [(slot, limits)] = runner.runs
    assert (slot, limits.timeout_seconds, limits.memory_mb, limits.cpu_seconds) == (0, 3, 512, 4)


async def test_an_invalid_execution_never_reaches_the_runner():
    runner = FakeRunner()
    with pytest.raises(InvalidArgument) as info:
        await SandboxService(runner, max_timeout_seconds=5).execute(
            Execution(test_files={"t.py": ""}, timeout_seconds=9)
        )
    assert info.value.field == "timeout_seconds" and runner.runs == []


async def test_slots_run_at_once_the_queue_waits_and_beyond_it_is_refused():
    runner = FakeRunner()
    app = SandboxService(runner, concurrency=2, queue=1)
    tasks = [asyncio.create_task(app.execute(EXECUTION)) for _ in range(3)]
    await settle()
    assert runner.running == 2 and sorted(s for s, _ in runner.runs) == [0, 1]  # each in its own slot
    with pytest.raises(ResourceExhausted, match=r"every execution slot is busy and the queue \(1\) is full"):
        await app.execute(EXECUTION)
    runner.release.set()
    results = await asyncio.gather(*tasks)
    assert [r.outcome for r in results] == [Outcome.PASSED] * 3
    assert len(runner.runs) == 3 and runner.runs[2][0] in (0, 1)
    assert (await app.execute(EXECUTION)).passed  # room again


async def test_a_cancelled_waiter_leaves_the_queue_and_a_failed_run_frees_its_slot():
    runner = FakeRunner()
    app = SandboxService(runner, concurrency=1, queue=1)
    first = asyncio.create_task(app.execute(EXECUTION))
    waiter = asyncio.create_task(app.execute(EXECUTION))
    await settle()
    waiter.cancel()
    await settle()
    second = asyncio.create_task(app.execute(EXECUTION))  # the queue has room again
    await settle()
    first.cancel()  # the runner is cancelled mid-run: its slot comes back
    runner.release.set()
    assert (await second).passed
    assert [s for s, _ in runner.runs] == [0, 0]
