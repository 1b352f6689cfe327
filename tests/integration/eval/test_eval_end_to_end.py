"""`fleet eval` end to end on three problems, every mode (CI's smoke of the instrument, not of the numbers): real
orchestrator over gRPC, real sandbox (bwrap), loopback LLM with scripted answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from services import cli
from services.eval.dataset import HumanEvalJsonl
from services.eval.modes import Mode
from services.eval.records import RECORDS
from services.eval.run import Endpoints, EvalConfig, run_eval
from services.local.processes import free_port

from .conftest import MARKER

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


class Log:
    """The run's Progress, kept."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.records = []
        self.plan: tuple[int, int] | None = None

    def say(self, text: str) -> None:
        self.lines.append(text)

    def planned(self, total: int, recorded: int) -> None:
        self.plan = (total, recorded)

    def recorded(self, record) -> None:
        self.records.append(record)


def config(dataset: Path, output: Path, orchestrator: str, sandbox: str, llm_url: str, **over) -> EvalConfig:
    fields = {
        "dataset": HumanEvalJsonl(dataset),
        "output": output,
        "endpoints": Endpoints(llm_url, "test-model", orchestrator, sandbox, {}),
        "sandbox_timeout": 3.0,
        "deliberation_timeout": 60.0,
        "max_tokens": 256,
        **over,
    }
    return EvalConfig(**fields)


def lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / RECORDS).read_text().splitlines()]


async def test_every_mode_end_to_end_with_hangs_and_crashes_and_no_hidden_test_in_any_prompt_or_event(
    tmp_path, tiny_dataset, scripted, eval_orchestrator, sandbox_address, settings
):
    events: list[tuple[str, bytes]] = []

    async def seen(msg) -> None:
        events.append((msg.subject, msg.data))

    nc = await nats.connect(settings.nats_url)
    await nc.subscribe(">", cb=seen)  # everything published on the bus, streams included
    await nc.flush()  # the subscription is live at the server before anything is published
    log = Log()
    output = tmp_path / "out"
    run = config(tiny_dataset, output, eval_orchestrator, sandbox_address, scripted.url, match_budget=True)
    try:
        outcome = await run_eval(run, log)
    finally:
        await nc.drain()

    # the hidden tests never reached the LLM (any call holding the marker fails) nor anything published on NATS
    assert (await scripted.astats())["failures"] == 0
    assert not [s for s, data in events if MARKER.encode() in data]
    assert any(s.startswith("agent.response.") for s, _ in events), "the councils' events were not seen"

    got = {(r["problem"], r["mode"]): r for r in lines(output)}
    assert len(got) == 12 and log.plan == (12, 0)
    for mode in Mode:
        double, spin, crash = (got[(f"Tiny/{name}", str(mode))] for name in ("tiny_double", "tiny_spin", "tiny_crash"))
        assert double["outcome"] == "passed" and double["hidden"] == "PASSED", double
        assert double["code"].startswith("import math\n") and "math.prod([x, 2])" in double["code"]  # preamble first
        assert double["prompt_tokens"] > 0 and double["completion_tokens"] > 0
        assert spin["outcome"] == "failed" and spin["hidden"] == "TIMEOUT", spin  # a hang is the answer's failure
        assert crash["outcome"] == "failed" and crash["hidden"] == "KILLED", crash  # so is a crash
    council = got[("Tiny/tiny_double", "council")]
    assert council["detail"]["status"] == "COMPLETED" and council["detail"]["verified"] is True
    assert council["llm_calls"] == 3 * 4 + 1  # generate, critique, revise, score (3 agents each), the selection
    assert got[("Tiny/tiny_double", "single")]["llm_calls"] == 1
    no_exec = got[("Tiny/tiny_double", "council-no-exec")]
    assert no_exec["detail"]["verified"] is False  # nothing ran: never verified
    sc = got[("Tiny/tiny_spin", "self-consistency")]
    assert sc["k"] > 1 and sc["llm_calls"] == sc["k"] and sc["detail"]["group"] == sc["k"]  # identical answers
    assert sc["detail"]["visible_passed"] == [1] * sc["k"]  # the hang is only on the hidden input
    # budget matching: k from the council's tokens, said in the log and the summary; the budgets end up equal
    assert any("self-consistency at the council's budget" in line and f"k = {sc['k']}" in line for line in log.lines)
    spent = {
        m: sum(r["prompt_tokens"] + r["completion_tokens"] for (_, mode), r in got.items() if mode == m)
        for m in ("council", "self-consistency")
    }
    assert abs(spent["self-consistency"] - spent["council"]) < 0.1 * spent["council"], spent

    summary = outcome.summary.read_text()
    for needed in ("`test-model`", scripted.url, "--seed 0", "256 per LLM call", "records finished", f"k = {sc['k']}"):
        assert needed in summary, needed
    for mode in Mode:
        assert f"| {mode} | 33.3% |" in summary, summary
    assert "| single vs council | 3 | 1 | 0 | 0 | 2 | 1 |" in summary
    assert outcome.plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


