"""The vLLM adapter of the engine's LLM port: `VLLMClient` speaks vLLM's OpenAI-compatible chat API.

The call types (`LLMRequest`, `LLMResponse`, ...) are the port's, in services/deliberation/llm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx

from services.common.errors import Unavailable
from services.deliberation.llm import LLMError, LLMRequest, LLMResponse, TokenUsage

T = TypeVar("T")


# --- The vLLM adapter -------------------------------------------------------------------------------------------

log = logging.getLogger("fleet.llm")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRY_AFTER_STATUS = frozenset({429, 503})


class _Retryable(Exception):
    """One failed attempt that may succeed when repeated (transport trouble, overload)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_message(response: httpx.Response) -> str:
    """The server's own words: vLLM/OpenAI `{"error": {"message"}}`, older vLLM `{"message"}`, FastAPI `{"detail"}`."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return text.strip()[:500]


def _describe(exc: httpx.HTTPError, timeout: float) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connect timed out ({exc})" if str(exc) else "connect timed out"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:g}s ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc}" if str(exc) else "connection failed"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _cancel_once(exchange: Awaitable[T], grace: float = 5.0) -> T:
    """Await an HTTP exchange so that, however often the caller is cancelled, the exchange is cancelled once and
    its clean-up (closing the connection, which tells the server to stop generating) runs to its end.

    httpcore protects that clean-up with an anyio shield, which native asyncio cancellation passes through: a
    second `Task.cancel()` landing while the first one's clean-up awaits (an `asyncio.timeout` and a Ray
    `ray.cancel` of the same actor call, a few loop iterations apart) left the socket open and the server
    generating for nobody (issue 17). Here the exchange runs in its own task; the caller's first cancellation is
    passed on, later ones wait (up to `grace` seconds) for the clean-up to finish, then the caller is cancelled.
    """
    inner = asyncio.ensure_future(exchange)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        inner.cancel()
        deadline = time.monotonic() + grace
        while not inner.done() and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.CancelledError):  # absorbed: the one cancel is already on its way
                await asyncio.wait({inner}, timeout=left)
        if inner.done() and not inner.cancelled():
            inner.exception()  # retrieved: the caller is cancelled, whatever the exchange ended with
        raise


def _usage(raw: Any) -> TokenUsage:
    if not isinstance(raw, dict):
        return TokenUsage()
    return TokenUsage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


class VLLMClient:
    """vLLM's OpenAI-compatible chat API over one reused `httpx.AsyncClient`.

    `base_url` is the server root (`VLLM_URL`, e.g. `http://vllm:8000`); the client adds `/v1`.
    A call makes at most `1 + max_retries` attempts: connection errors, timeouts and HTTP 429/500/502/503/504 are
    retried with exponential backoff and jitter (`Retry-After` honoured on 429/503, capped at `backoff_max`);
    when the attempts are used up it raises `Unavailable`. Any other refusal (400, 404, ...) or an unreadable
    answer raises `LLMError` at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root.removesuffix("/v1")
        self.model = model
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            transport=transport,
        )

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- public calls

    async def complete(
        self, request: LLMRequest, on_delta: Callable[[str], Awaitable[None]] | None = None
    ) -> LLMResponse:
        """One chat completion; with `on_delta`, streamed (content deltas awaited in order, reasoning kept apart)."""
        body = self._chat_body(request, stream=on_delta is not None)
        headers = {"X-Request-Id": request.request_id}
        started = time.perf_counter()
        if on_delta is None:

            async def attempt() -> LLMResponse:
                response = await self._http.post("/v1/chat/completions", json=body, headers=headers)
                self._check_status(response)
                return self._parse_completion(response)

        else:

            async def attempt() -> LLMResponse:
                return await self._stream_completion(body, headers, on_delta)

        response, attempts = await _cancel_once(self._with_retries("chat completion", request.request_id, attempt))
        latency_ms = (time.perf_counter() - started) * 1000
        return dataclasses.replace(response, latency_ms=latency_ms, attempts=attempts)

    async def models(self) -> list[str]:
        """The served model names (GET /v1/models)."""

        async def attempt() -> list[str]:
            response = await self._http.get("/v1/models")
            self._check_status(response)
            try:
                return [str(item["id"]) for item in response.json()["data"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise LLMError(f"unparsable model list from vLLM at {self.base_url}: {exc!r}") from exc

        models, _ = await _cancel_once(self._with_retries("model list", "", attempt))
        return models

    async def health(self) -> bool:
        """True when the server answers GET /health with 200 (one quick attempt, never raises)."""
        try:
            response = await self._http.get("/health", timeout=min(self.timeout, 5.0))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- request building and parsing

    def _chat_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "chat_template_kwargs": {"enable_thinking": request.enable_thinking},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.json_schema, "strict": True},
            }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        message = _error_message(response)
        if status in RETRYABLE_STATUS:
            retry_after = None
            if status in _RETRY_AFTER_STATUS:
                retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            raise _Retryable(f"HTTP {status}: {message}", retry_after)
        raise LLMError(f"vLLM at {self.base_url} rejected the request (HTTP {status}): {message}")

    def _parse_completion(self, response: httpx.Response) -> LLMResponse:
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if not isinstance(content, str) or not (reasoning is None or isinstance(reasoning, str)):
                raise TypeError("content/reasoning is not text")
            return LLMResponse(
                content=content,
                usage=_usage(data.get("usage")),
                reasoning=reasoning,
                model=str(data.get("model") or self.model),
                finish_reason=choice.get("finish_reason"),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise LLMError(
                f"unparsable chat completion from vLLM at {self.base_url} ({exc!r}): {response.text[:300]!r}"
            ) from exc

    async def _stream_completion(
        self, body: dict[str, Any], headers: dict[str, str], on_delta: Callable[[str], Awaitable[None]]
    ) -> LLMResponse:
        content: list[str] = []
        reasoning: list[str] = []
        usage = TokenUsage()
        finish_reason: str | None = None
        model = self.model
        done = False
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._check_status(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments (": ping"), event:/id: fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                        if not isinstance(chunk, dict):
                            raise TypeError("chunk is not an object")
                    except (ValueError, TypeError) as exc:
                        raise LLMError(f"unparsable stream chunk from vLLM at {self.base_url}: {data[:300]!r}") from exc
                    if chunk.get("error"):
                        error = chunk["error"]
                        text = error.get("message") if isinstance(error, dict) else error
                        code = error.get("code") if isinstance(error, dict) else None
                        # a server failure (e.g. its engine died while stopping) is UNAVAILABLE, like an HTTP 5xx
                        if isinstance(code, int) and code in RETRYABLE_STATUS:
                            if content:
                                raise Unavailable(
                                    f"stream from vLLM at {self.base_url} broke after {len(content)} deltas: "
                                    f"HTTP {code}: {text}"
                                )
                            raise _Retryable(f"HTTP {code} mid-stream: {text}")
                        raise LLMError(f"vLLM at {self.base_url} failed mid-stream: {text}")
                    model = str(chunk.get("model") or model)
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if text := delta.get("reasoning") or delta.get("reasoning_content"):
                            reasoning.append(text)
                        if text := delta.get("content"):
                            content.append(text)
                            await on_delta(text)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
        except httpx.HTTPError as exc:
            if content:  # the caller has seen part of the answer: repeating the call would duplicate it
                raise Unavailable(
                    f"stream from vLLM at {self.base_url} broke after {len(content)} deltas: "
                    f"{_describe(exc, self.timeout)}"
                ) from exc
            raise _Retryable(_describe(exc, self.timeout)) from exc
        if not done and finish_reason is None:
            reason = "stream ended without [DONE]"
            if content:
                raise Unavailable(f"stream from vLLM at {self.base_url} broke after {len(content)} deltas: {reason}")
            raise _Retryable(reason)
        return LLMResponse(
            content="".join(content),
            usage=usage,
            reasoning="".join(reasoning) if reasoning else None,
            model=model,
            finish_reason=finish_reason,
        )

    # -- retries

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            base = min(retry_after, self.backoff_max)
        else:
            base = min(self.backoff_base * 2 ** (attempt - 1), self.backoff_max)
        return min(base * (1 + random.uniform(0, 0.1)), self.backoff_max)

    async def _with_retries(self, what: str, request_id: str, attempt_fn: Callable[[], Awaitable[T]]) -> tuple[T, int]:
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                try:
                    return await attempt_fn(), attempt
                except httpx.HTTPError as exc:
                    raise _Retryable(_describe(exc, self.timeout)) from exc
            except _Retryable as failure:
                if attempt == attempts:
                    raise Unavailable(
                        f"vLLM at {self.base_url} unavailable after {attempts} attempt{'s' * (attempts > 1)}: "
                        f"{failure.reason}"
                    ) from failure.__cause__
                delay = self._backoff(attempt, failure.retry_after)
                log.warning(
                    "vLLM %s failed (attempt %d/%d): %s; retrying in %.2fs",
                    what,
                    attempt,
                    attempts,
                    failure.reason,
                    delay,
                    extra={"request_id": request_id, "attempt": attempt, "reason": failure.reason, "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
