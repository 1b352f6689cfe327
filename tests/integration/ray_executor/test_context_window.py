"""The ray-executor fits its prompts to the model's window too: the engine runs in the service, the agents' calls on
the Ray workers. VLLM_CONTEXT_WINDOW (the loopback server reports no max_model_len) with long scripted proposals."""

from __future__ import annotations

import re

import grpc
import pytest

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from fleet.ray_executor.v1 import ray_executor_pb2_grpc
from services.deliberation.llm import CharEstimate, ChatMessage, ContextWindow

from .test_ray_executor import COMPLETED, execute_request, wait_end

pytestmark = [pytest.mark.integration, pytest.mark.ray]

WINDOW = 1400
MARKER = re.compile(r"\[\.\.\. [\d,]+ tokens trimmed to fit the model's 1,400-token window \.\.\.\]")


def long_proposal(agent_id: str) -> str:
    """~730 tokens by the estimate (characters / 3 + 10%) in under 300 words: three are more than the window."""
    cases = "\n".join(
        f'    assert slugify("Title {i}: a longer title #{i}!") == "title-{i}-a-longer-title-{i}"' for i in range(25)
    )
    return f"Proposal by {agent_id}\n```python\ndef test_slugify():\n{cases}\n```\n"


async def test_the_window_setting_reaches_the_engine_on_the_ray_path(rx_settings, bus, ray_driver, llm) -> None:
    from services.ray_executor.main import start

    running = await start(rx_settings.model_copy(update={"vllm_context_window": WINDOW}), host="127.0.0.1")
    try:
        agents = [f"agent-dev-00{i}" for i in (1, 2, 3)]
        await llm.acontrol(answer_when_contains={a: long_proposal(a) for a in agents})
        request = execute_request(
            "delib-ray-window",
            constraints=dpb.Constraints(requirements=["tests"], timeout_seconds=60, max_tokens=300),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            rx = ray_executor_pb2_grpc.RayExecutorServiceStub(channel)
            reply = await wait_end(rx, (await rx.ExecuteDeliberation(request)).deliberation_id)
        sent = [r["body"] for r in await llm.arequests() if r["request_id"].startswith("delib-ray-window:")]
    finally:
        await running.stop(0.5)

    assert reply.status == COMPLETED, reply.error_message
    assert not reply.result.failures
    assert reply.result.selection.method == dpb.SELECTION_METHOD_ARCHITECT
    window = ContextWindow(WINDOW, CharEstimate(), "setting")  # "test-model" is no Qwen: the estimate
    assert len(sent) == 13  # 3 proposals, 3 critiques, 3 revisions, 3 scores, 1 selection
    for body in sent:
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in body["messages"])
        assert window.prompt_tokens(messages) + body["max_tokens"] <= WINDOW
    select = next(b for b in sent if (b.get("response_format") or {}).get("json_schema", {}).get("name") == "selection")
    assert len(MARKER.findall(select["messages"][-1]["content"])) == 3