async def test_a_killed_run_resumes_where_it_stopped(
    tmp_path, tiny_dataset, scripted, eval_orchestrator, sandbox_address
):
    """`fleet eval` killed (SIGKILL) after its first record: the rerun keeps what was recorded and does the rest."""
    await scripted.acontrol(delay_ms=400)
    output = tmp_path / "out"
    args = [
        sys.executable, "-m", "services.cli", "eval", "--dataset", str(tiny_dataset), "--output", str(output),
        "--orchestrator", eval_orchestrator, "--sandbox", sandbox_address, "--llm-url", scripted.url,
        "--llm-model", "test-model", "--modes", "single,council", "--concurrency", "1", "--max-tokens", "256",
        "--sandbox-timeout", "3", "--deliberation-timeout", "60", "--base-dir", str(tmp_path / "no-fleet"),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    records = output / RECORDS
    try:
        async with asyncio.timeout(60):
            while not (records.exists() and records.read_text().count("\n") >= 1):
                assert process.returncode is None, (await process.stderr.read()).decode()[-2000:]
                await asyncio.sleep(0.05)
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()
    first = lines(output)
    assert 1 <= len(first) < 6, first

    await scripted.acontrol(delay_ms=0)
    result = await asyncio.to_thread(CliRunner().invoke, cli.app, args[3:])  # the same command again
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert f"6 (problem, mode) pairs, {len(first)} already recorded" in said
    assert "| single | 33.3% |" in said and f"summary: {output / 'summary.md'}" in said  # the summary, printed
    after = lines(output)
    keys = [(r["problem"], r["mode"]) for r in after]
    assert len(keys) == len(set(keys)) == 6, keys  # nothing recorded twice
    assert after[: len(first)] == first  # what the killed run recorded stands


async def test_settings_that_change_the_results_are_not_mixed_into_old_records(
    tmp_path, tiny_dataset, scripted, eval_orchestrator, sandbox_address
):
    output = tmp_path / "out"
    await run_eval(
        config(tiny_dataset, output, eval_orchestrator, sandbox_address, scripted.url, modes=(Mode.SINGLE,)), Log()
    )
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli.app,
        ["eval", "--dataset", str(tiny_dataset), "--output", str(output), "--modes", "single", "--max-tokens", "300",
         "--sandbox", sandbox_address, "--llm-url", scripted.url, "--llm-model", "test-model", "--sandbox-timeout", "3",
         "--deliberation-timeout", "60"],
    )  # fmt: skip
    said = " ".join(result.output.split())  # rich wraps lines
    assert result.exit_code == 1
    assert "max_tokens: recorded 256, now 300" in said and "use another --output" in said, said


def test_an_unreachable_orchestrator_is_named(tmp_path, tiny_dataset, sandbox_address, llm_server):
    address = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        cli.app,
        ["eval", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "out"), "--modes", "council",
         "--orchestrator", address, "--sandbox", sandbox_address, "--llm-url", llm_server.url,
         "--llm-model", "test-model"],
    )  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 1
    assert f"orchestrator at {address} not reachable" in said, said
