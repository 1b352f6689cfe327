"""The prompt layout serves vLLM's prefix cache (bench/bench_prefix_cache.py measures it on the real server): the
calls of one deliberation go from shared to specific, so each shares as long a prefix as it can with the calls
before it. The KV cache matches token prefixes: text compared here as the chat template lays it out, message
after message."""

from __future__ import annotations

from collections import defaultdict

from scripted_llm import ScriptedSandbox, parts

from services.deliberation.engine import DeliberationEngine, InProcessExecutor
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import LLMRequest
from services.deliberation.prompts import JSON_ONLY, _rubric, task_block


def rendered(request: LLMRequest) -> str:
    return "".join(f"<|{m.role}|>{m.content}<|end|>" for m in request.messages)


def shared(requests: list[LLMRequest]) -> str:
    """The longest text every request starts with."""
    texts = [rendered(r) for r in requests]
    first, n = min(texts), 0
    last = max(texts)
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


async def test_calls_share_the_task_the_rubric_and_their_phases_instructions_before_anything_specific(
    llm, task, council, architect
) -> None:
    engine = DeliberationEngine(InProcessExecutor(llm), checker=ProposalChecker(ScriptedSandbox()))
    await engine.run(task, council, architect, "d1")
    by_phase: dict[str, list[LLMRequest]] = defaultdict(list)
    for r in llm.requests:
        by_phase[r.schema_name].append(r)
    agent_ids = [a.agent_id for a in (*council.agents, architect)]
    rubric = f"## Rubric\n{_rubric(task.constraints.rubric)}"

    # every call: one system message, byte for byte, then the task
    assert len({r.messages[0].content for r in llm.requests}) == 1
    everything = shared(llm.requests)
    assert everything.endswith(f"<|user|>{task_block(task)}\n\n")

    # the phases that read the council's work share the rubric too, ahead of their material
    readers = [*by_phase["critique"], *by_phase["scores"], *by_phase["selection"]]
    assert len(readers) == 7
    assert shared(readers).endswith(f"{task_block(task)}\n\n{rubric}\n\n")

    # ... and within a phase its instructions as well: nothing of one call (its agent, the proposals) before them
    for schema, instruction in (("critique", "verdict: 'accept'"), ("scores", "with an integer from 1")):
        calls = by_phase[schema]
        assert len(calls) == 3
        prefix = shared(calls)
        assert rubric in prefix and instruction in prefix and prefix.count(JSON_ONLY) == 1, schema
        assert not any(f"You are {a}" in prefix for a in agent_ids), schema
        for r in calls:  # then the material (the proposals), the agent last
            user = r.messages[-1].content
            assert user.index(instruction) < user.index("Proposal by") < user.index(f"You are {parts(r)['agent']}")

    # GENERATE: the agents differ only at the end; REVISE replays its author's GENERATE turn byte for byte
    generate = {parts(r)["agent"]: r for r in by_phase["proposal"]}
    assert all(shared(list(generate.values())) in rendered(r) for r in generate.values())
    for r in by_phase["revision"]:
        first = generate[parts(r)["agent"]]
        assert rendered(r).startswith(rendered(first))
