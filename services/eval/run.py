"""`fleet eval`'s composition root: where the fleet is, the harness's self-check, the jobs, the report.

A run: resolve the endpoints (options, else VLLM_URL / VLLM_MODEL / ORCHESTRATOR_ADDRESS / SANDBOX_ADDRESS, else the
running local fleet's endpoints.json) and check that what the modes need answers; load and select the problems;
run every reference solution in the sandbox against its visible and hidden tests (a visible example the reference
fails is dropped, a problem whose reference fails its hidden tests is not evaluated: both reported); then answer and
score each (problem, mode) not yet recorded, problem by problem, `concurrency` at once, each record written as it
ends; with `match_budget`, self-consistency waits for the council's records and takes k from them
(`modes.matched_k`). Last, the summary (summary.md) and the plot (plot.png) of the selected problems and modes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from services.common.auth import BearerToken
from services.common.errors import FleetError
from services.common.execution import Execution, ExecutionResult, Outcome
from services.common.llm import VLLMClient
from services.common.sandbox import SandboxClient
from services.deliberation.grounding import TASK_TESTS, Sandbox
from services.eval import modes
from services.eval.dataset import Dataset, EvalError, Problem, fingerprint
from services.eval.modes import COUNCIL_MODES, HIDDEN_TESTS, Answer, Mode
from services.eval.orchestrator import OrchestratorClient
from services.eval.records import Record, RecordStore
from services.eval.report import Report, comparisons, markdown, plot, summarize

# Where each endpoint comes from: the option, else this environment variable, else this key of a local fleet's
# endpoints.json (`fleet up`).
ENDPOINTS = {
    "llm_url": ("--llm-url", "VLLM_URL", "vllm"),
    "llm_model": ("--llm-model", "VLLM_MODEL", "vllm_model"),
    "orchestrator": ("--orchestrator", "ORCHESTRATOR_ADDRESS", "orchestrator"),
    "sandbox": ("--sandbox", "SANDBOX_ADDRESS", "sandbox"),
}
ENV = tuple(env for _, env, _ in ENDPOINTS.values())  # what `fleet eval` reads from the environment
SUMMARY, PLOT = "summary.md", "plot.png"


@dataclass(frozen=True)
class Endpoints:
    llm_url: str
    llm_model: str
    orchestrator: str
    sandbox: str
    sources: dict[str, str] = field(default_factory=dict)  # endpoint -> where it came from
    token: str = field(default="", repr=False)  # the bearer token sent to the fleet (FLEET_TOKEN, else the local one)

    def describe(self, name: str) -> str:
        value, source = getattr(self, name), self.sources.get(name)
        return f"{value} (from {source})" if value and source else value or "-"


def resolve_endpoints(given: Mapping[str, str], env: Mapping[str, str], fleet_dir: Path) -> Endpoints:
    """Each endpoint from its option, else its environment variable, else the local fleet's endpoints.json ("" when
    none has it: `require` says what is missing)."""
    values, sources = {}, {}
    fleet: dict[str, str] | None = None
    for name, (option, var, key) in ENDPOINTS.items():
        if given.get(name):
            values[name], sources[name] = given[name], option
        elif env.get(var):
            values[name], sources[name] = env[var], var
        else:
            if fleet is None:
                from services.local.fleet import ENDPOINTS_FILE, read_endpoints

                fleet, fleet_file = read_endpoints(fleet_dir), fleet_dir / ENDPOINTS_FILE
            values[name] = fleet.get(key, "")
            if values[name]:
                sources[name] = str(fleet_file)
    from services.local.fleet import read_endpoints, user_token

    token = env.get("FLEET_TOKEN") or user_token(fleet if fleet is not None else read_endpoints(fleet_dir))
    return Endpoints(**values, sources=sources, token=token)


def require(endpoints: Endpoints, wanted: Sequence[Mode]) -> None:
    """EvalError naming every endpoint the modes need and nobody gave."""
    need = ["llm_url", "llm_model", "sandbox"] + (["orchestrator"] if set(wanted) & set(COUNCIL_MODES) else [])
    missing = [n for n in need if not getattr(endpoints, n)]
    if missing:
        how = ", ".join(f"{ENDPOINTS[n][0]} (or {ENDPOINTS[n][1]})" for n in missing)
        raise EvalError(
            f"no {', '.join(missing)}: give {how}, or start a local fleet (`fleet up`), whose endpoints.json is read"
        )


@dataclass(frozen=True)
class EvalConfig:
    dataset: Dataset
    output: Path
    endpoints: Endpoints
    modes: tuple[Mode, ...] = tuple(Mode)
    problems: tuple[str, ...] = ()  # dataset ids; () = all
    limit: int = 0  # the first N of the selection; 0 = all
    concurrency: int = 4  # (problem, mode) jobs at once
    seed: int = 0
    k: int = 3  # self-consistency's samples, unless match_budget
    match_budget: bool = False
    max_tokens: int = 512  # per LLM call, every mode
    sandbox_timeout: float = 10.0  # seconds per sandbox execution (visible and hidden tests)
    deliberation_timeout: float = 1800.0
    sandbox_slots: int = 4  # executions the eval itself has in flight


class Progress(Protocol):
    """What a run tells its user (the CLI's progress bar, the bench's log lines)."""

    def say(self, text: str) -> None: ...

    def planned(self, total: int, recorded: int) -> None: ...

    def recorded(self, record: Record) -> None: ...


@dataclass(frozen=True)
class EvalResult:
    report: Report
    summary: Path
    plot: Path


def select(problems: Sequence[Problem], ids: Sequence[str], limit: int) -> list[Problem]:
    if ids:
        known = {p.problem_id for p in problems}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise EvalError(f"--problems: unknown {', '.join(unknown)} (ids look like {problems[0].problem_id!r})")
        problems = [p for p in problems if p.problem_id in set(ids)]
    return list(problems[:limit] if limit else problems)


class BoundedSandbox:
    """The sandbox with at most `n` of this run's executions in flight (it queues the rest itself, up to a point)."""

    def __init__(self, sandbox: Sandbox, n: int) -> None:
        self.sandbox = sandbox
        self._gate = asyncio.Semaphore(n)

    async def execute(self, execution: Execution) -> ExecutionResult:
        async with self._gate:
            return await self.sandbox.execute(execution)


