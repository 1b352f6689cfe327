"""The four modes of `fleet eval`, each a real code path, and the scoring of their answers on the hidden tests.

Every mode asks the same question the same way: the task is `Task.create(<problem's task id>, "Complete this
function ...", "DEV", tests=<visible tests>, max_tokens=M, base_code=<the prompt's preamble>)` and a sample is the
council's GENERATE request for it (`sample_request`: `generate_messages(system_prompt(task), task, agent)`, the
agent's temperature and seed, `stop_sequences(task)`; a unit test holds it equal to what the engine sends) to the
same LLM. The code of an answer is solution.py as the council's CHECK builds it (`program_of(content,
task.base_code)`: the preamble, then the answer's code blocks); an answer without code blocks of its own has none.

  single            one call by the DEV council's first agent (its persona and temperature), seed S + its seed.
  self-consistency  k independent calls: sample i is the DEV council's agent i mod 3 with seed S + that agent's
                    seed + 100 x (i div 3), so sample 0 is `single`'s request and samples 0-2 are the requests of
                    the council's GENERATE (at S = 0). Each distinct code runs against the visible tests in the
                    sandbox exactly as the council's CHECK runs them (solution.py + test_task.py); the chosen sample
                    passes the most visible tests, then belongs to the largest group of identical code (`ast.dump`
                    of the parsed code), then comes first (`choose`).
  council           Deliberate on the orchestrator (gRPC), execution on: proposals run against the visible tests.
  council-no-exec   the same with `Constraints.execute` false: nothing runs, the ablation of execution.
(S is `--seed`; the council's agents use the seeds of the orchestrator's councils, which are `make_council`'s: the
same as the eval's at S = 0.) The council modes run on the LLM the orchestrator is configured with.

Scoring (`score`): the chosen code as solution.py with the hidden tests as test_hidden.py, in the sandbox; PASSED is
a pass, anything else a failure; an answer without code fails unrun. Infrastructure errors (the sandbox, the LLM
server or the orchestrator could not do its part) are `error`s: they are neither passes nor failures. The hidden
tests go to the sandbox and nowhere else.
"""

from __future__ import annotations

import ast
import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from services.common.errors import FleetError
from services.common.execution import Execution, ExecutionResult, Outcome
from services.deliberation.domain import DeliberationResult, Phase, Task, make_council
from services.deliberation.engine import LLM
from services.deliberation.grounding import SOLUTION, TASK_TESTS, Sandbox, program_of
from services.deliberation.llm import LLMRequest, LLMResponse
from services.deliberation.prompts import SCHEMA_PROPOSAL, generate_messages, stop_sequences, system_prompt
from services.eval.dataset import EvalError, Problem
from services.eval.records import Record

HIDDEN_TESTS = "test_hidden.py"
SAMPLE_SEED_STRIDE = 100
MEMORY_MB = 512
AGENTS = make_council("DEV", 3).agents


class Mode(StrEnum):
    SINGLE = "single"
    SELF_CONSISTENCY = "self-consistency"
    COUNCIL = "council"
    COUNCIL_NO_EXEC = "council-no-exec"


COUNCIL_MODES = (Mode.COUNCIL, Mode.COUNCIL_NO_EXEC)


class Orchestrator(Protocol):
    """Runs one deliberation (services/eval/orchestrator.py over gRPC). Raises a FleetError when it cannot."""

    async def deliberate(self, task: Task) -> DeliberationResult: ...


@dataclass(frozen=True)
class Answer:
    """What a mode answered: the chosen code and what it cost; `error` when the infrastructure failed it."""

    code: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def agent_task(problem: Problem, max_tokens: int, *, execute: bool = True, timeout_seconds: float = 300.0) -> Task:
    """The task every mode answers (the council's `Task`: visible tests only, the preamble as the code it builds on)."""
    return Task.create(
        problem.task_id,
        problem.description,
        "DEV",
        tests=problem.visible_tests,
        max_tokens=max_tokens,
        execute=execute,
        timeout_seconds=timeout_seconds,
        base_code=problem.preamble,
    )


def answer_code(content: str, task: Task) -> str:
    """solution.py for an answer, as the council's CHECK builds it; "" when the answer has no code of its own."""
    program = program_of(content, task.base_code)
    return "" if program.from_base else program.code


