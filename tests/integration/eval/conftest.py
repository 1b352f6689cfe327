"""`fleet eval` against real components: an orchestrator served in-process over real gRPC (real NATS, Valkey, the
session's sandbox service with bwrap) and the loopback OpenAI-compatible server, with a small HumanEval-format
dataset whose hidden tests carry a marker that must never reach a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.orchestrator.main import start
from services.orchestrator.settings import OrchestratorSettings

MARKER = "hidden-marker-5b1e93"  # in every hidden test; the LLM server fails any call whose prompt holds it


def _problem(name: str, doc: str, example: str, canonical: str, checks: str, preamble: str = "") -> dict[str, str]:
    return {
        "task_id": f"Tiny/{name}",
        "prompt": f'{preamble}def {name}(x: int) -> int:\n    """{doc}\n    >>> {example}\n    """\n',
        "entry_point": name,
        "canonical_solution": canonical,
        "test": f"# {MARKER}\n\n\ndef check(candidate):\n{checks}",
    }


PROBLEMS = [
    _problem(
        "tiny_double",
        "Return x doubled.",
        "tiny_double(2)\n    4",
        "    return 2 * x\n",
        "    assert candidate(7) == 14\n    assert candidate(-1) == -2\n",
        preamble="import math\n\n\n",
    ),
    _problem(
        "tiny_spin",
        "Return x plus one.",
        "tiny_spin(1)\n    2",
        "    return x + 1\n",
        "    assert candidate(9) == 10\n",
    ),
    _problem(
        "tiny_crash",
        "Return x minus one.",
        "tiny_crash(1)\n    0",
        "    return x - 1\n",
        "    assert candidate(9) == 8\n",
    ),
]
# What every agent answers (GENERATE and REVISE), per problem: right (using the prompt's import without repeating
# it: solution.py starts with the preamble); right on the visible example but looping forever on the hidden one
# (TIMEOUT); right on the visible example but killing its own process on the hidden one.
ANSWERS = {
    "def tiny_double(": "```python\ndef tiny_double(x):\n    return math.prod([x, 2])\n```\n",
    "def tiny_spin(": "```python\ndef tiny_spin(x):\n    while x > 5:\n        pass\n    return x + 1\n```\n",
    "def tiny_crash(": (
        "```python\nimport os\nimport signal\n\n\ndef tiny_crash(x):\n    if x > 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n    return x - 1\n```\n"
    ),
}


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


@pytest.fixture
async def scripted(llm_server):
    """The loopback LLM answering ANSWERS, and failing (HTTP 400) any call that holds the hidden-test marker."""
    await llm_server.acontrol(reset=True, answer_when_contains=ANSWERS, fail_when_contains=MARKER, fail_status=400)
    yield llm_server
    await llm_server.acontrol(reset=True)


@pytest.fixture
async def eval_orchestrator(settings, bus, sandbox_address, llm_server):
    """An orchestrator (in-process executor) whose CHECK runs code in the session's sandbox; DEV and ARCHITECT
    councils created. Yields its address."""
    orch_settings = OrchestratorSettings(
        **settings.model_dump(),
        grpc_port=0,
        vllm_url=llm_server.url,
        vllm_model="test-model",
        vllm_max_retries=1,
        vllm_timeout_seconds=10,
        sandbox_address=sandbox_address,
        sandbox_timeout_seconds=3,
    )
    running = await start(orch_settings, host="127.0.0.1")
    address = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for role in ("DEV", "ARCHITECT"):
            await stub.CreateCouncil(pb.CreateCouncilRequest(role=role, num_agents=3))
    yield address
    await running.stop(0.5)
