"""Grounded deliberation with a scripted LLM and a scripted sandbox: execution results reach the critic and the
author, gate the finals and decide `verified`; and the engine defects found in review stay fixed (truncated
answers, an architect judging its own proposal, dropped votes, ties on warnings)."""

from __future__ import annotations

import json

import pytest
from scripted_llm import TASK_TESTS, ScriptedLLM, ScriptedSandbox, candidates_shown, make_task, parts

from services.deliberation.domain import DeliberationResult, DeliberationStatus, Phase, Role, Task, make_council
from services.deliberation.engine import DeliberationEngine, InProcessExecutor
from services.deliberation.grounding import ProposalChecker, program_of

CODE = """```python
from datetime import date


def parse_iso(text: str) -> date:
    return date.fromisoformat(text.strip()){bug}
```
"""


def proposal_by(agent: str, bug: bool = False, extra: str = "") -> str:
    return f"Proposal by {agent}.\n\n" + CODE.format(bug="  # BUG" if bug else "") + extra


async def deliberate(llm, task, council=None, architect=None, sandbox=None) -> DeliberationResult:
    council = council or make_council(Role.DEV, 3)
    architect = architect if architect is not None else make_council(Role.ARCHITECT, 1).agents[0]
    engine = DeliberationEngine(InProcessExecutor(llm), checker=ProposalChecker(sandbox or ScriptedSandbox()))
    return await engine.run(task, council, architect, "d1")


def check(result: DeliberationResult, author: str, name: str):
    ranked = next(r for r in result.results if r.proposal.author_id == author)
    return next(c for c in ranked.checks if c.name == name)


def scores_favouring(favourite: str):
    def scores(request):
        out = {}
        for label, author in candidates_shown(request).items():
            keys = [k for k in request.json_schema["properties"][label]["properties"] if k != "reason"]
            out[label] = {**dict.fromkeys(keys, 9 if author == favourite else 5), "reason": "as I see it"}
        return json.dumps(out)

    return scores


async def test_failing_tests_are_shown_to_the_critic_and_the_author_and_the_fix_is_checked_again():
    def propose(request):
        agent = parts(request)["agent"]
        return proposal_by(agent, bug=agent == "agent-dev-002")

    def revise(request):  # the author fixes what the tests showed
        return proposal_by(parts(request)["agent"])

    llm = ScriptedLLM(answers={"proposal": propose, "revision": revise})
    result = await deliberate(llm, make_task(tests=TASK_TESTS))

    (critique,) = [r for r in llm.by_schema("critique") if parts(r)["target"] == "agent-dev-002"]
    shown = critique.messages[-1].content
    assert "FAILED tests.task" in shown and "test_parses_a_date failed: AssertionError: assert 28 == 29" in shown
    (revision,) = [r for r in llm.by_schema("revision") if parts(r)["agent"] == "agent-dev-002"]
    assert "FAILED tests.task" in revision.messages[-1].content and "assert 28 == 29" in revision.messages[-1].content
    fixed = next(r for r in result.results if r.proposal.author_id == "agent-dev-002").proposal
    first, second = fixed.revisions
    assert [c.passed for c in first.checks if c.name == "tests.task"] == [False]
    assert [c.passed for c in second.checks if c.name == "tests.task"] == [True]  # the revision was run again
    assert result.verified


async def test_a_proposal_failing_its_tests_is_no_finalist_while_another_passes():
    def propose(request):
        agent = parts(request)["agent"]
        return proposal_by(agent, bug=agent == "agent-dev-001")

    llm = ScriptedLLM(
        answers={
            "proposal": propose,
            "revision": lambda r: r.messages[2].content,
            "scores": scores_favouring("agent-dev-001"),
        }
    )
    result = await deliberate(llm, make_task(tests=TASK_TESTS))
    assert result.status == DeliberationStatus.COMPLETED
    best_scored = max(result.results, key=lambda r: r.score)
    assert best_scored.proposal.author_id == "agent-dev-001"  # the peers loved it ...
    assert [r.proposal.author_id for r in result.results][-1] == "agent-dev-001"  # ... its tests did not
    (select,) = llm.by_schema("selection")
    assert select.json_schema["properties"]["winner"]["enum"] == ["A", "B"]  # the two that pass
    assert "agent-dev-001" not in select.messages[-1].content
    assert result.winner_id != "agent-dev-001" and result.verified
    assert "tests.task (the task's tests: 2/2 passed" in result.verified_reason
    failing = check(result, "agent-dev-001", "tests.task")
    assert not failing.passed and failing.gating and "assert 28 == 29" in failing.findings[0].message


async def test_when_no_proposal_passes_the_best_completes_unverified_and_says_so():
    llm = ScriptedLLM(answers={"proposal": lambda r: proposal_by(parts(r)["agent"], bug=True)})
    result = await deliberate(llm, make_task(tests=TASK_TESTS))
    assert result.status == DeliberationStatus.COMPLETED and result.winner_id
    assert not result.verified
    assert result.verified_reason.startswith("the winner failed tests.task: test_parses_a_date failed")
    assert "no proposal passed every gating check" in result.verified_reason
    assert "no proposal passed every gating check: the best candidate won, unverified" in result.notes
    event = result.outcome_event("P-1")
    assert event.verified is False and event.verified_reason == result.verified_reason


