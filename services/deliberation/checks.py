"""Real checks on a proposal: its fenced code blocks parsed and linted by language, and policy checks.

`run_checks(content, requirements)` returns one CheckResult per check, always the same names in the same order:

  python.syntax       every Python block parses (`ast.parse`); a syntax error is a finding with its line
  python.lint         ruff (rules E9 and F: pyflakes) on every Python block that parses; undefined names,
                      syntax-level and similar real bugs are errors, unused imports/variables are warnings;
                      fails only on errors
  yaml.syntax         every YAML block loads (`yaml.safe_load_all`)
  kubernetes.schema   every YAML/JSON document with `apiVersion` and `kind` validates against the Kubernetes
                      1.33 schemas with kubernetes-validate in strict mode (unknown fields fail); a kind without
                      a schema (e.g. a CRD) is a finding too
  json.syntax         every JSON block loads (`json.loads`)
  policy.secrets      no credentials in the text: those services.common.secrets describes (AWS keys, private
                      keys, GitHub/Slack/Google tokens, sk- API keys, JWTs, bearer tokens, passwords in URLs;
                      the context service redacts the same), and no password=/token=/secret= style assignments
                      with a literal value that is not a placeholder
  policy.privileged   no `privileged: true` and no `docker run --privileged` in the code blocks (prose that
                      warns against it is not configuration)
  policy.image_tags   every container image (any `image` key of a YAML/JSON document, `FROM` in Dockerfiles)
                      has a pinned tag or digest: neither `:latest` nor untagged
  policy.requirements each requirement is mentioned: at least half of its key words (words of 3+ letters that
                      are not stop words; light stemming, so tests/tested/testing match) occur in the text

A code check with nothing to check (a proposal without Python, say) is `applicable=False, passed=True` and says
so; it does not count for or against the proposal. Unlabelled blocks are classified by content (JSON that
parses, Kubernetes-looking YAML, Python-looking code); blocks in other languages are not linted.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from services.common.secrets import CREDENTIALS, KEY_WORDS, is_placeholder
from services.deliberation.domain import CheckResult, Finding

log = logging.getLogger("fleet.deliberation.checks")

KUBERNETES_VERSION = "1.33.0"
RUFF_RULES = "E9,F"
RUFF_TIMEOUT_S = 20.0
STDIN = ("--stdin-filename", "block.py", "-")
# ruff codes that are bugs rather than tidiness: syntax, undefined names, misplaced statements, bad comparisons.
RUFF_ERROR_PREFIXES = ("E9", "F63", "F7", "F82", "F50", "F52", "invalid-syntax")

LANGUAGES = {
    "python": "python",
    "py": "python",
    "python3": "python",
    "yaml": "yaml",
    "yml": "yaml",
    "json": "json",
    "jsonc": "json",
    "dockerfile": "dockerfile",
    "docker": "dockerfile",
}


@dataclass(frozen=True)
class CodeBlock:
    index: int  # 1-based, among all fenced blocks of the text
    language: str  # normalised: python | yaml | json | dockerfile | the tag as written | "text"
    code: str
    first_line: int  # line of the text where the code starts (1-based)
    labelled: bool


_FENCE = re.compile(r"^(?P<indent>[ \t]{0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def extract_blocks(content: str) -> list[CodeBlock]:
    """Fenced code blocks (``` or ~~~, info string = language) in order; an unclosed block runs to the end."""
    lines = content.splitlines()
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening.group("fence")
        info = opening.group("info").strip().split()
        tag = info[0].lower().strip("{}.") if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j])
            j += 1
        code = "\n".join(body) + ("\n" if body else "")
        language = LANGUAGES.get(tag, tag) if tag else guess_language(code)
        blocks.append(CodeBlock(len(blocks) + 1, language, code, i + 2, bool(tag)))
        i = j + 1
    return blocks


_PY_HINT = re.compile(r"^\s*(def |class |import |from \S+ import |async def |@\w|if __name__)", re.M)
_YAML_HINT = re.compile(r"^\s*(apiVersion|kind|metadata)\s*:", re.M)
_DOCKER_HINT = re.compile(r"^\s*FROM\s+\S+", re.M)


def guess_language(code: str) -> str:
    """The language of an unlabelled block: json, python, yaml, dockerfile, or text."""
    stripped = code.strip()
    if not stripped:
        return "text"
    if stripped[0] in "{[":
        try:
            json.loads(stripped)
            return "json"
        except ValueError:
            pass
    if _PY_HINT.search(code):
        return "python"
    if _DOCKER_HINT.match(stripped):
        return "dockerfile"
    if _YAML_HINT.search(code) or stripped.startswith("---"):
        return "yaml"
    return "text"


# --- code checks ------------------------------------------------------------------------------------------------


def _not_applicable(name: str, what: str) -> CheckResult:
    return CheckResult(name=name, passed=True, applicable=False, detail=f"no {what}: nothing to check")


def _result(name: str, findings: list[Finding], detail: str) -> CheckResult:
    passed = not any(f.severity == "error" for f in findings)
    return CheckResult(name=name, passed=passed, applicable=True, findings=tuple(findings), detail=detail)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


_AST_LOCK = threading.Lock()


def parse_python(code: str) -> ast.Module:
    """`ast.parse`, one thread at a time: CPython 3.11's parser keeps its recursion depth in shared state, and
    concurrent parses from threads fail with "SystemError: AST constructor recursion depth mismatch"."""
    with _AST_LOCK:
        return ast.parse(code)


def check_python_syntax(blocks: Sequence[CodeBlock]) -> CheckResult:
    python = [b for b in blocks if b.language == "python"]
    if not python:
        return _not_applicable("python.syntax", "python code")
    findings = []
    for b in python:
        try:
            parse_python(b.code)
        except SyntaxError as e:
            findings.append(Finding(f"syntax error: {e.msg}", "error", e.lineno, b.index))
    return _result("python.syntax", findings, f"parsed {_plural(len(python), 'python block')} with ast")


@cache
def _ruff_command() -> list[str] | None:
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    if found := shutil.which("ruff"):
        return [found]
    try:
        import ruff  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def _ruff(code: str) -> list[dict[str, Any]]:
    command = _ruff_command()
    if command is None:
        raise FileNotFoundError("ruff is not installed")
    proc = subprocess.run(
        [*command, "check", "--isolated", "--no-cache", "--output-format", "json", "--select", RUFF_RULES, *STDIN],
        input=code,
        capture_output=True,
        text=True,
        timeout=RUFF_TIMEOUT_S,
        cwd=tempfile.gettempdir(),
        check=False,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"ruff exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return json.loads(proc.stdout or "[]")


def check_python_lint(blocks: Sequence[CodeBlock]) -> CheckResult:
    python = [b for b in blocks if b.language == "python"]
    if not python:
        return _not_applicable("python.lint", "python code")
    parsable = []
    for b in python:
        try:
            parse_python(b.code)
            parsable.append(b)
        except SyntaxError:
            pass  # python.syntax reports it
    if not parsable:
        return CheckResult(
            "python.lint", passed=True, applicable=False, detail="no python block parses: nothing to lint"
        )
    findings = []
    for b in parsable:
        try:
            diagnostics = _ruff(b.code)
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            return CheckResult("python.lint", passed=True, applicable=False, detail=f"ruff could not run: {e}")
        for d in diagnostics:
            code = str(d.get("code") or "")
            severity = "error" if code.startswith(RUFF_ERROR_PREFIXES) else "warning"
            line = (d.get("location") or {}).get("row")
            findings.append(Finding(f"{code}: {d.get('message', '')}", severity, line, b.index))
    skipped = len(python) - len(parsable)
    detail = f"ruff --select {RUFF_RULES} on {_plural(len(parsable), 'python block')}"
    return _result("python.lint", findings, detail + (f" ({skipped} not parsable, skipped)" if skipped else ""))


def _yaml_error(e: yaml.YAMLError) -> tuple[str, int | None]:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return str(problem), (mark.line + 1 if mark is not None else None)


def check_yaml_syntax(blocks: Sequence[CodeBlock]) -> CheckResult:
    blocks = [b for b in blocks if b.language == "yaml"]
    if not blocks:
        return _not_applicable("yaml.syntax", "yaml")
    findings = []
    for b in blocks:
        try:
            list(yaml.safe_load_all(b.code))
        except yaml.YAMLError as e:
            message, line = _yaml_error(e)
            findings.append(Finding(f"yaml error: {message}", "error", line, b.index))
    return _result("yaml.syntax", findings, f"loaded {_plural(len(blocks), 'yaml block')}")


def check_json_syntax(blocks: Sequence[CodeBlock]) -> CheckResult:
    blocks = [b for b in blocks if b.language == "json"]
    if not blocks:
        return _not_applicable("json.syntax", "json")
    findings = []
    for b in blocks:
        try:
            json.loads(b.code)
        except json.JSONDecodeError as e:
            findings.append(Finding(f"json error: {e.msg} (column {e.colno})", "error", e.lineno, b.index))
    return _result("json.syntax", findings, f"loaded {_plural(len(blocks), 'json block')}")


def _documents(blocks: Sequence[CodeBlock]) -> list[tuple[CodeBlock, Any]]:
    """The parsed documents of the YAML and JSON blocks that load (the syntax checks report the others)."""
    docs: list[tuple[CodeBlock, Any]] = []
    for b in blocks:
        try:
            if b.language == "yaml":
                docs.extend((b, d) for d in yaml.safe_load_all(b.code))
            elif b.language == "json":
                data = json.loads(b.code)
                docs.extend((b, d) for d in (data if isinstance(data, list) else [data]))
        except (yaml.YAMLError, ValueError):
            continue
    return docs


def _is_kubernetes(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str)


def check_kubernetes(blocks: Sequence[CodeBlock]) -> CheckResult:
    objects = []
    for b, doc in _documents(blocks):
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            objects.extend((b, item) for item in doc["items"] if _is_kubernetes(item))
        elif _is_kubernetes(doc):
            objects.append((b, doc))
    if not objects:
        return _not_applicable("kubernetes.schema", "kubernetes objects")
    import kubernetes_validate  # deferred: only proposals with manifests pay for it
    from kubernetes_validate.utils import InvalidSchemaError, SchemaNotFoundError, VersionNotSupportedError

    findings = []
    for b, doc in objects:
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?') if isinstance(doc.get('metadata'), dict) else '?'}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            findings.append(Finding(f"{name}: {path}: {e.message}", "error", None, b.index))
        except (SchemaNotFoundError, InvalidSchemaError, VersionNotSupportedError) as e:
            findings.append(Finding(f"{name}: {e.message}", "error", None, b.index))
        except Exception as e:  # malformed documents (e.g. metadata not a mapping) can trip the validator
            findings.append(Finding(f"{name}: could not validate: {type(e).__name__}: {e}", "error", None, b.index))
    detail = f"validated {_plural(len(objects), 'object')} against Kubernetes {KUBERNETES_VERSION} (strict)"
    return _result("kubernetes.schema", findings, detail)


# --- policy checks ----------------------------------------------------------------------------------------------

# name = "literal" / name: literal, where the name says it is a credential (services.common.secrets.KEY_WORDS).
_ASSIGNED_SECRET = re.compile(
    rf"""(?ix)
    \b(?P<key>[a-z0-9_.-]*(?:{KEY_WORDS})s?)
    ["']?\s*(?::|=|:=)\s*
    (?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;#)}}\]]+)
    """
)


def _line_of(content: str, offset: int) -> int:
    return content.count("\n", 0, offset) + 1


def _is_literal_secret(raw: str) -> bool:
    """A quoted literal of 4+ characters, or an unquoted token of 6+ mixing letters and digits (YAML, .env),
    that is not a placeholder, a number, an identifier, a call or a type hint."""
    quoted = len(raw) >= 2 and raw[0] in "\"'" and raw[-1] == raw[0]
    value = (raw[1:-1] if quoted else raw).strip()
    if len(value) < 4 or is_placeholder(value) or re.fullmatch(r"[\d.]+", value):
        return False
    if quoted:
        return True
    return (
        len(value) >= 6
        and bool(re.search(r"\d", value))
        and bool(re.search(r"[A-Za-z]", value))
        and not re.search(r"[\[(]", value)
    )


def check_secrets(content: str) -> CheckResult:
    findings = []
    for pattern in CREDENTIALS:
        for m in pattern.regex.finditer(content):
            findings.append(Finding(f"{pattern.name} in the text", "error", _line_of(content, m.start())))
    for m in _ASSIGNED_SECRET.finditer(content):
        if _is_literal_secret(m.group("value")):
            findings.append(
                Finding(f"literal value assigned to {m.group('key')!r}", "error", _line_of(content, m.start()))
            )
    findings.sort(key=lambda f: f.line or 0)
    return _result("policy.secrets", findings, "searched the whole text for credentials and literal secrets")


_PRIVILEGED = re.compile(r"""(?im)["']?\bprivileged["']?\s*:\s*["']?true\b|docker\s+run\b[^\n]*--privileged\b""")


def check_privileged(blocks: Sequence[CodeBlock]) -> CheckResult:
    """Only code counts: prose that says "never set privileged: true" is advice, not configuration."""
    findings = [
        Finding("privileged container", "error", _line_of(b.code, m.start()), b.index)
        for b in blocks
        if b.language != "python"
        for m in _PRIVILEGED.finditer(b.code)
    ]
    detail = f"searched {_plural(len(blocks), 'code block')} for privileged: true and --privileged"
    return _result("policy.privileged", findings, detail) if blocks else _not_applicable("policy.privileged", "code")


_FROM_LINE = re.compile(r"(?im)^\s*FROM\s+(?:--platform=\S+\s+)?(?P<ref>\S+)(?:\s+AS\s+(?P<alias>\S+))?")


def image_tag_problem(ref: str) -> str | None:
    """Why an image reference is not pinned (`:latest`, no tag), or None when it has a tag or a digest."""
    if "@sha256:" in ref or "@sha512:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag (means :latest)"
    if last.rsplit(":", 1)[1].lower() == "latest":
        return "uses the :latest tag"
    return None


def _image_values(doc: Any) -> list[str]:
    """Every string under an `image` key, at any depth of a parsed document."""
    if isinstance(doc, dict):
        found = [v for k, v in doc.items() if k == "image" and isinstance(v, str)]
        return found + [x for v in doc.values() for x in _image_values(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in _image_values(v)]
    return []


def check_image_tags(blocks: Sequence[CodeBlock]) -> CheckResult:
    """Images named in YAML/JSON documents (any `image:` key) and in Dockerfile `FROM` lines."""
    refs: list[tuple[str, CodeBlock]] = [(ref, b) for b, doc in _documents(blocks) for ref in _image_values(doc)]
    for b in blocks:
        if b.language != "dockerfile":
            continue
        stages = {m.group("alias").lower() for m in _FROM_LINE.finditer(b.code) if m.group("alias")}
        refs += [
            (m.group("ref"), b)
            for m in _FROM_LINE.finditer(b.code)
            if m.group("ref").lower() not in stages | {"scratch"}
        ]
    refs = [(r, b) for r, b in refs if "$" not in r and "{{" not in r and r.strip()]
    if not refs:
        return _not_applicable("policy.image_tags", "container images")
    findings = []
    for ref, b in refs:
        if problem := image_tag_problem(ref):
            at = b.code.find(ref)
            findings.append(
                Finding(f"image {ref} {problem}", "error", _line_of(b.code, at) if at >= 0 else None, b.index)
            )
    return _result("policy.image_tags", findings, f"checked {_plural(len(refs), 'image reference')} for pinned tags")


STOP_WORDS = frozenset(
    "the and for with that this from into must should shall will are has have been its their our your use uses "
    "using all any each every not but can may per via when where which who why how what than then there these "
    "those also only more most such very".split()
)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


_WORD = re.compile(r"[a-z0-9][a-z0-9_+#.-]*[a-z0-9+#]|[a-z0-9]")


def requirement_keywords(requirement: str) -> dict[str, str]:
    """The key words of a requirement -> their stems (words of 3+ letters that are not stop words)."""
    words = _WORD.findall(requirement.lower())
    return {w: _stem(w) for w in words if len(w) >= 3 and w not in STOP_WORDS}


def check_requirements(content: str, requirements: Sequence[str]) -> CheckResult:
    requirements = [r for r in requirements if r.strip()]
    if not requirements:
        return _not_applicable("policy.requirements", "requirements")
    words = set(_WORD.findall(content.lower()))
    findings = []
    for requirement in requirements:
        keys = requirement_keywords(requirement) or {requirement.strip().lower(): requirement.strip().lower()}
        found = [w for w, stem in keys.items() if any(x.startswith(stem) for x in words)]
        if len(found) * 2 < len(keys):
            missing = ", ".join(w for w in keys if w not in found)
            findings.append(Finding(f"requirement not addressed: {requirement!r} (missing: {missing})", "error"))
    detail = f"looked for the key words of {_plural(len(requirements), 'requirement')} (half of each must appear)"
    return _result("policy.requirements", findings, detail)


# --- all together -----------------------------------------------------------------------------------------------


def run_checks(content: str, requirements: Sequence[str] = ()) -> list[CheckResult]:
    """Every check on one proposal (blocking: call it off the event loop). A check that crashes is reported as a
    failed check with the error, never raised."""
    blocks = extract_blocks(content)
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("python.syntax", lambda: check_python_syntax(blocks)),
        ("python.lint", lambda: check_python_lint(blocks)),
        ("yaml.syntax", lambda: check_yaml_syntax(blocks)),
        ("kubernetes.schema", lambda: check_kubernetes(blocks)),
        ("json.syntax", lambda: check_json_syntax(blocks)),
        ("policy.secrets", lambda: check_secrets(content)),
        ("policy.privileged", lambda: check_privileged(blocks)),
        ("policy.image_tags", lambda: check_image_tags(blocks)),
        ("policy.requirements", lambda: check_requirements(content, requirements)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as e:
            log.exception("check %s crashed", name)
            results.append(
                CheckResult(name, False, True, (Finding(f"check crashed: {type(e).__name__}: {e}"),), "crashed")
            )
    return results
