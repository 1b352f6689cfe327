"""Pure pieces of the ray-executor: the token batching. (The result's proto mapping is tested once, in
tests/unit/deliberation/test_proto.py.)"""

from __future__ import annotations

import asyncio

from services.common import events as ev
from services.ray_executor.executor import TokenStream


async def test_token_stream_batches_deltas_in_order():
    sent: list[ev.TokenChunk] = []

    async def publish(chunk: ev.Payload) -> None:
        await asyncio.sleep(0.001)
        sent.append(chunk)  # type: ignore[arg-type]

    stream = TokenStream(publish, "d-1", "agent-dev-001", "GENERATE", interval=0.05)
    stream.start()
    words = [f" word{i}" for i in range(40)]
    for w in words:
        await stream.add(w)
        await asyncio.sleep(0.005)
    await stream.end()
    assert [c.seq for c in sent] == list(range(len(sent)))
    assert sent[0].kind == "start" and sent[-1].kind == "end"
    tokens = sent[1:-1]
    assert {c.kind for c in tokens} == {"tokens"} and 2 <= len(tokens) < len(words)
    assert "".join(c.text for c in tokens) == "".join(words)


async def test_token_stream_stops_publishing_after_a_failure_without_raising():
    calls = 0

    async def publish(chunk: ev.Payload) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("NATS down")

    stream = TokenStream(publish, "d-1", "agent-dev-001", "GENERATE", interval=0.01)
    stream.start()
    await stream.add("hello")
    await asyncio.sleep(0.05)
    await stream.end()
    assert calls == 1 and stream.broken


def test_executor_ray_without_an_address_is_a_configuration_error():
    import pytest

    from services.common.settings import SettingsError
    from services.orchestrator.adapters.ray_runner import RayExecutorRunner

    with pytest.raises(SettingsError, match="RAY_EXECUTOR_ADDRESS"):
        RayExecutorRunner("")
