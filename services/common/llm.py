"""The vLLM adapter of the engine's LLM port: `VLLMClient` speaks vLLM's OpenAI-compatible chat API through the
maintained `openai` client (its retries with Retry-After, SSE parsing and error bodies), over our own httpx client
on aiohttp's connection pool (httpx-aiohttp, the transport the openai client offers for many concurrent calls).

The call types (`LLMRequest`, `LLMResponse`, `ContextWindow`, ...) are the port's, in services/deliberation/llm.py.
`window()` tells the engine the served model's context window: the `context_window` setting (VLLM_CONTEXT_WINDOW)
when it is set, else the `max_model_len` vLLM reports for the model on GET /v1/models (asked once, then kept),
counted with the model's real tokenizer where one is at hand (services/common/tokens.py). A 400 the server gives a
prompt too long for it is a `ContextOverflow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import httpx
import openai
from httpx_aiohttp import AiohttpTransport

from services.common.errors import Unavailable
from services.common.tokens import counter_for
from services.deliberation.llm import (
    ContextOverflow,
    ContextWindow,
    LLMError,
    LLMRequest,
    LLMResponse,
    TokenCounter,
    TokenUsage,
)

T = TypeVar("T")

log = logging.getLogger("fleet.llm")

KEEPALIVE_SECONDS = 4.0
MAX_CONNECTIONS = 512  # to one server, per client: beyond, calls wait for a connection (vLLM queues them anyway)
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))  # what the openai client retries
_ATTEMPT_HEADER = "x-stainless-retry-count"  # the openai client's count of the attempts before this one
_RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"  # asks the client for the raw response (as with_raw_response does)
# vLLM's refusals of a prompt longer than the model's window ("This model's maximum context length is 2048
# tokens. However, your prompt contains at least 2049 input tokens ..."; older: "... you requested N tokens")
_TOO_LONG = ("maximum context length", "is too long", "too many input tokens")


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


def _attempt(request: Any) -> int:
    """1 for the first attempt of a call, 2 for its first retry, ... (read from the request the openai client sent)."""
    try:
        return int(request.headers.get(_ATTEMPT_HEADER, 0)) + 1
    except (AttributeError, ValueError):
        return 1


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's own words: vLLM/OpenAI `{"error": {"message"}}` (the client unwraps "error"), `{"detail"}`."""
    body = exc.body
    if isinstance(body, dict):
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return exc.response.text.strip()[:500] or exc.response.reason_phrase


def _describe(exc: openai.APIConnectionError, timeout: float) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out after {timeout:g}s"
    cause = exc.__cause__
    if isinstance(cause, httpx.ConnectError):
        return f"connection failed: {cause}" if str(cause) else "connection failed"
    if cause is not None:
        return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return exc.message