async def calibrate(sandbox: Sandbox, problems: Sequence[Problem], timeout: float) -> tuple[list[Problem], list[str]]:
    """Run each reference solution against its visible and hidden tests (the harness checks itself): visible
    examples the reference fails are dropped; a problem whose reference fails its hidden tests is left out. Returns
    the problems to evaluate and what was found."""

    async def one(p: Problem) -> tuple[Problem | None, str]:
        if not p.reference:
            return p, f"{p.problem_id}: no canonical solution, its visible tests are not checked"
        files = {HIDDEN_TESTS: p.hidden_tests, **({TASK_TESTS: p.visible_tests} if p.examples else {})}
        try:
            result = await sandbox.execute(modes.execution(p.reference, files, timeout))
        except FleetError as e:
            raise EvalError(f"the sandbox could not run {p.problem_id}'s reference solution: {e.message}") from None
        cases = result.tests.cases
        limited = result.outcome in (Outcome.TIMEOUT, Outcome.KILLED)
        if limited or not any(c.file == HIDDEN_TESTS and c.outcome == "passed" for c in cases):
            why = f"{result.outcome}: {result.reason}"
            return None, f"{p.problem_id}: not evaluated, its reference solution fails its hidden tests ({why})"
        failing = {c.name.split("::")[-1] for c in cases if c.file == TASK_TESTS and c.outcome != "passed"}
        if not failing:
            return p, ""
        kept = tuple(e for n, e in enumerate(p.examples, start=1) if f"test_example_{n}" not in failing)
        dropped = f"{len(p.examples) - len(kept)} of {len(p.examples)} docstring examples dropped"
        note = f"{p.problem_id}: {dropped} (the reference fails them)"
        return replace(p, examples=kept), note

    checked = await asyncio.gather(*(one(p) for p in problems))
    return [p for p, _ in checked if p is not None], [n for _, n in checked if n]


