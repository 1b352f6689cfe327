"""Records (resumable, settings-checked), where the fleet is, the selection of problems, and the harness's check
of itself against the reference solutions (a fake sandbox stands in for the service)."""

from __future__ import annotations

import json

import pytest

from services.common.execution import Execution, ExecutionResult, Outcome, TestCase, TestCounts
from services.eval.dataset import EvalError, Problem
from services.eval.modes import Mode
from services.eval.records import RECORDS, RUN, Record, RecordStore
from services.eval.run import Endpoints, calibrate, require, resolve_endpoints, select

SETTINGS = {"dataset": "abc", "model": "m", "max_tokens": 256, "seed": 0}


def test_records_are_appended_and_read_back_the_latest_of_a_pair_winning(tmp_path):
    store = RecordStore(tmp_path, SETTINGS)
    store.add(Record("p1", "single", "error", reason="sandbox: UNAVAILABLE"))
    store.add(Record("p2", "council", "passed", prompt_tokens=5, detail={"winner": "agent-dev-001"}))
    assert not store.done("p1", "single") and store.done("p2", "council")  # an error is tried again
    store.add(Record("p1", "single", "failed"))
    again = RecordStore(tmp_path, SETTINGS)
    assert again.get("p1", "single").outcome == "failed" and again.done("p1", "single")
    assert again.get("p2", "council").detail == {"winner": "agent-dev-001"} and again.get("p3", "single") is None
    assert json.loads((tmp_path / RUN).read_text()) == {"settings": SETTINGS}


def test_a_line_cut_by_a_crash_is_dropped_and_the_file_stays_appendable(tmp_path):
    store = RecordStore(tmp_path, SETTINGS)
    store.add(Record("p1", "single", "passed"))
    with open(tmp_path / RECORDS, "a") as f:
        f.write('{"problem": "p2", "mode": "sing')
    again = RecordStore(tmp_path, SETTINGS)
    assert again.get("p2", "single") is None and again.done("p1", "single")
    again.add(Record("p2", "single", "failed"))
    lines = (tmp_path / RECORDS).read_text().splitlines()
    assert [json.loads(line)["problem"] for line in lines] == ["p1", "p2"]


def test_records_of_other_settings_are_refused(tmp_path):
    RecordStore(tmp_path, SETTINGS)
    with pytest.raises(EvalError, match=r"max_tokens: recorded 256, now 512; seed: recorded 0, now 1\): use another"):
        RecordStore(tmp_path, {**SETTINGS, "max_tokens": 512, "seed": 1})
    (tmp_path / RECORDS).write_text("not json\n")
    with pytest.raises(EvalError, match=r"records\.jsonl line 1: not a record"):
        RecordStore(tmp_path, SETTINGS)


def test_endpoints_come_from_the_options_then_the_environment_then_the_local_fleet(tmp_path):
    (tmp_path / "endpoints.json").write_text(
        json.dumps({"vllm": "http://f:1", "vllm_model": "fm", "orchestrator": "f:2", "sandbox": "f:3"})
    )
    env = {"VLLM_URL": "http://e:1", "SANDBOX_ADDRESS": "e:3"}
    e = resolve_endpoints({"sandbox": "o:3", "llm_url": ""}, env, tmp_path)
    assert (e.llm_url, e.llm_model, e.orchestrator, e.sandbox) == ("http://e:1", "fm", "f:2", "o:3")
    assert e.sources == {
        "llm_url": "VLLM_URL",
        "llm_model": str(tmp_path / "endpoints.json"),
        "orchestrator": str(tmp_path / "endpoints.json"),
        "sandbox": "--sandbox",
    }
    assert e.describe("sandbox") == "o:3 (from --sandbox)"


def test_what_the_modes_need_and_nobody_gave_is_named(tmp_path):
    none = resolve_endpoints({}, {}, tmp_path)  # no fleet there either
    with pytest.raises(EvalError) as caught:
        require(none, [Mode.COUNCIL])
    said = caught.value.message
    assert (
        said.startswith("no llm_url, llm_model, sandbox, orchestrator:")
        and "--orchestrator (or ORCHESTRATOR_ADDRESS)" in said
    )
    assert "`fleet up`" in said
    require(Endpoints("http://l", "m", "", "s:1"), [Mode.SINGLE, Mode.SELF_CONSISTENCY])  # no orchestrator needed


def problem(
    n: int, examples: tuple[tuple[str, str], ...] = (("inc(1)", "2"),), solution: str = "    return x + 1\n"
) -> Problem:
    return Problem(
        problem_id=f"P/{n}",
        prompt='def inc(x):\n    """Add one."""\n',
        entry_point="inc",
        test="def check(candidate):\n    assert candidate(1) == 2\n",
        canonical_solution=solution,
        examples=examples,
    )


def test_selection_keeps_the_dataset_order_then_the_limit():
    problems = [problem(i) for i in range(5)]
    assert [p.problem_id for p in select(problems, ["P/3", "P/1"], 0)] == ["P/1", "P/3"]
    assert [p.problem_id for p in select(problems, [], 2)] == ["P/0", "P/1"]
    with pytest.raises(EvalError, match=r"--problems: unknown P/9 \(ids look like 'P/0'\)"):
        select(problems, ["P/9"], 0)


class ReferenceSandbox:
    """Answers with the cases `verdicts` gives the reference solution it is sent (nothing runs)."""

    def __init__(self, verdicts: dict[str, dict[str, str]]) -> None:
        self.verdicts = verdicts
        self.executions: list[Execution] = []

    async def execute(self, execution: Execution) -> ExecutionResult:
        self.executions.append(execution)
        reference = execution.files["solution.py"]
        verdict = self.verdicts[reference]
        cases = [TestCase(f"{f}::{name}", outcome) for f, outcomes in verdict.items() for name, outcome in outcomes]
        failed = any(c.outcome != "passed" for c in cases)
        return ExecutionResult(Outcome.FAILED if failed else Outcome.PASSED, tests=TestCounts.of(cases), reason="r")


async def test_the_harness_drops_examples_the_reference_fails_and_problems_it_cannot_score():
    two = (("inc(1)", "2"), ("inc(5)", "7"))  # the second example is wrong
    good, wrong_doc, broken = (
        problem(0),
        problem(1, two, "    return x + 1  # 1\n"),
        problem(2, solution="    return x  # 2\n"),
    )
    none = problem(3, solution="")
    sandbox = ReferenceSandbox(
        {
            good.reference: {
                "test_hidden.py": [("test_hidden", "passed")],
                "test_task.py": [("test_example_1", "passed")],
            },
            wrong_doc.reference: {
                "test_hidden.py": [("test_hidden", "passed")],
                "test_task.py": [("test_example_1", "passed"), ("test_example_2", "failed")],
            },
            broken.reference: {
                "test_hidden.py": [("test_hidden", "failed")],
                "test_task.py": [("test_example_1", "passed")],
            },
        }
    )
    kept, notes = await calibrate(sandbox, [good, wrong_doc, broken, none], 5.0)
    assert [p.problem_id for p in kept] == ["P/0", "P/1", "P/3"]
    assert kept[0] is good and kept[1].examples == (("inc(1)", "2"),) and "inc(5)" not in kept[1].visible_tests
    assert notes == [
        "P/1: 1 of 2 docstring examples dropped (the reference fails them)",
        "P/2: not evaluated, its reference solution fails its hidden tests (FAILED: r)",
        "P/3: no canonical solution, its visible tests are not checked",
    ]
    assert all(set(e.test_files) == {"test_hidden.py", "test_task.py"} for e in sandbox.executions)
