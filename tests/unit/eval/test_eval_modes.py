"""The modes with fakes for the LLM, the sandbox and the orchestrator: what each asks, what self-consistency
chooses, what the council's result becomes, how budgets are matched, how answers are scored."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.common.errors import Unavailable
from services.common.execution import Execution, ExecutionResult, Outcome, TestCase, TestCounts
from services.deliberation.domain import (
    CheckResult,
    DeliberationResult,
    DeliberationStatus,
    Finding,
    Phase,
    Proposal,
    RankedProposal,
    Revision,
    Selection,
    UsageRecord,
    make_council,
)
from services.deliberation.engine import DeliberationEngine, InProcessExecutor
from services.deliberation.llm import LLMRequest, LLMResponse, TokenUsage
from services.deliberation.prompts import generate_messages, system_prompt
from services.eval import modes
from services.eval.dataset import EvalError, Problem
from services.eval.modes import AGENTS, Sample, agent_task, choose, code_key, matched_k, sample_request
from services.eval.records import Record

PROBLEM = Problem(
    problem_id="Mine/1",
    prompt='from typing import List\n\n\ndef inc(x: int) -> int:\n    """Add one.\n    >>> inc(1)\n    2\n    """\n',
    entry_point="inc",
    test="def check(candidate):\n    assert candidate(2) == 3\n",
    canonical_solution="    return x + 1\n",
    examples=(("inc(1)", "2"),),
)
RIGHT = "def inc(x):\n    return x + 1\n"
BASE = "from typing import List"  # PROBLEM's preamble: solution.py starts with it
ALSO_RIGHT = "def inc(x):\n    # the same, another layout\n    return (x + 1)\n"
WRONG = "def inc(x):\n    return x\n"


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}```\n"


def built(code: str) -> str:
    """solution.py as the council's CHECK builds it for PROBLEM: the preamble, then the answer's code."""
    return f"{BASE}\n\n{code}"


class FakeLLM:
    def __init__(self, answers: list[str], fail: set[int] = frozenset()) -> None:
        self.answers, self.fail = answers, fail
        self.requests: list[LLMRequest] = []

    async def complete(self, request: LLMRequest, on_delta=None) -> LLMResponse:
        i = len(self.requests)
        self.requests.append(request)
        if i in self.fail:
            raise Unavailable("vLLM at http://x unavailable after 3 attempts")
        return LLMResponse(self.answers[i % len(self.answers)], TokenUsage(100, 10), finish_reason="stop")


class FakeSandbox:
    """Passes the visible test when solution.py is right (decided by the text, never by running it)."""

    def __init__(self, down: bool = False) -> None:
        self.executions: list[Execution] = []
        self.down = down

    async def execute(self, execution: Execution) -> ExecutionResult:
        self.executions.append(execution)
        if self.down:
            raise Unavailable("sandbox at 127.0.0.1:1: UNAVAILABLE")
        ok = "x + 1" in execution.files["solution.py"]
        (file,) = execution.test_files
        case = TestCase(f"{file}::test_example_1", "passed" if ok else "failed", "" if ok else "assert 1 == 2")
        return ExecutionResult(Outcome.PASSED if ok else Outcome.FAILED, tests=TestCounts.of([case]), reason="r")


def test_every_mode_asks_the_councils_generate_question():
    task = agent_task(PROBLEM, 384)
    assert task.task_id == "Mine-1" and task.constraints.tests == PROBLEM.visible_tests
    assert task.constraints.max_tokens == 384 and task.description == PROBLEM.description
    for i in range(7):
        r = sample_request(task, i, seed=5)
        agent = AGENTS[i % 3]
        assert r.messages == generate_messages(system_prompt(task), task, agent)
        assert r.temperature == agent.temperature and r.max_tokens == 384 and r.json_schema is None
        assert r.seed == agent.seed + 5 + 100 * (i // 3)
    assert len({sample_request(task, i, 0).seed for i in range(30)}) == 30  # independent samples


async def test_samples_are_the_requests_the_councils_generate_sends():
    """The engine's GENERATE for the same task, recorded from a real DeliberationEngine: sample i (at seed 0) is
    agent i's request, whatever the engine puts in it (prompt, temperature, seed, max_tokens, stop)."""
    task = agent_task(PROBLEM, 256)
    llm = FakeLLM([fenced(RIGHT)])
    await DeliberationEngine(InProcessExecutor(llm)).run(task, make_council("DEV", 3), None, "d")
    generate = [r for r in llm.requests if r.request_id.split(":")[1] == Phase.GENERATE]
    assert len(generate) == 3
    for i, sent in enumerate(generate):
        assert replace(sample_request(task, i, 0), request_id=sent.request_id) == sent


def test_an_answer_without_code_of_its_own_has_none():
    task = agent_task(PROBLEM, 256)
    assert modes.answer_code("I would add one to x.", task) == ""
    assert modes.answer_code(fenced(RIGHT), task) == built(RIGHT)


