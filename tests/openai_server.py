"""A loopback OpenAI-compatible chat server standing in for vLLM where the real model is not needed.

A real HTTP server (FastAPI + uvicorn) that the tests and the benchmarks start as a separate process (it is test
tooling: nothing in services/ imports it):

    python tests/openai_server.py --host 127.0.0.1 --port P [--delay-ms D] [--model NAME] [--tokens-per-second T]

It logs one line `ready on http://HOST:PORT` once it accepts connections (`--port 0` picks a free port; the line
names it). Answers are deterministic per (seed, messages):
- `response_format: json_schema` -> JSON satisfying the schema, generated from a bounded subset of JSON Schema
  (object/array/string/integer/number/boolean/null, enum/const, local `$ref`, `anyOf`/`oneOf`); any other keyword
  (e.g. `pattern`) is refused with HTTP 400, as vLLM refuses a schema it cannot compile;
- otherwise a markdown proposal with a fenced ```python block of valid code.
Tokens are whitespace-separated words. With `chat_template_kwargs.enable_thinking: true` a short `reasoning` is
returned apart from the content, like vLLM's reasoning parser does.

Fault injection and statistics for tests: `POST /control` (see `Control`), `GET /control/stats`,
`GET /control/requests` (the last requests received, for asserting what a client sent).
`start_openai_server()` runs it as a subprocess and returns a `ServerHandle`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import keyword
import logging
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.local.processes import spawn

log = logging.getLogger("fleet.local.openai_server")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "test-model"
DEFAULT_MAX_TOKENS = 2048
MAX_SCHEMA_DEPTH = 24

# --------------------------------------------------------------------------------------------------------------
# Errors in the OpenAI / vLLM shape

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, *, param: str | None = None, headers: dict | None = None) -> Response:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------------------------
# Tokens: whitespace-separated words


def split_tokens(text: str) -> list[str]:
    """Pieces of `text`, one word each with the whitespace before it; ''.join(pieces) == text."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)) :]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces = [tail]
    return pieces


def count_tokens(text: str) -> int:
    return len(text.split())


