"""VLLMClient against the loopback OpenAI-compatible server over real HTTP."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import socket
import time
from email.utils import formatdate

import httpx
import jsonschema
import pytest
from openai_server import ServerHandle, start_openai_server

from services.common.errors import Unavailable
from services.common.llm import VLLMClient
from services.deliberation.llm import ChatMessage, LLMError, LLMRequest

pytestmark = pytest.mark.integration

MESSAGES = (
    ChatMessage("system", "You are a senior Python developer in a council of agents."),
    ChatMessage("user", "Implement a rate limiter for the API gateway.\nKeep it small and tested."),
)

SCORE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["scores", "winner", "reason", "confident"],
    "properties": {
        "scores": {
            "type": "array",
            "minItems": 2,
            "maxItems": 4,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["criterion", "score"],
                "properties": {
                    "criterion": {"type": "string", "enum": ["correctness", "clarity", "security"]},
                    "score": {"type": "integer", "minimum": 1, "maximum": 10},
                },
            },
        },
        "winner": {"type": "string", "enum": ["p1", "p2", "p3"]},
        "reason": {"type": "string", "minLength": 10, "maxLength": 80},
        "confident": {"type": "boolean"},
        "weight": {"type": "number", "minimum": 0, "maximum": 1},
        "ranking": {"type": "array", "items": {"enum": ["p1", "p2", "p3"]}, "uniqueItems": True, "maxItems": 3},
    },
}


def request(request_id: str = "req-1", **kwargs) -> LLMRequest:
    return LLMRequest(messages=MESSAGES, request_id=request_id, seed=kwargs.pop("seed", 7), **kwargs)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_plain_completion(client: VLLMClient, server: ServerHandle) -> None:
    response = await client.complete(request(max_tokens=1000))

    assert response.finish_reason == "stop"
    assert response.model == "test-model"
    assert response.reasoning is None
    assert response.attempts == 1
    assert response.latency_ms > 0
    (code,) = python_blocks(response.content)
    ast.parse(code)
    assert response.usage.prompt_tokens == sum(len(m.content.split()) for m in MESSAGES)
    assert response.usage.completion_tokens == len(response.content.split())
    # what went over the wire
    (sent,) = await _requests(server)
    assert sent["request_id"] == "req-1"
    body = sent["body"]
    assert body["model"] == "test-model"
    assert body["messages"][1] == {"role": "user", "content": MESSAGES[1].content}
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["seed"] == 7 and body["max_tokens"] == 1000
    assert "response_format" not in body and "stream" not in body


async def _requests(server: ServerHandle) -> list[dict]:
    """What the server received (request id header and JSON body), oldest first."""
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{server.url}/control/requests")).json()["requests"]


async def test_answers_are_deterministic_per_seed(client: VLLMClient) -> None:
    first = await client.complete(request(seed=1))
    again = await client.complete(request(seed=1))
    others = {(await client.complete(request(seed=seed))).content for seed in range(2, 8)}
    assert first.content == again.content
    assert len(others | {first.content}) > 2


async def test_max_tokens_truncates_with_length(client: VLLMClient) -> None:
    response = await client.complete(request(max_tokens=12))
    assert response.finish_reason == "length"
    assert response.usage.completion_tokens == 12
    assert len(response.content.split()) == 12


async def test_json_schema_answer_is_valid(client: VLLMClient, server: ServerHandle) -> None:
    answers = [
        await client.complete(request(f"r{i}", seed=i, json_schema=SCORE_SCHEMA, schema_name="vote")) for i in range(10)
    ]
    for answer in answers:
        jsonschema.validate(json.loads(answer.content), SCORE_SCHEMA)
    sent = (await _requests(server))[-1]["body"]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "vote", "schema": SCORE_SCHEMA, "strict": True},
    }
    again = await client.complete(request("r0", seed=0, json_schema=SCORE_SCHEMA, schema_name="vote"))
    assert again.content == answers[0].content


async def test_unsupported_schema_keyword_is_an_llm_error(client: VLLMClient, server: ServerHandle) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}, "required": ["id"]}
    with pytest.raises(LLMError, match=r"HTTP 400.*'pattern' at \$\.properties\.id"):
        await client.complete(request(json_schema=schema))
    assert (await server.astats())["calls"] == 1


async def test_streaming_deltas_reassemble_the_answer(client: VLLMClient, server: ServerHandle) -> None:
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    streamed = await client.complete(request(), on_delta=on_delta)
    plain = await client.complete(request())

    assert len(deltas) > 20
    assert "".join(deltas) == streamed.content == plain.content
    assert streamed.usage == plain.usage and streamed.usage.completion_tokens > 0
    assert streamed.finish_reason == "stop"
    sent = (await _requests(server))[0]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_thinking_is_sent_and_reasoning_kept_apart(client: VLLMClient, server: ServerHandle) -> None:
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    plain = await client.complete(request(enable_thinking=True))
    streamed = await client.complete(request(enable_thinking=True), on_delta=on_delta)

    assert plain.reasoning and plain.reasoning.startswith("The request is about")
    assert "```python" in plain.content and plain.reasoning not in plain.content
    assert streamed.reasoning == plain.reasoning and streamed.content == plain.content
    assert "".join(deltas) == streamed.content  # reasoning never reaches on_delta
    assert all(r["body"]["chat_template_kwargs"] == {"enable_thinking": True} for r in await _requests(server))


async def test_retries_503_then_succeeds(client: VLLMClient, server: ServerHandle, caplog) -> None:
    await server.acontrol(fail_count=2, fail_status=503, retry_after=0)
    with caplog.at_level(logging.WARNING, logger="fleet.llm"):
        response = await client.complete(request())

    assert response.attempts == 3 and response.content
    stats = await server.astats()
    assert stats["calls"] == 3 and stats["failures"] == 2
    assert stats["by_status"] == {"503": 2, "200": 1}
    retries = [r for r in caplog.records if r.name == "fleet.llm"]
    assert [r.attempt for r in retries] == [1, 2]
    assert "HTTP 503" in retries[0].getMessage()


async def test_streaming_retries_before_anything_is_streamed(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_count=1, fail_status=502)
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    response = await client.complete(request(), on_delta=on_delta)
    assert response.attempts == 2 and "".join(deltas) == response.content
    assert (await server.astats())["by_status"] == {"502": 1, "200": 1}


async def test_streaming_does_not_retry_after_partial_output(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(stream_abort_after=5)
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    with pytest.raises(Unavailable, match="broke after 5 deltas"):
        await client.complete(request(), on_delta=on_delta)
    assert len(deltas) == 5
    assert (await server.astats())["calls"] == 1


async def test_429_retry_after_is_honoured(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_count=1, fail_status=429, retry_after=1)
    started = time.monotonic()
    response = await client.complete(request())
    assert time.monotonic() - started >= 1.0
    assert response.attempts == 2
    assert (await server.astats())["by_status"] == {"429": 1, "200": 1}


async def test_503_retry_after_http_date_is_honoured(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_count=1, fail_status=503, retry_after=formatdate(time.time() + 2, usegmt=True))
    started = time.monotonic()
    response = await client.complete(request())
    assert time.monotonic() - started >= 0.9  # whole seconds: the date lands 1-2 s ahead
    assert response.attempts == 2


async def test_streaming_spreads_the_delay_over_the_chunks(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(delay_ms=400)
    arrivals: list[float] = []

    async def on_delta(text: str) -> None:
        arrivals.append(time.monotonic())

    started = time.monotonic()
    await client.complete(request(), on_delta=on_delta)
    ended = time.monotonic()
    assert ended - started >= 0.4  # the whole answer takes the delay ...
    assert arrivals[0] - started < (ended - started) / 2  # ... and the first token comes early in it


async def test_persistent_503_is_unavailable_after_max_retries(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_count=100, fail_status=503)
    with pytest.raises(Unavailable) as caught:
        await client.complete(request())
    assert f"vLLM at {server.url} unavailable after 4 attempts: HTTP 503" in str(caught.value)
    assert (await server.astats())["calls"] == 4  # 1 + max_retries


async def test_fail_when_contains_targets_one_agent(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_when_contains="agent-dev-002", fail_status=500)
    ok = LLMRequest(messages=(*MESSAGES, ChatMessage("user", "You are agent-dev-001.")), request_id="a1")
    doomed = LLMRequest(messages=(*MESSAGES, ChatMessage("user", "You are agent-dev-002.")), request_id="a2")
    assert (await client.complete(ok)).content
    with pytest.raises(Unavailable, match="HTTP 500"):
        await client.complete(doomed)
    assert (await server.astats())["by_status"] == {"200": 1, "500": 4}


async def test_server_down_is_unavailable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with VLLMClient(url, "test-model", max_retries=2) as client:
        with pytest.raises(Unavailable) as caught:
            await client.complete(request())
        assert not await client.health()
    assert time.monotonic() - started < 8  # refused at once: the 10 s connect timeout is never waited out
    message = str(caught.value)
    assert message.startswith(f"vLLM at {url} unavailable after 3 attempts: connection failed")
    assert "refused" in message.lower() or "connection attempts failed" in message.lower()


async def test_timeout_is_retried_then_unavailable(server: ServerHandle) -> None:
    await server.acontrol(delay_ms=1000)
    async with VLLMClient(server.url, "test-model", timeout=0.3, max_retries=1) as client:
        with pytest.raises(Unavailable, match=r"unavailable after 2 attempts: timed out after 0.3s"):
            await client.complete(request())
    assert (await server.astats())["calls"] == 2


async def test_400_is_an_llm_error_without_retry(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_count=1, fail_status=400)
    with pytest.raises(LLMError, match=r"HTTP 400\): injected failure"):
        await client.complete(request())
    with pytest.raises(LLMError, match="max_tokens must be at least 1"):
        await client.complete(request(max_tokens=0))
    stats = await server.astats()
    assert stats["by_status"].get("400") == 2  # no retry of a 400 (a late call of an earlier test may add a 200)


async def test_unparsable_response_is_an_llm_error(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(fail_count=1, fail_status=200, fail_body="<html>proxy says hi</html>")
    with pytest.raises(LLMError, match="unparsable chat completion"):
        await client.complete(request())
    assert (await server.astats())["calls"] == 1


async def test_concurrent_calls_overlap(client: VLLMClient, server: ServerHandle) -> None:
    await server.acontrol(delay_ms=300)
    responses = await asyncio.gather(*(client.complete(request(f"c{i}", seed=i)) for i in range(5)))
    assert all(r.content for r in responses)
    assert (await server.astats())["max_in_flight"] == 5  # all five at the server at once
    stats = await server.astats()
    assert stats["calls"] == 5 and stats["max_in_flight"] >= 5
    async with asyncio.timeout(2):  # a streamed call ends on the server just after its client saw [DONE]
        while (await server.astats())["in_flight"]:
            await asyncio.sleep(0.01)


async def test_models_and_health(client: VLLMClient) -> None:
    assert await client.models() == ["test-model"]
    assert await client.health()


def test_start_failure_reports_the_log_tail() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(
            RuntimeError, match=r"(?s)exited with code 1.*cannot listen on 127.0.0.1:\d+: .*Address already in use"
        ):
            start_openai_server(port=taken.getsockname()[1], startup_timeout=10)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "plain"])
@pytest.mark.parametrize("gap", [0, 1, 2], ids=lambda n: f"{n}-iterations-apart")
async def test_a_call_cancelled_twice_still_aborts_its_http_request(
    client: VLLMClient, server: ServerHandle, streamed: bool, gap: int
) -> None:
    """Issue 17: a deadline's cancel and Ray's cancel of the same call land a few loop iterations apart; the second
    used to interrupt httpcore's connection close (its anyio shield does not stop asyncio cancellation), so the
    socket stayed open and the server went on generating for nobody. Deterministic: the two cancels are placed
    `gap` event-loop iterations apart, which left the request in flight every time before the fix."""
    await server.acontrol(delay_ms=20_000)

    async def ignore(_: str) -> None:
        return None

    call = asyncio.create_task(client.complete(request("cancelled-twice"), on_delta=ignore if streamed else None))
    while (await server.astats())["in_flight"] == 0:  # the request is at the server
        await asyncio.sleep(0.02)
    call.cancel()
    for _ in range(gap):
        await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    deadline = time.monotonic() + 10  # far below the server's 20 s: only an abort ends the request in time
    while (stats := await server.astats())["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert stats["in_flight"] == 0 and stats["by_status"] == {"499": 1}, stats