def _transport_error(exc: httpx.TransportError) -> httpx.TransportError:
    """httpx-aiohttp (0.2) files every aiohttp connection error that is not a timeout under `ConnectTimeout`: a
    refused connection would read "timed out after 120s" and a server gone mid-answer would look like a slow
    connect. Those get the kind httpx itself gives them."""
    cause = exc.__cause__
    if (
        not isinstance(exc, httpx.ConnectTimeout)
        or not isinstance(cause, aiohttp.ClientConnectionError)
        or isinstance(cause, aiohttp.ServerTimeoutError)  # a real timeout
    ):
        return exc
    message = str(exc)
    kind: type[httpx.TransportError] = httpx.ReadError
    if isinstance(cause, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
        if errno := cause.os_error.errno:  # aiohttp's own text is "Connect call failed", whatever the reason
            message = f"{cause.host}:{cause.port}: {os.strerror(errno)}"
    elif isinstance(cause, aiohttp.ServerDisconnectedError):
        kind = httpx.RemoteProtocolError
    mapped = kind(message)
    mapped.__cause__ = cause
    return mapped


class _LoggedAttempts(httpx.AsyncBaseTransport):
    """Logs every attempt that failed with a status or transport error the openai client retries (the client
    itself only logs at INFO, without the status, the server's message or our request id); gives aiohttp's
    connection errors their httpx kind (`_transport_error`)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, attempts: int) -> None:
        self.inner = inner
        self.attempts = attempts

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TransportError as exc:
            mapped = _transport_error(exc)
            self._log(request, f"{type(mapped).__name__}: {mapped}" if str(mapped) else type(mapped).__name__)
            if mapped is exc:
                raise
            raise mapped from exc.__cause__
        if response.status_code in RETRYABLE_STATUS:
            await response.aread()
            self._log(request, f"HTTP {response.status_code}: {response.content[:300].decode(errors='replace')}")
        return response

    def _log(self, request: httpx.Request, reason: str) -> None:
        attempt = _attempt(request)
        request_id = request.headers.get("X-Request-Id", "")
        log.warning(
            "vLLM %s %s failed (attempt %d/%d): %s",
            request.method,
            request.url.path,
            attempt,
            self.attempts,
            reason,
            extra={"request_id": request_id, "attempt": attempt, "reason": reason},
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class VLLMClient:
    """vLLM's OpenAI-compatible chat API: `openai.AsyncOpenAI` over one reused `httpx.AsyncClient`.

    The connections are aiohttp's (`AiohttpTransport`): hundreds of agent calls in flight to one server cost
    ~1 ms of CPU each, where httpcore's pool, which re-scans every connection at each request's start and end,
    cost ~5.5 (bench/bench_scale.py, issue 15). Tests pass their own `transport`.

    `base_url` is the server root (`VLLM_URL`, e.g. `http://vllm:8000`); the client adds `/v1`.
    A call makes at most `1 + max_retries` attempts: the openai client retries connection errors, timeouts, HTTP
    408/409/429/5xx with exponential backoff and jitter, honouring `Retry-After` (seconds or a date, up to 2 min);
    when the attempts are used up it raises `Unavailable`. Any other refusal (400, 404, ...) or an unreadable
    answer raises `LLMError` at once. A stream that breaks after its 200 is not repeated: `Unavailable`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        context_window: int = 0,
        counter: TokenCounter | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.context_window = max(0, context_window)  # 0: ask the server
        self.counter = counter
        self._window: ContextWindow | None = None
        self._window_asked = False
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        timeouts = httpx.Timeout(timeout, connect=min(timeout, 10.0))  # waiting for a free connection: `timeout`
        if transport is None:
            # idle connections closed before the server closes them (uvicorn's and so vLLM's keep-alive: 5 s): one the
            # server closes as it is picked for the next call fails that call's attempt ("Server disconnected")
            limits = httpx.Limits(max_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE_SECONDS)
            transport = AiohttpTransport(limits=limits)
        self._http = httpx.AsyncClient(timeout=timeouts, transport=_LoggedAttempts(transport, self.max_retries + 1))
        self._openai = openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or "EMPTY",  # vLLM started without --api-key ignores it
            timeout=timeouts,
            max_retries=self.max_retries,
            http_client=self._http,
        )

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._openai.close()

    # -- public calls

    async def complete(
        self, request: LLMRequest, on_delta: Callable[[str], Awaitable[None]] | None = None
    ) -> LLMResponse:
        """One chat completion; with `on_delta`, streamed (content deltas awaited in order, reasoning kept apart)."""
        started = time.perf_counter()
        if on_delta is None:
            exchange = self._completion(request)
        else:
            exchange = self._stream_completion(request, on_delta)
        response = await _cancel_once(self._errors(exchange))
        return dataclasses.replace(response, latency_ms=(time.perf_counter() - started) * 1000)

    async def models(self) -> list[str]:
        """The served model names (GET /v1/models)."""

        async def listing() -> list[str]:
            return [str(model.id) async for model in self._openai.models.list()]

        return await _cancel_once(self._errors(listing()))

    async def window(self) -> ContextWindow | None:
        """The served model's context window: the `context_window` setting, else the `max_model_len` the server
        reports for this model (None when it reports none: prompts are then not budgeted). Asked once; an
        unreachable server is not remembered (the next call asks again) and gives None."""
        if self.asked_window:
            return self._window
        counter = self.counter or counter_for(self.model)
        if self.context_window:
            self._window = ContextWindow(self.context_window, counter, "setting")
            return self._window
        try:
            tokens = await self.max_model_len()
        except Unavailable as e:
            log.warning("the context window of %s is unknown for now: %s", self.model, e.message)
            return None
        except LLMError as e:
            log.warning("the context window of %s is unknown: %s", self.model, e.message)
            tokens = None
        self._window_asked = True
        if tokens is None:
            log.warning(
                "vLLM at %s reports no max_model_len for %s: prompts are not fitted to a window "
                "(set VLLM_CONTEXT_WINDOW)",
                self.base_url,
                self.model,
            )
            return None
        self._window = ContextWindow(tokens, counter, "server")
        log.info("model %s: %s", self.model, self._window.describe())
        return self._window

    @property
    def asked_window(self) -> bool:
        """The window is known, or the server answered without one (so asking again would not help)."""
        return self._window is not None or self._window_asked

    async def max_model_len(self) -> int | None:
        """The context window vLLM reports for this model on GET /v1/models (`max_model_len`), None if none. One
        quick attempt: a deliberation waiting for it when the server is down would wait twice."""
        quick = self._openai.with_options(max_retries=0, timeout=min(self.timeout, 10.0))

        async def listing() -> list[Any]:
            return [model async for model in quick.models.list()]

        cards = await _cancel_once(self._errors(listing()))
        mine = [c for c in cards if str(c.id) == self.model] or (cards if len(cards) == 1 else [])
        value = (mine[0].model_extra or {}).get("max_model_len") if mine else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    async def health(self) -> bool:
        """True when the server answers GET /health with 200 (one quick attempt, never raises)."""
        try:
            response = await self._http.get(f"{self.base_url}/health", timeout=min(self.timeout, 5.0))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- the calls

    def _arguments(self, request: LLMRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "extra_body": {"chat_template_kwargs": {"enable_thinking": request.enable_thinking}},  # vLLM's own
            "extra_headers": {"X-Request-Id": request.request_id},
        }
        if request.seed is not None:
            arguments["seed"] = request.seed
        if request.stop:
            arguments["stop"] = list(request.stop)
        if request.json_schema is not None:
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.json_schema, "strict": True},
            }
        return arguments

    async def _completion(self, request: LLMRequest) -> LLMResponse:
        # The body is posted as it is, through the client's own retries: its typed request transform and response
        # models cost ~0.8 ms of CPU per call (1.9 -> 1.1 ms measured on loopback), for the fields read below.
        arguments = self._arguments(request)
        body = {k: v for k, v in arguments.items() if k not in ("extra_body", "extra_headers")} | arguments[
            "extra_body"
        ]
        headers = {**arguments["extra_headers"], _RAW_RESPONSE_HEADER: "true"}  # the answer with its retries taken
        raw = await self._openai.post("/chat/completions", body=body, cast_to=object, options={"headers": headers})
        try:
            completion = raw.parse()
            choice = completion["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if not isinstance(content, str) or not (reasoning is None or isinstance(reasoning, str)):
                raise TypeError("content/reasoning is not text")
            usage = completion.get("usage") or {}
            return LLMResponse(
                content=content,
                usage=TokenUsage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)),
                reasoning=reasoning,
                model=str(completion.get("model") or self.model),
                finish_reason=choice.get("finish_reason"),
                attempts=raw.retries_taken + 1,
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise LLMError(
                f"unparsable chat completion from vLLM at {self.base_url} ({exc!r}): {raw.http_response.text[:300]!r}"
            ) from exc

    async def _stream_completion(self, request: LLMRequest, on_delta: Callable[[str], Awaitable[None]]) -> LLMResponse:
        content: list[str] = []
        reasoning: list[str] = []
        usage = TokenUsage()
        finish_reason: str | None = None
        model = self.model
        raw = await self._openai.chat.completions.with_raw_response.create(
            **self._arguments(request), stream=True, stream_options={"include_usage": True}
        )
        # the chunks as plain dicts: the library's typed chunk models tripled the client CPU of a streamed call
        # (18.7 against 5.7 ms for 158 chunks, measured), for the fields read below
        stream: openai.AsyncStream[Any] = openai.AsyncStream(
            cast_to=object, response=raw.http_response, client=self._openai
        )
        try:
            async with stream:
                async for chunk in stream:
                    if not isinstance(chunk, dict):
                        raise LLMError(f"unparsable stream chunk from vLLM at {self.base_url}: {chunk!r:.300}")
                    model = str(chunk.get("model") or model)
                    if chunk.get("usage"):
                        usage = TokenUsage(
                            int(chunk["usage"].get("prompt_tokens") or 0),
                            int(chunk["usage"].get("completion_tokens") or 0),
                        )
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if text := delta.get("reasoning") or delta.get("reasoning_content"):
                            reasoning.append(text)
                        if text := delta.get("content"):
                            content.append(text)
                            await on_delta(text)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
        except json.JSONDecodeError as exc:
            raise LLMError(f"unparsable stream chunk from vLLM at {self.base_url}: {exc.doc[:300]!r}") from exc
        except openai.APIError as exc:  # an error chunk, or the connection broke or timed out mid-stream
            if isinstance(exc, openai.APIConnectionError):
                reason = _describe(exc, self.timeout)
            else:
                code = exc.body.get("code") if isinstance(exc.body, dict) else None
                if not (isinstance(code, int) and code in RETRYABLE_STATUS):
                    raise LLMError(f"vLLM at {self.base_url} failed mid-stream: {exc.message}") from exc
                reason = f"HTTP {code}: {exc.message}"  # a server failure (its engine died while stopping)
            raise Unavailable(
                f"stream from vLLM at {self.base_url} broke after {len(content)} deltas: {reason}"
            ) from exc
        if finish_reason is None:
            raise Unavailable(
                f"stream from vLLM at {self.base_url} broke after {len(content)} deltas: stream ended without [DONE]"
            )
        return LLMResponse(
            content="".join(content),
            usage=usage,
            reasoning="".join(reasoning) if reasoning else None,
            model=model,
            finish_reason=finish_reason,
            attempts=raw.retries_taken + 1,
        )

    async def _errors(self, exchange: Awaitable[T]) -> T:
        """The openai client's exceptions as the port's: `Unavailable` once its attempts are used up, else `LLMError`."""
        try:
            return await exchange
        except openai.APIStatusError as exc:
            status = exc.status_code
            message = _server_message(exc)
            if status in RETRYABLE_STATUS:
                raise self._unavailable(exc, f"HTTP {status}: {message}") from exc
            if status == 400 and any(words in message.lower() for words in _TOO_LONG):
                raise ContextOverflow(f"vLLM at {self.base_url} refused the prompt as too long: {message}") from exc
            raise LLMError(f"vLLM at {self.base_url} rejected the request (HTTP {status}): {message}") from exc
        except openai.APIConnectionError as exc:
            raise self._unavailable(exc, _describe(exc, self.timeout)) from exc
        except openai.APIResponseValidationError as exc:
            raise LLMError(f"unparsable answer from vLLM at {self.base_url}: {exc.message}") from exc

    def _unavailable(self, exc: openai.APIError, reason: str) -> Unavailable:
        attempts = _attempt(exc.request)
        return Unavailable(
            f"vLLM at {self.base_url} unavailable after {attempts} attempt{'s' * (attempts > 1)}: {reason}"
        )