async def test_a_code_task_answered_without_code_fails_its_deliverable_check():
    def propose(request):
        agent = parts(request)["agent"]
        if agent == "agent-dev-003":
            return proposal_by(agent)
        return f"Proposal by {agent}: use a regular expression and lowercase everything. Tests are good."

    llm = ScriptedLLM(answers={"proposal": propose, "revision": lambda r: r.messages[2].content})
    result = await deliberate(llm, make_task(tests=TASK_TESTS))
    no_code = check(result, "agent-dev-001", "deliverable")
    assert not no_code.passed and no_code.applicable and "```python" in no_code.findings[0].message
    assert not check(result, "agent-dev-001", "tests.task").passed  # nothing to run the task's tests on
    assert result.results[0].proposal.author_id == "agent-dev-003" == result.winner_id
    assert result.selection.method == "FALLBACK" and "only one proposal passed every gating check" in (
        result.selection.rationale
    )
    assert result.verified


async def test_without_tests_a_code_task_is_not_verified_and_says_why():
    result = await deliberate(ScriptedLLM(), make_task())
    assert result.status == DeliberationStatus.COMPLETED and not result.verified
    assert result.verified_reason == (
        "no test was executed against the winner (the task has none and the proposal wrote none)"
    )


async def test_the_proposals_own_tests_run_too_and_a_failing_one_gates():
    own = "\n```python\nfrom solution import parse_iso\n\n\ndef test_leap_day():\n    assert parse_iso('2024-02-29')\n```\n"
    sandbox = ScriptedSandbox()
    llm = ScriptedLLM(answers={"proposal": lambda r: proposal_by(parts(r)["agent"], extra=own)})
    result = await deliberate(llm, make_task(), sandbox=sandbox)
    assert result.verified and "tests.own (the proposal's own tests: 1/1 passed" in result.verified_reason
    execution = sandbox.executions[0]
    assert set(execution.test_files) == {"test_proposal.py"}
    assert "def test_leap_day" in execution.test_files["test_proposal.py"]


async def test_a_sandbox_that_is_down_never_crashes_and_never_verifies():
    result = await deliberate(ScriptedLLM(), make_task(tests=TASK_TESTS), sandbox=ScriptedSandbox(down=True))
    assert result.status == DeliberationStatus.COMPLETED and not result.verified
    found = check(result, result.winner_id, "tests.task")
    assert not found.passed and found.findings[0].message.startswith("sandbox unavailable: sandbox at 127.0.0.1:9")


async def test_a_qa_task_runs_its_tests_against_the_code_it_builds_on():
    tests_only = (
        "```python\nfrom solution import parse_iso\n\n\ndef test_a_date():\n    assert parse_iso('2024-01-02')\n```"
    )
    base = "from datetime import date\n\n\ndef parse_iso(text):\n    return date.fromisoformat(text)\n"
    task = Task.create("T-qa", "Test parse_iso.", "QA", base_code=base)
    sandbox = ScriptedSandbox()
    result = await deliberate(
        ScriptedLLM(answers={"proposal": lambda r: tests_only}), task, make_council(Role.QA, 3), sandbox=sandbox
    )
    assert sandbox.executions[0].files == {"solution.py": base}
    assert result.verified and "tests.own (the proposal's own tests against the code it builds on: 1/1 passed" in (
        result.verified_reason
    )


async def test_a_revision_cut_at_max_tokens_is_a_failure_and_the_previous_revision_stands():
    def cut(request):
        return "length" if request.schema_name == "revision" and parts(request)["agent"] == "agent-dev-001" else "stop"

    result = await deliberate(ScriptedLLM(finish=cut), make_task(max_tokens=64))
    failures = {(f.agent_id, f.phase): f.error for f in result.failures}
    assert failures == {("agent-dev-001", Phase.REVISE): "answer cut at max_tokens (64) (the previous revision stands)"}
    kept = next(r for r in result.results if r.proposal.author_id == "agent-dev-001").proposal
    assert len(kept.revisions) == 1 and kept.content == kept.revisions[0].content


async def test_an_original_proposal_cut_at_max_tokens_is_kept_but_gated():
    """No previous revision to fall back on: the proposal stays (its critic can ask for less), failing the gating
    check `complete`, so it is no finalist while a complete one passes."""

    def cut(request):  # agent-dev-003 always writes too much
        return "length" if parts(request)["agent"] == "agent-dev-003" and request.json_schema is None else "stop"

    llm = ScriptedLLM(finish=cut, answers={"revision": lambda r: r.messages[2].content})
    result = await deliberate(llm, make_task(tests=TASK_TESTS, max_tokens=64))
    assert [(f.agent_id, f.phase) for f in result.failures] == [("agent-dev-003", Phase.REVISE)]  # not GENERATE
    complete = check(result, "agent-dev-003", "complete")
    assert not complete.passed and complete.gating and "cut at max_tokens (64)" in complete.findings[0].message
    assert result.results[-1].proposal.author_id == "agent-dev-003" and result.winner_id != "agent-dev-003"
    (critique,) = [r for r in llm.by_schema("critique") if parts(r)["target"] == "agent-dev-003"]
    assert "FAILED complete" in critique.messages[-1].content
    assert result.verified