async def run_eval(config: EvalConfig, progress: Progress) -> EvalResult:
    wanted = [m for m in Mode if m in config.modes]
    endpoints = config.endpoints
    require(endpoints, wanted)
    if config.match_budget and Mode.SELF_CONSISTENCY in wanted and Mode.COUNCIL not in wanted:
        raise EvalError("--match-budget takes k from the council's measured tokens: add council to --modes")
    everything = await asyncio.to_thread(config.dataset.load)
    problems = select(everything, config.problems, config.limit)
    settings = {
        "dataset": fingerprint(everything),
        "model": endpoints.llm_model,
        "max_tokens": config.max_tokens,
        "seed": config.seed,
        "sandbox_timeout": config.sandbox_timeout,
        "deliberation_timeout": config.deliberation_timeout,
    }
    store = RecordStore(config.output, settings)
    for name in ("llm_url", "orchestrator", "sandbox"):
        progress.say(f"{name.replace('_', ' ')}: {endpoints.describe(name)}")
    progress.say(f"model: {endpoints.describe('llm_model')}")

    token = BearerToken(value=endpoints.token)
    sandbox_client = SandboxClient(endpoints.sandbox, token=token)
    sandbox = BoundedSandbox(sandbox_client, config.sandbox_slots)
    llm = VLLMClient(endpoints.llm_url, endpoints.llm_model, timeout=900.0, max_retries=2)
    orchestrator = OrchestratorClient(endpoints.orchestrator, token=token) if set(wanted) & set(COUNCIL_MODES) else None
    try:
        if orchestrator is not None:
            await orchestrator.check()
        if {Mode.SINGLE, Mode.SELF_CONSISTENCY} & set(wanted):
            await _check_llm(llm)
        progress.say(f"checking the harness: {len(problems)} reference solutions in the sandbox ...")
        problems, notes = await calibrate(sandbox, problems, config.sandbox_timeout)
        for note in notes:
            progress.say(note)

        if not config.match_budget:
            _check_k(store, problems, config.k)
        jobs = [(p, m) for p in problems for m in wanted]
        todo = [(p, m) for p, m in jobs if not store.done(p.problem_id, m)]
        progress.planned(len(jobs), len(jobs) - len(todo))
        gate = asyncio.Semaphore(config.concurrency)

        async def job(problem: Problem, mode: Mode, k: int) -> None:
            async with gate:
                record = await _answer_and_score(config, llm, sandbox, orchestrator, problem, mode, k)
            store.add(record)
            progress.recorded(record)

        def deferred(mode: Mode) -> bool:  # self-consistency waits for the council's records, which give its k
            return config.match_budget and mode == Mode.SELF_CONSISTENCY

        async with asyncio.TaskGroup() as group:
            for p, m in todo:
                if not deferred(m):
                    group.create_task(job(p, m, config.k))
        k, how = config.k, f"--k {config.k}"
        if config.match_budget and Mode.SELF_CONSISTENCY in wanted:
            k, how = modes.matched_k([r for p in problems if (r := store.get(p.problem_id, Mode.COUNCIL))])
            progress.say(f"self-consistency at the council's budget: {how}")
            _check_k(store, problems, k)
        async with asyncio.TaskGroup() as group:
            for p, m in todo:
                if deferred(m):
                    group.create_task(job(p, m, k))
    finally:
        await sandbox_client.close()
        await llm.aclose()
        if orchestrator is not None:
            await orchestrator.close()

    by_mode = {str(m): [r for p in problems if (r := store.get(p.problem_id, m))] for m in wanted}
    return await asyncio.to_thread(_write_report, config, problems, by_mode, notes, k, how)


async def _check_llm(llm: VLLMClient) -> None:
    try:
        served = await llm.models()
    except FleetError as e:
        raise EvalError(f"the LLM server: {e.message} (check --llm-url / VLLM_URL)") from None
    if llm.model not in served:
        raise EvalError(
            f"the LLM server at {llm.base_url} serves {', '.join(served)}, not {llm.model!r} (--llm-model / VLLM_MODEL)"
        )


def _check_k(store: RecordStore, problems: Sequence[Problem], k: int) -> None:
    other = {r.k for p in problems if (r := store.get(p.problem_id, Mode.SELF_CONSISTENCY)) and r.scored and r.k != k}
    if other:
        raise EvalError(
            f"{store.folder} holds self-consistency records with k = {', '.join(map(str, sorted(other)))}, this "
            f"run's k is {k}: use another --output"
        )