def sample_request(task: Task, i: int, seed: int) -> LLMRequest:
    """Sample i of a problem: agent i mod 3's GENERATE call, its seed shifted by `seed` and by 100 x (i div 3)."""
    agent = AGENTS[i % len(AGENTS)]
    return LLMRequest(
        messages=generate_messages(system_prompt(task), task, agent),
        request_id=f"eval:{task.task_id}:{i}",
        temperature=agent.temperature,
        seed=(agent.seed or 0) + seed + SAMPLE_SEED_STRIDE * (i // len(AGENTS)),
        max_tokens=task.constraints.max_tokens,
        schema_name=SCHEMA_PROPOSAL,
        stop=stop_sequences(task),
    )


async def _samples(llm: LLM, task: Task, k: int, seed: int) -> tuple[list[LLMResponse], list[str]]:
    async def one(i: int) -> LLMResponse | str:
        try:
            return await llm.complete(sample_request(task, i, seed))
        except FleetError as e:  # Unavailable after its retries, or LLMError: the server gave no answer
            return f"LLM: {e.message}"

    got = await asyncio.gather(*(one(i) for i in range(k)))
    return [r for r in got if isinstance(r, LLMResponse)], [e for e in got if isinstance(e, str)]


def _usage(responses: Sequence[LLMResponse]) -> dict[str, int]:
    return {
        "prompt_tokens": sum(r.usage.prompt_tokens for r in responses),
        "completion_tokens": sum(r.usage.completion_tokens for r in responses),
        "llm_calls": len(responses),
    }


async def single(llm: LLM, problem: Problem, max_tokens: int, seed: int) -> Answer:
    task = agent_task(problem, max_tokens)
    responses, errors = await _samples(llm, task, 1, seed)
    if errors:
        return Answer(error=errors[0])
    (response,) = responses
    detail = {"finish_reason": response.finish_reason}
    return Answer(code=answer_code(response.content, task), detail=detail, **_usage(responses))


# --- self-consistency ---------------------------------------------------------------------------------------------


def code_key(code: str) -> str | None:
    """What makes two codes identical: `ast.dump` of the parsed code (layout and comments aside); None when there
    is no code or it does not parse."""
    if not code.strip():
        return None
    try:
        return ast.dump(ast.parse(code))
    except (SyntaxError, ValueError):
        return None


@dataclass(frozen=True)
class Sample:
    code: str
    visible_passed: int = 0  # visible tests it passed in the sandbox (0 when not run)


def choose(samples: Sequence[Sample]) -> int:
    """The index of the chosen sample: most visible tests passed, then the largest group of identical code
    (`code_key`; code that is empty or does not parse is in no group and comes after any that is in one), then the
    earliest."""
    if not samples:
        raise ValueError("no sample to choose from")
    keys = [code_key(s.code) for s in samples]
    groups = Counter(k for k in keys if k is not None)

    def rank(i: int) -> tuple[int, bool, int, int]:
        return (-samples[i].visible_passed, keys[i] is None, -groups.get(keys[i], 0), i)  # type: ignore[arg-type]

    return min(range(len(samples)), key=rank)


def execution(code: str, test_files: dict[str, str], timeout_seconds: float) -> Execution:
    """`code` as solution.py against `test_files`, in the sandbox, under the eval's memory limit."""
    return Execution(
        files={SOLUTION: code}, test_files=test_files, timeout_seconds=timeout_seconds, memory_mb=MEMORY_MB
    )


def visible_execution(problem: Problem, code: str, timeout_seconds: float) -> Execution:
    """The code against the visible tests, as the council's CHECK runs them (grounding.ProposalChecker)."""
    return execution(code, {TASK_TESTS: problem.visible_tests}, timeout_seconds)


def visible_passed(result: ExecutionResult) -> int:
    """Visible tests passed; none when the run hit a limit (as grounding's `tests_check` counts it)."""
    if result.outcome in (Outcome.TIMEOUT, Outcome.KILLED):
        return 0
    return sum(c.file == TASK_TESTS and c.outcome == "passed" for c in result.tests.cases)


async def self_consistency(
    llm: LLM, sandbox: Sandbox, problem: Problem, max_tokens: int, seed: int, k: int, timeout_seconds: float
) -> Answer:
    task = agent_task(problem, max_tokens)
    responses, errors = await _samples(llm, task, k, seed)
    if not responses:
        return Answer(error=errors[0])
    codes = [answer_code(r.content, task) for r in responses]
    passed: dict[str, int] = {}  # code_key -> visible tests passed, each distinct code run once
    if problem.visible_tests:
        distinct = {key: code for code in codes if (key := code_key(code)) is not None}
        try:
            results = await asyncio.gather(
                *(sandbox.execute(visible_execution(problem, code, timeout_seconds)) for code in distinct.values())
            )
        except FleetError as e:
            return Answer(error=f"sandbox (visible tests): {e.message}", **_usage(responses))
        passed = {key: visible_passed(r) for key, r in zip(distinct, results, strict=True)}
    samples = [Sample(code, passed.get(code_key(code) or "", 0)) for code in codes]
    chosen = choose(samples)
    keys = [code_key(c) for c in codes]
    detail = {
        "chosen": chosen,
        "visible_passed": [s.visible_passed for s in samples],
        "group": sum(k == keys[chosen] for k in keys) if keys[chosen] is not None else 1,
        "distinct": len({k for k in keys if k is not None}),
        "failed_calls": len(errors),
    }
    return Answer(code=codes[chosen], detail=detail, **_usage(responses))


# --- the council --------------------------------------------------------------------------------------------------


def _infrastructure_error(result: DeliberationResult) -> str:
    """Why the infrastructure, not the council, decided this result ("" when it did not): a CHECK that could not
    reach the sandbox, or no proposal at all because no LLM call got an answer."""
    for ranked in result.results:
        for revision in ranked.proposal.revisions:
            for check in revision.checks:
                if any(f.message.startswith("sandbox unavailable") for f in check.findings):
                    return f"the orchestrator's sandbox failed a CHECK: {check.findings[0].message}"
    if not result.results and result.failures and all(f.error.startswith("LLM ") for f in result.failures):
        return f"no proposal: {result.failures[0].error}"
    return ""


async def council(
    orchestrator: Orchestrator, problem: Problem, max_tokens: int, *, execute: bool, timeout_seconds: float
) -> Answer:
    task = agent_task(problem, max_tokens, execute=execute, timeout_seconds=timeout_seconds)
    try:
        result = await orchestrator.deliberate(task)
    except FleetError as e:
        return Answer(error=f"orchestrator: {e.message}")
    winner = result.winner
    generate = [u for u in result.usage if u.phase == Phase.GENERATE]
    detail = {
        "deliberation_id": result.deliberation_id,
        "status": str(result.status),
        "error_message": result.error_message,
        "verified": result.verified,
        "winner": result.winner_id,
        "selection": result.selection.method if result.selection else "",
        "agents": len(result.results),
        "generate_tokens": sum(u.total_tokens for u in generate),
        "generate_calls": len(generate),
    }
    return Answer(
        code=answer_code(winner.proposal.content, task) if winner else "",
        prompt_tokens=sum(u.prompt_tokens for u in result.usage),
        completion_tokens=sum(u.completion_tokens for u in result.usage),
        llm_calls=len(result.usage),  # one usage record per agent and phase: one call each at one review round
        detail=detail,
        error=_infrastructure_error(result),
    )


# --- scoring ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    outcome: str  # passed / failed / error (Record.outcome)
    hidden: str = ""  # the sandbox's outcome ("" when not run)
    reason: str = ""


def hidden_execution(problem: Problem, code: str, timeout_seconds: float) -> Execution:
    return execution(code, {HIDDEN_TESTS: problem.hidden_tests}, timeout_seconds)


def _why(result: ExecutionResult) -> str:
    bad = next((c for c in result.tests.cases if c.outcome != "passed"), None)
    said = f"{bad.name.split('::')[-1]}: {bad.message}" if bad and bad.message else ""
    tail = result.stdout.strip().splitlines()[-1:] if not said else []
    return " ".join(" ".join([f"{result.outcome}: {result.reason}", said, *tail]).split())[:300]


async def score(sandbox: Sandbox, problem: Problem, code: str, timeout_seconds: float) -> Score:
    if not code.strip():
        return Score("failed", "", "the answer holds no code")
    try:
        result = await sandbox.execute(hidden_execution(problem, code, timeout_seconds))
    except FleetError as e:
        return Score("error", "", f"sandbox: {e.message}")
    if result.passed:
        return Score("passed", str(result.outcome), f"{result.tests.passed} hidden test(s) passed")
    return Score("failed", str(result.outcome), _why(result))


# --- equal budget -----------------------------------------------------------------------------------------------


def matched_k(council_records: Sequence[Record]) -> tuple[int, str]:
    """Self-consistency's k for the council's budget, and how it was reached: the council's mean tokens per problem
    (prompt + completion, every phase) over the mean tokens of one of its GENERATE calls (the same request as one
    sample), rounded, at least 1. Only the council's scored records count."""
    scored = [r for r in council_records if r.scored]
    calls = sum(int(r.detail.get("generate_calls", 0)) for r in scored)
    if not scored or not calls:
        raise EvalError("--match-budget needs the council's measured tokens: no council record with a GENERATE call")
    per_problem = sum(r.tokens for r in scored) / len(scored)
    per_sample = sum(int(r.detail.get("generate_tokens", 0)) for r in scored) / calls
    k = max(1, round(per_problem / per_sample))
    return k, (
        f"council {per_problem:.0f} tokens per problem over {len(scored)} problems / {per_sample:.0f} tokens per "
        f"GENERATE call = {per_problem / per_sample:.2f} -> k = {k}"
    )