async def test_single_is_sample_zero():
    llm = FakeLLM([fenced(RIGHT)])
    answer = await modes.single(llm, PROBLEM, 256, seed=0)
    assert answer.code == built(RIGHT)
    assert (answer.prompt_tokens, answer.completion_tokens, answer.llm_calls) == (100, 10, 1)
    assert llm.requests == [sample_request(agent_task(PROBLEM, 256), 0, 0)]
    failed = await modes.single(FakeLLM([""], fail={0}), PROBLEM, 256, seed=0)
    assert failed.error.startswith("LLM: vLLM at http://x unavailable") and not failed.code


def test_code_key_ignores_layout_and_comments_only():
    assert code_key(RIGHT) == code_key(ALSO_RIGHT) != code_key(WRONG)
    assert code_key("") is None and code_key("def broken(:\n") is None


@pytest.mark.parametrize(
    ("samples", "chosen"),
    [
        # the most visible tests passed wins over a larger group of identical code
        ([Sample(WRONG, 0), Sample(WRONG, 0), Sample(RIGHT, 1)], 2),
        # among those that pass as many, the largest group of identical code (layout aside)
        ([Sample("def inc(x):\n    return 1 + x\n", 1), Sample(RIGHT, 1), Sample(ALSO_RIGHT, 1)], 1),
        # no visible test: majority of identical code
        ([Sample(WRONG), Sample(RIGHT), Sample(WRONG)], 0),
        # a tie between groups: the earliest
        ([Sample(WRONG), Sample(RIGHT), Sample(RIGHT), Sample(WRONG)], 0),
        # code that is empty or does not parse comes after code that does
        ([Sample(""), Sample("def inc(:"), Sample(WRONG)], 2),
        ([Sample(""), Sample("")], 0),
    ],
)
def test_self_consistency_chooses_by_execution_then_majority(samples, chosen):
    assert choose(samples) == chosen


async def test_self_consistency_runs_each_distinct_code_once_against_the_visible_tests_like_check():
    llm = FakeLLM([fenced(WRONG), fenced(RIGHT), fenced(WRONG), fenced(ALSO_RIGHT), "no code at all"])
    sandbox = FakeSandbox()
    answer = await modes.self_consistency(llm, sandbox, PROBLEM, 256, 0, 5, 7.0)
    assert len(llm.requests) == 5 and [r.seed for r in llm.requests] == [
        sample_request(agent_task(PROBLEM, 256), i, 0).seed for i in range(5)
    ]
    assert len(sandbox.executions) == 2  # WRONG and RIGHT (ALSO_RIGHT is RIGHT); no code runs nothing
    for e in sandbox.executions:  # the council's CHECK: solution.py + test_task.py, never the hidden tests
        assert set(e.files) == {"solution.py"} and e.test_files == {"test_task.py": PROBLEM.visible_tests}
        assert e.timeout_seconds == 7.0 and "check(" not in str(e)
    assert answer.code == built(RIGHT) and answer.llm_calls == 5 and answer.prompt_tokens == 500
    assert answer.detail == {
        "chosen": 1,
        "visible_passed": [0, 1, 0, 1, 0],
        "group": 2,
        "distinct": 2,
        "failed_calls": 0,
    }


async def test_self_consistency_without_the_sandbox_or_the_llm_is_an_infrastructure_error():
    down = await modes.self_consistency(FakeLLM([fenced(RIGHT)]), FakeSandbox(down=True), PROBLEM, 256, 0, 3, 5.0)
    assert down.error.startswith("sandbox (visible tests): sandbox at 127.0.0.1:1") and down.llm_calls == 3
    nobody = await modes.self_consistency(FakeLLM([""], fail={0, 1}), FakeSandbox(), PROBLEM, 256, 0, 2, 5.0)
    assert nobody.error.startswith("LLM: ")
    some = await modes.self_consistency(FakeLLM([fenced(RIGHT)], fail={0}), FakeSandbox(), PROBLEM, 256, 0, 3, 5.0)
    assert not some.error and some.code == built(RIGHT) and some.llm_calls == 2 and some.detail["failed_calls"] == 1


def result(content: str, checks: tuple[CheckResult, ...] = (), **over) -> DeliberationResult:
    proposal = Proposal("d:agent-dev-002", "agent-dev-002", "DEV", content, (Revision(0, content, "original", checks),))
    usage = (
        UsageRecord("agent-dev-001", Phase.GENERATE, 100, 50),
        UsageRecord("agent-dev-002", Phase.GENERATE, 100, 70),
        UsageRecord("agent-dev-001", Phase.SCORE, 400, 30),
    )
    fields = {
        "deliberation_id": "d",
        "task_id": "Mine-1",
        "role": "DEV",
        "council_id": "council-dev",
        "status": DeliberationStatus.COMPLETED,
        "results": (RankedProposal(1, 8.0, 8.0, 10.0, proposal, checks),),
        "selection": Selection("agent-dev-002", "ARCHITECT", "it passes", "agent-architect-001"),
        "winner_id": "agent-dev-002",
        "usage": usage,
        "verified": True,
        **over,
    }
    return DeliberationResult(**fields)