async def _answer_and_score(
    config: EvalConfig,
    llm: VLLMClient,
    sandbox: Sandbox,
    orchestrator: OrchestratorClient | None,
    problem: Problem,
    mode: Mode,
    k: int,
) -> Record:
    started = time.monotonic()
    answer: Answer
    if mode == Mode.SINGLE:
        answer = await modes.single(llm, problem, config.max_tokens, config.seed)
    elif mode == Mode.SELF_CONSISTENCY:
        answer = await modes.self_consistency(
            llm, sandbox, problem, config.max_tokens, config.seed, k, config.sandbox_timeout
        )
    else:
        assert orchestrator is not None
        answer = await modes.council(
            orchestrator,
            problem,
            config.max_tokens,
            execute=mode == Mode.COUNCIL,
            timeout_seconds=config.deliberation_timeout,
        )
    seconds = time.monotonic() - started
    if answer.error:
        outcome, hidden, reason = "error", "", answer.error
    else:
        scored = await modes.score(sandbox, problem, answer.code, config.sandbox_timeout)
        outcome, hidden, reason = scored.outcome, scored.hidden, scored.reason
    return Record(
        problem=problem.problem_id,
        mode=str(mode),
        outcome=outcome,  # type: ignore[arg-type]
        reason=reason,
        hidden=hidden,
        code=answer.code,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        llm_calls=answer.llm_calls,
        seconds=round(seconds, 3),
        k=k if mode == Mode.SELF_CONSISTENCY else 0,
        detail=answer.detail,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _write_report(
    config: EvalConfig,
    problems: Sequence[Problem],
    by_mode: dict[str, list[Record]],
    notes: list[str],
    k: int,
    how: str,
) -> EvalResult:
    e = config.endpoints
    finished = sorted(r.finished_at for rs in by_mode.values() for r in rs)
    chosen = [
        f"--problems {','.join(config.problems)}" if config.problems else "",
        f"the first {config.limit}" if config.limit else "",
    ]
    selection = ", ".join(x for x in chosen if x)
    endpoint = f"{e.llm_url} (single, self-consistency)"
    if set(by_mode) & {str(m) for m in COUNCIL_MODES}:
        endpoint += (
            f"; the council modes: the LLM of the orchestrator at {e.orchestrator} (the same server when both come "
            "from one fleet)"
        )
    facts = [
        ("dataset", f"{config.dataset.name}: {len(problems)} problems" + (f" ({selection})" if selection else "")),
        ("model", f"`{e.llm_model}`"),
        ("endpoint", endpoint),
        ("sandbox", f"{e.sandbox}, {config.sandbox_timeout:g} s per execution"),
        ("max tokens", f"{config.max_tokens} per LLM call, every mode"),
        (
            "seeds",
            f"--seed {config.seed}: sample i is DEV agent i mod 3 with its seed + {config.seed} + "
            f"{modes.SAMPLE_SEED_STRIDE} x (i div 3) (single: sample 0); the councils use their agents' own seeds",
        ),
    ]
    if str(Mode.SELF_CONSISTENCY) in by_mode:
        facts.append(("self-consistency", f"k = {k} ({how})"))
    facts.append(("date", f"records finished {finished[0]} to {finished[-1]}" if finished else "no record"))
    facts.append(("written", datetime.now(UTC).isoformat(timespec="seconds")))
    summaries = [summarize(m, rs) for m, rs in by_mode.items()]
    title = f"fleet eval: {config.dataset.name}, {len(problems)} problems, {e.llm_model}"
    report = Report(
        title=title,
        facts=facts,
        summaries=summaries,
        pairs=comparisons(by_mode),
        errors=[r for rs in by_mode.values() for r in rs if not r.scored],
        notes=notes,
    )
    summary, figure = config.output / SUMMARY, config.output / PLOT
    summary.write_text(markdown(report, PLOT))
    plot(
        summaries,
        figure,
        f"{title}\nmax tokens {config.max_tokens}, seed {config.seed}, {finished[-1][:10] if finished else ''}",
    )
    return EvalResult(report, summary, figure)