async def test_the_architect_never_judges_a_deliberation_it_wrote_a_proposal_in():
    architects = make_council(Role.ARCHITECT, 3)
    task = Task.create("T-arch", "Design the slug storage.", "ARCHITECT")
    llm = ScriptedLLM()
    result = await deliberate(llm, task, architects, architects.agents[0])
    assert result.status == DeliberationStatus.COMPLETED
    assert result.selection.method == "FALLBACK" and result.selection.selected_by == "engine"
    assert "agent-architect-001 is an author" in result.selection.rationale
    assert any("agent-architect-001 wrote a proposal" in n for n in result.notes)
    assert not llm.by_schema("selection")


async def test_a_dropped_candidate_score_is_recorded_as_that_voters_failure():
    def scores(request):
        shown = candidates_shown(request)
        out = {}
        for label, author in shown.items():
            keys = [k for k in request.json_schema["properties"][label]["properties"] if k != "reason"]
            value = 0 if author == "agent-dev-003" else 7  # out of range: unusable
            out[label] = {**dict.fromkeys(keys, value), "reason": "r"}
        return json.dumps(out)

    result = await deliberate(ScriptedLLM(answers={"scores": scores}), make_task())
    dropped = [f for f in result.failures if f.phase == Phase.SCORE]
    assert {f.agent_id for f in dropped} == {"agent-dev-001", "agent-dev-002"}
    assert all(f.error.startswith("unusable score for agent-dev-003: ") and "must be 1..10" in f.error for f in dropped)
    assert result.status == DeliberationStatus.COMPLETED and not result.notes


async def test_no_usable_vote_at_all_is_noted():
    llm = ScriptedLLM(answers={"scores": lambda r: json.dumps({"A": {"x": 1}})})
    result = await deliberate(llm, make_task())
    assert result.status == DeliberationStatus.COMPLETED and not any(r.votes for r in result.results)
    assert "no usable peer vote: the ranking rests on the checks alone" in result.notes


async def test_lint_warnings_break_no_tie():
    """Equal scores: the author id decides, not a warning (an unused import is tidiness, not a bug)."""

    def propose(request):
        agent = parts(request)["agent"]
        extra = "import os\n" if agent == "agent-dev-001" else ""
        return f"Proposal by {agent}.\n\n```python\n{extra}def add(a, b):\n    return a + b\n```\n"

    llm = ScriptedLLM(answers={"proposal": propose, "revision": lambda r: r.messages[2].content})
    result = await deliberate(llm, make_task(), architect=None)
    lint = check(result, "agent-dev-001", "python.lint")
    assert lint.passed and [f.severity for f in lint.findings] == ["warning"]
    assert [r.proposal.author_id for r in result.results] == ["agent-dev-001", "agent-dev-002", "agent-dev-003"]


@pytest.mark.parametrize(
    ("content", "code", "own", "aliases"),
    [
        ("```python\ndef f():\n    return 1\n\n\ndef test_f():\n    assert f() == 1\n```", "def f()", "import *", ()),
        (
            "```python\ndef f():\n    return 1\n```\n```python\nfrom mymod import f\n\n\ndef test_f():\n    assert f()\n```",
            "def f()",
            "def test_f",
            ("mymod",),
        ),
        ("```python\ndef f(:\n```", "def f(:", "", ()),  # does not parse: python.syntax says so; it still runs
        ("no code at all", "", "", ()),
    ],
)
def test_which_block_is_code_and_which_is_tests(content, code, own, aliases):
    program = program_of(content)
    assert (code in program.code) if code else not program.code
    assert (own in program.own_tests) if own else not program.own_tests
    assert program.aliases == aliases


async def test_execution_can_be_turned_off_and_then_nothing_is_verified():
    sandbox = ScriptedSandbox()
    result = await deliberate(ScriptedLLM(), make_task(tests=TASK_TESTS, execute=False), sandbox=sandbox)
    assert result.status == DeliberationStatus.COMPLETED and not sandbox.executions
    assert not result.verified and result.verified_reason.startswith("execution was off for this task")
    assert not check(result, result.winner_id, "tests.task").applicable


def test_the_code_a_task_builds_on_comes_first_in_solution_py():
    """A stub's imports, or a dependency's winning code: solution.py holds it, then the proposal's code (which may
    add to it or redefine a function); a proposal with only tests runs them against the base alone."""
    base = "from typing import List\n"
    both = program_of("```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```", base)
    assert both.code.startswith("from typing import List\n") and "def total" in both.code and not both.from_base
    only_tests = program_of(
        "```python\nfrom solution import total\n\n\ndef test_total():\n    assert total([1])\n```", base
    )
    assert only_tests.code == base and only_tests.from_base and "def test_total" in only_tests.own_tests