def message_text(content: Any) -> str:
    """A message's text: a string, or OpenAI content parts [{"type": "text", "text": ...}]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise RequestRejected(400, "messages[].content must be a string or a list of content parts", "messages")


# --------------------------------------------------------------------------------------------------------------
# JSON from a (bounded) JSON Schema

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
_SUPPORTED = _ANNOTATIONS | set(
    "type enum const properties required additionalProperties items minItems maxItems uniqueItems minLength "
    "maxLength minimum maximum exclusiveMinimum exclusiveMaximum $defs definitions $ref anyOf oneOf".split()
)
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_WORDS = (
    "clear structure small functions explicit errors tested edge cases readable names bounded inputs "
    "idempotent writes simple design covers the rubric handles failures well documented concise safe defaults "
    "no secrets consistent style good separation of concerns"
).split()


class SchemaError(RequestRejected):
    def __init__(self, message: str) -> None:
        super().__init__(400, message, "response_format")


def check_schema(schema: Any, path: str = "$", depth: int = 0) -> None:
    """Refuse what the generator cannot honour, naming the keyword and where it is."""
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"Invalid JSON schema: nested deeper than {MAX_SCHEMA_DEPTH} levels at {path}")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"Invalid JSON schema at {path}: a schema must be an object, got {type(schema).__name__}")
    for key in schema:
        if key not in _SUPPORTED:
            raise SchemaError(f"Unsupported JSON schema keyword '{key}' at {path}")
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in _TYPES:
            raise SchemaError(f"Unsupported JSON schema type {t!r} at {path}.type")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise SchemaError(f"Invalid JSON schema at {path}.enum: must be a non-empty array")
    if "$ref" in schema and not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", str(schema["$ref"])):
        raise SchemaError(f"Unsupported JSON schema $ref {schema['$ref']!r} at {path} (only #/$defs/NAME)")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{path}.properties.{name}", depth + 1)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            check_schema(schema[key], f"{path}.{key}", depth + 1)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{path}.{key}.{name}", depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema and (not isinstance(schema[key], list) or not schema[key]):
            raise SchemaError(f"Invalid JSON schema at {path}.{key}: must be a non-empty array")
        for i, sub in enumerate(schema.get(key) or ()):
            check_schema(sub, f"{path}.{key}[{i}]", depth + 1)


class SchemaGenerator:
    def __init__(self, root: dict[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def value(self, schema: Any, path: str = "$", depth: int = 0) -> Any:
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"Invalid JSON schema: recursion deeper than {MAX_SCHEMA_DEPTH} levels at {path}")
        if schema is True or schema == {}:
            return self.string({}, path)
        if schema is False:
            raise SchemaError(f"Unsatisfiable JSON schema at {path}: false")
        if "$ref" in schema:
            _, section, name = schema["$ref"].split("/", 2)
            target = (self.root.get(section) or {}).get(name)
            if target is None:
                raise SchemaError(f"Invalid JSON schema at {path}: $ref {schema['$ref']!r} not found")
            return self.value(target, path, depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:  # the first branch that is not just null: a real answer beats a null
                branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
                return self.value((branches or schema[key])[0], f"{path}.{key}", depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((t for t in kind if t != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        return getattr(self, kind)(schema, path, depth)

    def object(self, schema: dict, path: str, depth: int = 0) -> dict[str, Any]:
        properties: dict[str, Any] = schema.get("properties") or {}
        required = list(schema.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required or self.rng.random() < 0.5:
                out[name] = self.value(sub, f"{path}.{name}", depth + 1)
        for name in required:
            if name not in out:
                extra = schema.get("additionalProperties", True)
                if extra is False:
                    raise SchemaError(f"Unsatisfiable JSON schema at {path}: '{name}' is required but not allowed")
                out[name] = self.value(extra, f"{path}.{name}", depth + 1)
        return out

    def array(self, schema: dict, path: str, depth: int = 0) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", low + 3))
        if high < low:
            raise SchemaError(f"Unsatisfiable JSON schema at {path}: maxItems < minItems")
        n = self.rng.randint(low, high)
        items = schema.get("items", {})
        if not schema.get("uniqueItems"):
            return [self.value(items, f"{path}[{i}]", depth + 1) for i in range(n)]
        out: list[Any] = []
        for _ in range(20 * n + 20):
            if len(out) == n:
                break
            candidate = self.value(items, f"{path}[{len(out)}]", depth + 1)
            if candidate not in out:
                out.append(candidate)
        if len(out) < low:
            raise SchemaError(f"Unsatisfiable JSON schema at {path}: cannot find {low} unique items")
        return out

    def string(self, schema: dict, path: str, depth: int = 0) -> str:
        low = int(schema.get("minLength", 0))
        high = int(schema.get("maxLength", max(low, 12) + 48))
        if high < low:
            raise SchemaError(f"Unsatisfiable JSON schema at {path}: maxLength < minLength")
        length = self.rng.randint(max(low, min(high, 8)), high)
        words: list[str] = []
        while len(" ".join(words)) < length:
            words.append(self.rng.choice(_WORDS))
        text = " ".join(words)[:length]
        return text[:-1] + "s" if text.endswith(" ") else text

    def _bounds(self, schema: dict, path: str, integer: bool) -> tuple[float, float]:
        step = 1 if integer else 0.01
        low = schema.get("minimum")
        high = schema.get("maximum")
        if "exclusiveMinimum" in schema:
            low = max(low if low is not None else float("-inf"), schema["exclusiveMinimum"] + step)
        if "exclusiveMaximum" in schema:
            high = min(high if high is not None else float("inf"), schema["exclusiveMaximum"] - step)
        if low is None and high is None:
            low, high = 0, 100
        elif low is None:
            low = high - 100
        elif high is None:
            high = low + 100
        if high < low:
            raise SchemaError(f"Unsatisfiable JSON schema at {path}: maximum < minimum")
        return low, high

    def integer(self, schema: dict, path: str, depth: int = 0) -> int:
        low, high = self._bounds(schema, path, integer=True)
        low_i, high_i = math.ceil(low), math.floor(high)
        if high_i < low_i:
            raise SchemaError(f"Unsatisfiable JSON schema at {path}: no integer in [{low}, {high}]")
        return self.rng.randint(low_i, high_i)

    def number(self, schema: dict, path: str, depth: int = 0) -> float:
        low, high = self._bounds(schema, path, integer=False)
        value = round(self.rng.uniform(low, high), 2)
        return value if low <= value <= high else (low + high) / 2

    def boolean(self, schema: dict, path: str, depth: int = 0) -> bool:
        return self.rng.random() < 0.5

    def null(self, schema: dict, path: str, depth: int = 0) -> None:
        return None


def json_answer(schema: Any, rng: random.Random) -> str:
    check_schema(schema)
    root = schema if isinstance(schema, dict) else {}
    return json.dumps(SchemaGenerator(root, rng).value(schema), ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------------
# Free-text proposals

_CODE_VARIANTS = (
    '''from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


def __FN__(items: list[str]) -> CheckResult:
    """Validate the inputs and report the first problem found."""
    for index, item in enumerate(items):
        if not item.strip():
            return CheckResult(False, f"item {index} is empty")
        if len(item) > __N__:
            return CheckResult(False, f"item {index} is longer than __N__ characters")
    return CheckResult(True, f"{len(items)} items checked")
''',
    '''import time
from collections.abc import Callable


def __FN__(action: Callable[[], str], attempts: int = __K__, delay: float = 0.__K__) -> str:
    """Run the action, retrying with exponential backoff on transient errors."""
    last_error: Exception | None = None
    for attempt in range(attempts):
        try:
            return action()
        except OSError as exc:
            last_error = exc
            time.sleep(delay * 2**attempt)
    raise RuntimeError(f"gave up after {attempts} attempts") from last_error
''',
    '''from collections import OrderedDict


class BoundedCache:
    """A least-recently-used cache that never grows beyond its capacity."""

    def __init__(self, capacity: int = __N__) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str, value: str) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def __FN__(pairs: list[tuple[str, str]]) -> BoundedCache:
    cache = BoundedCache()
    for key, value in pairs:
        cache.put(key, value)
    return cache
''',
    '''import json
from typing import Any


def __FN__(raw: str, required: tuple[str, ...] = ("id", "name")) -> dict[str, Any]:
    """Parse a JSON document and check the required fields, with errors that name the field."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")
    if len(data) > __N__:
        raise ValueError("too many fields")
    return data
