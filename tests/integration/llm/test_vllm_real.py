"""The project's vLLM client against the REAL vLLM (CPU) server: no fake in between.

`vllm` (tests/conftest.py, session scope) serves the tiny random-weight Qwen3 as `Qwen/Qwen3-0.6B` with the
qwen3 reasoning parser and xgrammar: its text is noise, but the request and answer shapes are production's.
The SmolLM2 server (real weights) is started once in this module, for the smoke test and for the stop test.
Needs `make llm` once (CI runs it); without it the fixtures fail saying so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest

from services.common.errors import Unavailable
from services.common.llm import VLLMClient
from services.deliberation.llm import ChatMessage, LLMRequest
from services.local.vllm import (
    BUILD_SCRIPT,
    OFFLINE_ENV,
    VLLMNotInstalled,
    VLLMServer,
    model_dir,
    require_setup,
    setup,
    start_vllm,
)

# Each vLLM start takes 35-140 s on 2 busy cores; the module's fixtures count against the first test's timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MESSAGES = (
    ChatMessage("system", "You are a senior Python developer in a council of agents."),
    ChatMessage("user", "Review this proposal: a token-bucket rate limiter. Give a verdict and a score."),
)

# Bounded on purpose (what vLLM's guided decoding compiles): enums, integer ranges, short patterned strings, bounded arrays.
REVIEW_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["verdict", "score", "reason", "tags"],
    "properties": {
        "verdict": {"type": "string", "enum": ["accept", "revise", "reject"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "reason": {"type": "string", "pattern": "^[a-z ]{1,40}$"},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "enum": ["perf", "security", "style"]}},
    },
}


def request(request_id: str, **kw: object) -> LLMRequest:
    defaults: dict[str, object] = {"messages": MESSAGES, "request_id": request_id, "seed": 7, "max_tokens": 48}
    return LLMRequest(**{**defaults, **kw})  # type: ignore[arg-type]


# --- setup: no server needed -------------------------------------------------------------------------------------


def test_without_setup_starting_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(VLLMNotInstalled, match=r"make llm.*fleet llm setup"):
        start_vllm("qwen3-tiny", tmp_path / "logs", cache=tmp_path / "empty-cache")
    assert not (tmp_path / "logs" / "vllm.log").exists()  # nothing was spawned


def test_setup_again_is_a_quick_no_op() -> None:
    require_setup("qwen3-tiny")  # fails with the instruction when `make llm` was not run
    t0 = time.monotonic()
    report = setup(echo=lambda _: None)
    assert report.seconds == {} and report.skipped == ["vllm-venv", "qwen3-tiny", "smollm2-135m"]
    assert time.monotonic() - t0 < 10  # a fresh setup takes minutes


def test_qwen3_tiny_build_is_deterministic(tmp_path: Path) -> None:
    """Rebuilding the tiny Qwen3 gives byte-identical weights and tokenizer (fixed seed, no timestamps)."""
    python, built = require_setup("qwen3-tiny")
    out = tmp_path / "qwen3-tiny"
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(python), str(BUILD_SCRIPT), "qwen3-tiny", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert _sha256(out / name) == _sha256(built / name), name
    assert built == model_dir("qwen3-tiny")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the tiny Qwen3, served as Qwen/Qwen3-0.6B ------------------------------------------------------------------------


@pytest.fixture
async def qwen(vllm: VLLMServer) -> AsyncIterator[VLLMClient]:
    async with VLLMClient(vllm.url, vllm.model, timeout=60, max_retries=1) as client:
        yield client


async def test_the_server_lists_the_production_model_name(vllm: VLLMServer, qwen: VLLMClient) -> None:
    assert vllm.url.startswith("http://127.0.0.1:")
    assert vllm.model == "Qwen/Qwen3-0.6B"
    assert await qwen.models() == ["Qwen/Qwen3-0.6B"]
    assert await qwen.health()
    assert vllm.env() == {"VLLM_URL": vllm.url, "VLLM_MODEL": "Qwen/Qwen3-0.6B"}


async def test_json_schema_answers_are_valid_json_matching_the_schema(qwen: VLLMClient) -> None:
    answers = await asyncio.gather(
        *(qwen.complete(request(f"schema-{i}", seed=i, max_tokens=200, json_schema=REVIEW_SCHEMA)) for i in range(6))
    )
    for answer in answers:
        assert answer.finish_reason == "stop", answer  # xgrammar closed the object, not max_tokens
        jsonschema.validate(json.loads(answer.content), REVIEW_SCHEMA)
        assert answer.usage.prompt_tokens > 20 and answer.usage.completion_tokens > 5
        assert not answer.reasoning


async def test_concurrent_seeded_long_prompts_all_answer(qwen: VLLMClient) -> None:
    """A council's shape: several seeded requests with different prompts of ~1500 tokens, at once (more than one
    engine step's token budget). vLLM 0.32's CPU engine died on this when it split prefills into chunks (see
    `vllm_command`): every answer must come back and the server stay up."""

    def prompt(agent: int) -> tuple[ChatMessage, ...]:  # different from the first token: no shared prefix cache
        return (ChatMessage("system", f"agent {agent}: " + " ".join(f"rule{k}" for k in range(450))), *MESSAGES)

    for round_ in range(2):
        answers = await asyncio.gather(
            *(qwen.complete(request(f"long-{round_}-{i}", seed=i, messages=prompt(4 * round_ + i))) for i in range(4))
        )
        assert all(a.usage.prompt_tokens > 1200 and a.content for a in answers)
    assert await qwen.health()


async def test_thinking_off_gives_content_and_on_gives_reasoning(qwen: VLLMClient) -> None:
    off = await qwen.complete(request("think-off", enable_thinking=False))
    assert off.content.strip(), off
    assert not off.reasoning
    on = await qwen.complete(request("think-on", enable_thinking=True))
    # A random-weight model never closes </think>: everything it says is reasoning, content stays empty.
    assert on.reasoning and on.reasoning.strip(), on
    assert not on.content.strip()


async def test_streaming_deltas_reassemble_to_the_final_text_and_usage_is_recorded(qwen: VLLMClient) -> None:
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    streamed = await qwen.complete(request("stream", max_tokens=40, temperature=0.0), on_delta=on_delta)
    assert len(deltas) > 5
    assert "".join(deltas) == streamed.content
    assert streamed.usage.prompt_tokens > 20
    assert 0 < streamed.usage.completion_tokens <= 40
    assert streamed.finish_reason in ("stop", "length")
    plain = await qwen.complete(request("no-stream", max_tokens=40, temperature=0.0))
    assert plain.content == streamed.content  # same seed, greedy: streaming changes nothing but delivery
    assert plain.usage == streamed.usage


async def test_streamed_json_schema_answer_is_valid(qwen: VLLMClient) -> None:
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    answer = await qwen.complete(request("stream-schema", max_tokens=200, json_schema=REVIEW_SCHEMA), on_delta)
    assert "".join(deltas) == answer.content
    jsonschema.validate(json.loads(answer.content), REVIEW_SCHEMA)


async def test_throughput_is_measured(vllm: VLLMServer, qwen: VLLMClient, artifacts: Path) -> None:
    tokens, seconds, decode_rate = await _timed_stream(qwen, request("throughput", max_tokens=128, temperature=0.0))
    _record(artifacts, "qwen3-tiny", vllm, tokens, seconds, decode_rate)
    assert tokens > 32 and decode_rate > 1


# --- SmolLM2 (real weights, the `smollm2` fixture): answers, then is stopped mid-answer ----------------------------


async def test_smollm2_answers_sensibly(smollm2: VLLMServer, artifacts: Path) -> None:
    assert smollm2.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    async with VLLMClient(smollm2.url, smollm2.model, timeout=60, max_retries=1) as client:
        question = LLMRequest(
            messages=(ChatMessage("user", "What is the capital of France? Answer in one sentence."),),
            request_id="france",
            temperature=0.0,
            max_tokens=64,
        )
        answer = await client.complete(question)
    assert "paris" in answer.content.lower(), answer
    assert answer.usage.completion_tokens > 0
    async with VLLMClient(smollm2.url, smollm2.model, timeout=120, max_retries=1) as client:
        story = LLMRequest(
            messages=(ChatMessage("user", "Write three sentences about Paris."),),
            request_id="paris",
            temperature=0.0,
            max_tokens=48,
        )
        tokens, seconds, decode_rate = await _timed_stream(client, story)
    _record(artifacts, "smollm2-135m", smollm2, tokens, seconds, decode_rate)


async def test_server_stopped_mid_answer_raises_unavailable(smollm2: VLLMServer) -> None:
    """Runs last in this module: it kills the module's server (by PID) while an answer streams."""
    first_delta = asyncio.Event()

    async def on_delta(text: str) -> None:
        first_delta.set()

    long_answer = LLMRequest(
        messages=(ChatMessage("user", "Write a long story about a lighthouse keeper, at least 500 words."),),
        request_id="stopped",
        temperature=0.0,
        max_tokens=1500,
    )
    async with VLLMClient(smollm2.url, smollm2.model, timeout=30, max_retries=2) as client:
        call = asyncio.create_task(client.complete(long_answer, on_delta=on_delta))
        await asyncio.wait_for(first_delta.wait(), 60)
        t0 = time.monotonic()
        # Killed at once (no grace): a server given time to stop may finish the answer first (one-process vLLM
        # drains its requests on SIGTERM, and SmolLM2 writes ~100 tokens/s), which is not the failure under test.
        await asyncio.to_thread(smollm2.stop, 0.0)
        assert not smollm2.alive()
        with pytest.raises(Unavailable, match="broke after"):
            await asyncio.wait_for(call, 30)
        assert time.monotonic() - t0 < 30
        # and a new call, with the server gone, is UNAVAILABLE after its retries (not a hang, not an LLMError)
        with pytest.raises(Unavailable, match=r"unavailable after 3 attempts: connection failed") as info:
            await client.complete(LLMRequest(messages=MESSAGES, request_id="after-stop", max_tokens=8))
    assert info.value.code == "UNAVAILABLE"


async def _timed_stream(client: VLLMClient, req: LLMRequest) -> tuple[int, float, float]:
    """(completion tokens, seconds end to end, decode tokens/s between the first and the last delta)."""
    stamps: list[float] = []

    async def on_delta(text: str) -> None:
        stamps.append(time.perf_counter())

    answer = await client.complete(req, on_delta=on_delta)
    tokens = answer.usage.completion_tokens
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return tokens, answer.latency_ms / 1000, decode


def _record(artifacts: Path, model: str, server: VLLMServer, tokens: int, seconds: float, decode: float) -> None:
    """Measured numbers into test-artifacts/vllm-measurements.json (the machine may be busy: see loadavg)."""
    path = artifacts / "vllm-measurements.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[model] = {
        "server_start_s": round(server.started_in or 0.0, 1),
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "end_to_end_tokens_per_s": round(tokens / seconds, 1),
        "decode_tokens_per_s": round(decode, 1),
        "loadavg_1m": round(os.getloadavg()[0], 1),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{model}: {data[model]}")