class FakeOrchestrator:
    def __init__(self, answer: DeliberationResult | Exception) -> None:
        self.answer = answer
        self.tasks = []

    async def deliberate(self, task):
        self.tasks.append(task)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_the_council_answers_with_its_winners_code_and_its_measured_tokens():
    orchestrator = FakeOrchestrator(
        result(fenced(RIGHT) + "\n```python\ndef test_inc():\n    assert inc(1) == 2\n```\n")
    )
    answer = await modes.council(orchestrator, PROBLEM, 256, execute=False, timeout_seconds=99)
    (task,) = orchestrator.tasks
    assert task == agent_task(PROBLEM, 256, execute=False, timeout_seconds=99)
    assert not task.constraints.execute and task.constraints.tests == PROBLEM.visible_tests
    assert task.base_code == BASE
    assert answer.code == built(RIGHT)  # program_of: the preamble and the code block, not the own tests
    assert (answer.prompt_tokens, answer.completion_tokens, answer.llm_calls) == (600, 150, 3)
    assert answer.detail["generate_tokens"] == 320 and answer.detail["generate_calls"] == 2
    assert answer.detail["selection"] == "ARCHITECT" and answer.detail["status"] == "COMPLETED" and not answer.error
    none = await modes.council(
        FakeOrchestrator(result("", winner_id="", selection=None, results=())),
        PROBLEM,
        256,
        execute=True,
        timeout_seconds=9,
    )
    assert none.code == "" and not none.error  # no winner: nothing to score, the council's failure


async def test_the_council_is_an_infrastructure_error_when_the_orchestrator_or_its_sandbox_failed():
    down = await modes.council(
        FakeOrchestrator(Unavailable("orchestrator at h:1: Deliberate: UNAVAILABLE: x")),
        PROBLEM,
        256,
        execute=True,
        timeout_seconds=9,
    )
    assert down.error == "orchestrator: orchestrator at h:1: Deliberate: UNAVAILABLE: x"
    unavailable = CheckResult(
        "tests.task", False, True, (Finding("sandbox unavailable: sandbox at s:1 is busy"),), "not executed"
    )
    checked = await modes.council(
        FakeOrchestrator(result(fenced(RIGHT), (unavailable,))), PROBLEM, 256, execute=True, timeout_seconds=9
    )
    assert checked.error == "the orchestrator's sandbox failed a CHECK: sandbox unavailable: sandbox at s:1 is busy"
    failing = CheckResult("tests.task", False, True, (Finding("test_example_1 failed: assert 1 == 2"),))
    fine = await modes.council(
        FakeOrchestrator(result(fenced(WRONG), (failing,))), PROBLEM, 256, execute=True, timeout_seconds=9
    )
    assert not fine.error and fine.code == built(WRONG)  # a failing test is the council's business, not an error


async def test_scoring_runs_the_code_against_the_hidden_tests_only():
    sandbox = FakeSandbox()
    passed = await modes.score(sandbox, PROBLEM, built(RIGHT), 4.0)
    (e,) = sandbox.executions
    assert e.files == {"solution.py": built(RIGHT)} and e.timeout_seconds == 4.0
    assert e.test_files == {"test_hidden.py": PROBLEM.hidden_tests}
    assert (passed.outcome, passed.hidden) == ("passed", "PASSED")
    failed = await modes.score(sandbox, PROBLEM, built(WRONG), 4.0)
    assert (failed.outcome, failed.hidden) == ("failed", "FAILED") and "assert 1 == 2" in failed.reason
    nothing = await modes.score(sandbox, PROBLEM, "", 4.0)
    assert (nothing.outcome, nothing.hidden) == ("failed", "") and len(sandbox.executions) == 2  # not run
    down = await modes.score(FakeSandbox(down=True), PROBLEM, built(RIGHT), 4.0)
    assert down.outcome == "error" and down.reason == "sandbox: sandbox at 127.0.0.1:1: UNAVAILABLE"


def council_record(problem: str, tokens: int, generate_tokens: int, outcome: str = "failed") -> Record:
    return Record(
        problem,
        "council",
        outcome,
        prompt_tokens=tokens,
        detail={"generate_tokens": generate_tokens, "generate_calls": 3},  # type: ignore[arg-type]
    )


def test_matched_k_spends_the_councils_tokens_per_problem_on_samples():
    records = [council_record("a", 3000, 600), council_record("b", 5000, 600, "passed")]
    k, how = matched_k(records)
    assert k == 20 and "4000 tokens per problem over 2 problems / 200 tokens per GENERATE call" in how  # 4000 / 200
    assert matched_k([council_record("a", 650, 600)])[0] == 3  # 650 / 200 = 3.25: the nearest k
    errors = [replace(council_record("c", 10**6, 3), outcome="error")]
    assert matched_k(records + errors)[0] == 20  # infrastructure errors measure nothing
    assert matched_k([council_record("a", 10, 600)])[0] == 1  # at least one sample
    with pytest.raises(EvalError, match="--match-budget needs the council's measured tokens"):
        matched_k(errors)