''',
)
_OPENINGS = (
    "Here is a focused proposal that keeps the change small and testable.",
    "I propose a minimal implementation first, then tests that pin the behaviour down.",
    "The plan below favours explicit errors and bounded inputs over cleverness.",
    "A short design, the code, and how we verify it.",
)
_APPROACH = (
    "Validate inputs at the boundary and fail with a message that names the field.",
    "Keep the core logic free of I/O so it is easy to unit test.",
    "Bound every loop and every input size; no unbounded retries.",
    "Log one structured line per failure with the correlation id.",
    "Make writes idempotent so a redelivered event changes nothing.",
    "Prefer the standard library; add no new dependency for this.",
    "Cover the unhappy paths with tests before the happy path.",
)
_RISKS = (
    "Edge case: empty input; covered by a unit test.",
    "Performance: linear in the input size, fine for the expected volumes.",
    "Compatibility: no change to public contracts.",
    "Security: no secrets in code or logs.",
    "Rollback: the change is additive and can be reverted alone.",
)


def _topic(messages: list[dict[str, Any]]) -> str:
    users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
    text = next((line for line in (users[-1] if users else "").splitlines() if line.strip()), "the task")
    words = re.sub(r"[#*`>_\[\]]", " ", text).split()[:8]
    return " ".join(words) or "the task"


def _identifier(topic: str) -> str:
    words = [w for w in re.sub(r"[^a-z0-9 ]", " ", topic.lower()).split() if not w.isdigit()][:4]
    name = "_".join(["handle", *words]) if words else "handle_task"
    return name if name.isidentifier() and not keyword.iskeyword(name) else "handle_task"


def text_answer(messages: list[dict[str, Any]], rng: random.Random) -> str:
    topic = _topic(messages)
    code = (
        rng.choice(_CODE_VARIANTS)
        .replace("__FN__", _identifier(topic))
        .replace("__N__", str(rng.choice((32, 64, 128, 256))))
        .replace("__K__", str(rng.randint(2, 5)))
    )
    approach = "\n".join(f"- {line}" for line in rng.sample(_APPROACH, 3))
    risks = "\n".join(f"- {line}" for line in rng.sample(_RISKS, 2))
    return (
        f"## Proposal: {topic}\n\n{rng.choice(_OPENINGS)}\n\n### Approach\n{approach}\n\n"
        f"### Implementation\n```python\n{code}```\n\n### Risks and tests\n{risks}\n"
    )


def reasoning_text(messages: list[dict[str, Any]], rng: random.Random) -> str:
    return (
        f"The request is about {_topic(messages)}. I should answer in the requested form, keep it short, "
        f"and check the result against the rubric before answering ({rng.choice(('carefully', 'briefly'))})."
    )


# --------------------------------------------------------------------------------------------------------------
# The app


class Control(BaseModel):
    """Body of POST /control. `reset` runs first; unset fields are left as they are."""

    model_config = ConfigDict(extra="forbid")

    reset: bool = False
    delay_ms: float | None = Field(None, ge=0)
    tokens_per_second: float | None = Field(None, ge=0)
    fail_status: int | None = Field(None, ge=100, le=599)  # status of injected failures (default 503)
    fail_count: int | None = Field(None, ge=0)  # fail the next N chat calls
    retry_after: str | float | None = None  # Retry-After header value sent with injected failures
    fail_when_contains: str | None = None  # always fail chat calls whose messages contain this text ("" clears)
    fail_body: str | None = None  # raw body for injected failures instead of the OpenAI error JSON
    stream_abort_after: int | None = Field(None, ge=0)  # drop the next streamed call after N content chunks
    # Scripted answers: a free-text call (no response_format) whose messages contain a key gets that key's text
    # (the first key found, in order), e.g. {"agent-dev-001": "```python ...```"}; {} clears.
    answer_when_contains: dict[str, str] | None = None


@dataclass
class ServerState:
    model: str
    delay_ms: float
    tokens_per_second: float
    initial: tuple[float, float] = (0.0, 0.0)
    fail_status: int = 503
    fail_count: int = 0
    retry_after: str | None = None
    fail_when_contains: str | None = None
    fail_body: str | None = None
    stream_abort_after: int | None = None
    answer_when_contains: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    failures: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    requests: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))

    def reset(self) -> None:
        self.delay_ms, self.tokens_per_second = self.initial
        self.fail_status, self.fail_count, self.retry_after = 503, 0, None
        self.fail_when_contains = self.fail_body = self.stream_abort_after = None
        self.answer_when_contains = {}
        self.calls = self.failures = 0
        self.by_status.clear()
        self.max_in_flight = self.in_flight
        self.requests.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failures": self.failures,
            "by_status": dict(self.by_status),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }

    def config(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "delay_ms": self.delay_ms,
            "tokens_per_second": self.tokens_per_second,
            "fail_status": self.fail_status,
            "fail_count": self.fail_count,
            "retry_after": self.retry_after,
            "fail_when_contains": self.fail_when_contains,
            "fail_body": self.fail_body,
            "stream_abort_after": self.stream_abort_after,
            "answer_when_contains": self.answer_when_contains,
        }

    def begin(self) -> None:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def end(self, status: int) -> None:
        self.in_flight -= 1
        self.by_status[str(status)] += 1
        if status >= 400:
            self.failures += 1


@dataclass
class Answer:
    content: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _validate(body: Any) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
    """What vLLM would refuse with 400; returns (messages, max_tokens, response_format)."""
    if not isinstance(body, dict):
        raise RequestRejected(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestRejected(400, "'messages' must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in {
            "system",
            "user",
            "assistant",
            "tool",
            "developer",
        }:
            raise RequestRejected(400, f"messages[{i}] needs a role of system/user/assistant/tool", "messages")
        message_text(message.get("content"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestRejected(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    temperature = body.get("temperature", 1.0)
    if temperature is not None and (not isinstance(temperature, int | float) or temperature < 0):
        raise RequestRejected(400, f"temperature must be non-negative, got {temperature}.", "temperature")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in {
            "text",
            "json_object",
            "json_schema",
        }:
            raise RequestRejected(
                400, "response_format.type must be text, json_object or json_schema", "response_format"
            )
        if response_format["type"] == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise RequestRejected(400, "response_format.json_schema.schema is required", "response_format")
    return messages, max_tokens, response_format


def make_answer(body: dict[str, Any], scripted: dict[str, str] | None = None) -> Answer:
    messages, max_tokens, response_format = _validate(body)
    texts = [f"{m.get('role')}: {message_text(m.get('content'))}" for m in messages]
    if scripted and not response_format:
        everything = "\n".join(texts)
        answer = next((text for key, text in scripted.items() if key in everything), None)
        if answer is not None:
            pieces = split_tokens(answer)[:max_tokens]
            return Answer(
                content="".join(pieces),
                reasoning=None,
                prompt_tokens=sum(count_tokens(message_text(m.get("content"))) for m in messages),
                completion_tokens=len(pieces),
                finish_reason="length" if len(split_tokens(answer)) > max_tokens else "stop",
            )
    digest = hashlib.sha256("\x00".join([str(body.get("seed")), *texts]).encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    kind = (response_format or {}).get("type", "text")
    if kind == "json_schema":
        content = json_answer(response_format["json_schema"]["schema"], rng)  # type: ignore[index]
    elif kind == "json_object":
        content = json.dumps({"answer": SchemaGenerator({}, rng).string({"maxLength": 60}, "$")})
    else:
        content = text_answer(messages, rng)
    thinking = bool((body.get("chat_template_kwargs") or {}).get("enable_thinking", False))
    reasoning = reasoning_text(messages, rng) if thinking else None
    # The token budget is spent on reasoning first, then on the content.
    reasoning_pieces = split_tokens(reasoning) if reasoning else []
    content_pieces = split_tokens(content)
    finish = "stop"
    if len(reasoning_pieces) + len(content_pieces) > max_tokens:
        finish = "length"
        reasoning_pieces = reasoning_pieces[:max_tokens]
        content_pieces = content_pieces[: max_tokens - len(reasoning_pieces)]
        reasoning = "".join(reasoning_pieces) if reasoning is not None else None
        content = "".join(content_pieces)
    return Answer(
        content=content,
        reasoning=reasoning,
        prompt_tokens=sum(count_tokens(message_text(m.get("content"))) for m in messages),
        completion_tokens=len(reasoning_pieces) + len(content_pieces),
        finish_reason=finish,
    )


def create_app(*, model: str = DEFAULT_MODEL, delay_ms: float = 0, tokens_per_second: float = 0) -> FastAPI:
    state = ServerState(model, delay_ms, tokens_per_second, initial=(delay_ms, tokens_per_second))
    app = FastAPI(title="fleet loopback OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.fleet = state

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": state.model, "object": "model", "created": 0, "owned_by": "fleet-loopback", "root": state.model}
        return {"object": "list", "data": [card]}

    @app.post("/control")
    async def control(command: Control) -> dict[str, Any]:
        if command.reset:
            state.reset()
        for name in ("delay_ms", "tokens_per_second", "fail_status", "fail_count", "fail_body", "stream_abort_after"):
            if (value := getattr(command, name)) is not None:
                setattr(state, name, value)
        if command.retry_after is not None:
            state.retry_after = str(command.retry_after)
        if command.fail_when_contains is not None:
            state.fail_when_contains = command.fail_when_contains or None
        if command.answer_when_contains is not None:
            state.answer_when_contains = dict(command.answer_when_contains)
        return {"config": state.config(), "stats": state.stats()}

    @app.get("/control/stats")
    async def stats() -> dict[str, Any]:
        return state.stats()

    @app.get("/control/requests")
    async def requests() -> dict[str, Any]:
        return {"requests": list(state.requests)}

    def injected_failure(body: Any) -> Response | None:
        fail = state.fail_count > 0
        if fail:
            state.fail_count -= 1
        elif state.fail_when_contains and isinstance(body, dict):
            messages = body.get("messages") if isinstance(body.get("messages"), list) else []
            texts = [str(m.get("content")) for m in messages if isinstance(m, dict)]
            fail = any(state.fail_when_contains in text for text in texts)
        if not fail:
            return None
        headers = {"Retry-After": state.retry_after} if state.retry_after is not None else None
        if state.fail_body is not None:
            return Response(state.fail_body, status_code=state.fail_status, headers=headers, media_type="text/plain")
        return error_response(state.fail_status, f"injected failure (HTTP {state.fail_status})", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        state.begin()
        status = 500
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            state.requests.append({"request_id": request.headers.get("x-request-id"), "body": body})
            if (failure := injected_failure(body)) is not None:
                status = failure.status_code
                return failure
            try:
                if body is None:
                    raise RequestRejected(400, "the request body is not valid JSON")
                answer = make_answer(body, state.answer_when_contains)
            except RequestRejected as exc:
                status = exc.status
                return error_response(exc.status, exc.message, param=exc.param)
            name = str(body.get("model") or state.model)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                abort_after, state.stream_abort_after = state.stream_abort_after, None
                stream = _stream(state, answer, name, include_usage, abort_after)
                status = -1  # the stream's generator ends the call
                return StreamingResponse(stream, media_type="text/event-stream")
            generation = answer.completion_tokens / state.tokens_per_second if state.tokens_per_second else 0.0
            if not await _generate_unless_gone(request, state.delay_ms / 1000 + generation):
                status = 499  # like vLLM: a request whose client went away is aborted, not finished for nobody
                return Response(status_code=499)
            status = 200
            return JSONResponse(_completion(answer, name))
        finally:
            if status != -1:
                state.end(status)

    return app


async def _generate_unless_gone(request: Request, seconds: float) -> bool:
    """Wait `seconds` (the generation) unless the client disconnects first; False when it did."""
    generating = asyncio.ensure_future(asyncio.sleep(seconds))
    gone = asyncio.ensure_future(request.receive())  # the body is read: the next message is the disconnect
    try:
        await asyncio.wait({generating, gone}, return_when=asyncio.FIRST_COMPLETED)
        return generating.done()
    finally:
        generating.cancel()
        gone.cancel()


def _completion(answer: Answer, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer.content,
                    "reasoning": answer.reasoning,
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    }


async def _stream(
    state: ServerState, answer: Answer, model: str, include_usage: bool, abort_after: int | None
) -> AsyncIterator[str]:
    """SSE chunks in the OpenAI format; the delay is spread over the chunks, `tokens_per_second` paces them."""
    status = 200
    try:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            data: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            data["choices"] = choices
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        pieces = [("reasoning", p) for p in split_tokens(answer.reasoning or "")]
        pieces += [("content", p) for p in split_tokens(answer.content)]
        per_piece = state.delay_ms / 1000 / max(1, len(pieces))
        if state.tokens_per_second:
            per_piece += 1 / state.tokens_per_second
        yield chunk({"role": "assistant", "content": ""})
        start = time.monotonic()
        sent_content = 0
        for i, (kind, piece) in enumerate(pieces, start=1):
            if (wait := start + i * per_piece - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if kind == "content" and abort_after is not None and sent_content >= abort_after:
                status = 499
                log.info("aborting a stream after %d content chunks (stream_abort_after)", sent_content)
                raise _StreamAborted
            sent_content += kind == "content"
            yield chunk({kind: piece})
        yield chunk({}, answer.finish_reason)
        if include_usage:
            total = answer.prompt_tokens + answer.completion_tokens
            usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}
            yield chunk({}, usage={**usage, "total_tokens": total})
        yield "data: [DONE]\n\n"
    except BaseException:
        status = 499  # closed before the end: the client went away, or stream_abort_after
        raise
    finally:
        state.end(status)


# --------------------------------------------------------------------------------------------------------------
# Running it


class _StreamAborted(ConnectionAbortedError):
    """Raised inside a stream to drop the connection mid-body (uvicorn closes it without the final chunk)."""


class _QuietAborts(logging.Filter):
    """uvicorn logs every exception escaping the app with a traceback; a requested abort is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _StreamAborted))


class _Server(uvicorn.Server):
    """Logs the ready line once the socket accepts connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            log.info("ready on http://%s:%d", f"[{host}]" if ":" in host else host, port)


async def serve(host: str, port: int, app: FastAPI) -> None:
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say TCP (accepted ones inherit it);
    # without it every keep-alive response waits ~40 ms for the peer's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="off")
    server = _Server(config)  # uvicorn configures its loggers in Config(); the filter goes on after
    logging.getLogger("uvicorn.error").addFilter(_QuietAborts())
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (named in the ready line)")
    parser.add_argument("--delay-ms", type=float, default=0, help="fixed latency per call")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    parser.add_argument("--tokens-per-second", type=float, default=0, help="generation pace (0 = instant)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.tokens_per_second < 0:
        parser.error("--delay-ms and --tokens-per-second must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    app = create_app(model=args.model, delay_ms=args.delay_ms, tokens_per_second=args.tokens_per_second)
    try:
        asyncio.run(serve(args.host, args.port, app))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@dataclass
class ServerHandle:
    """A loopback server running as a child process."""

    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def control(self, **fields: Any) -> dict[str, Any]:
        """POST /control (e.g. `control(fail_count=2, fail_status=503, retry_after=0)`, `control(reset=True)`)."""
        response = httpx.post(f"{self.url}/control", json=fields, timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/control/stats", timeout=5)
        response.raise_for_status()
        return response.json()

    async def acontrol(self, **fields: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{self.url}/control", json=fields)
            response.raise_for_status()
            return response.json()

    async def astats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.url}/control/stats")
            response.raise_for_status()
            return response.json()

    async def arequests(self) -> list[dict[str, Any]]:
        """The last 50 chat requests received (request id and JSON body), oldest first."""
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.url}/control/requests")
            response.raise_for_status()
            return response.json()["requests"]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the child's PID, SIGKILL if it has not exited within `timeout`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_openai_server(
    port: int | None = None,
    delay_ms: float = 0,
    *,
    model: str = DEFAULT_MODEL,
    tokens_per_second: float = 0,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    startup_timeout: float = 20.0,
) -> ServerHandle:
    """Start the server as a child process and wait until GET /v1/models answers.

    Without `port` the server binds port 0 itself and reports the port it got (no race with other processes).
    Raises RuntimeError with the tail of the server's log if it exits or is not ready within `startup_timeout`.
    """
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="openai-server-")) / "server.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--host", host, "--port", str(port or 0)]
    command += ["--delay-ms", str(delay_ms), "--model", model, "--tokens-per-second", str(tokens_per_second)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log_file:
        process = spawn(  # dies with its parent: a test run that crashes leaves no server behind
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT, env=env
        )
    handle = ServerHandle(url="", process=process, log_path=log_path)
    deadline = time.monotonic() + startup_timeout
    ready = re.compile(r"ready on (http://\S+)")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"openai_server exited with code {process.returncode} before it was ready; log {log_path}:\n"
                f"{handle.log_tail()}"
            )
        if not handle.url and (found := ready.search(handle.log_tail(200))):
            handle.url = found.group(1)
        if handle.url:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{handle.url}/v1/models", timeout=1).status_code == 200:
                    return handle
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"openai_server not ready within {startup_timeout:g}s; log {log_path}:\n{handle.log_tail()}")


if __name__ == "__main__":
    main()
