"""Councils, task validation, ranking, the bounded schemas and their parsers, and the executors."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest
from scripted_llm import ScriptedLLM

from services.common import events as ev
from services.common.errors import InvalidArgument, Unavailable
from services.deliberation import prompts
from services.deliberation.domain import (
    CheckResult,
    Criterion,
    Phase,
    Proposal,
    Role,
    Task,
    TaskConstraints,
    Vote,
    default_rubric,
    make_council,
    rank_proposals,
)
from services.deliberation.engine import AgentCall, CallOutcome, InProcessExecutor, ObservedExecutor, call_id
from services.deliberation.llm import ChatMessage, LLMError, LLMRequest

# --- councils and tasks ----------------------------------------------------------------------------------------


def test_councils_have_stable_ids_and_agents_that_differ_on_purpose():
    council = make_council(Role.DEV)
    assert council.council_id == "council-dev" and council.role == Role.DEV
    assert [a.agent_id for a in council.agents] == ["agent-dev-001", "agent-dev-002", "agent-dev-003"]
    assert [a.temperature for a in council.agents] == [0.2, 0.4, 0.6]
    assert "Correctness" in council.agents[0].persona and "Simplicity" in council.agents[1].persona
    assert "Performance" in council.agents[2].persona
    assert make_council(Role.DEV) == council  # deterministic
    big = make_council("devops", 10)
    assert len({a.persona for a in big.agents}) == 10 and big.agents[9].agent_id == "agent-devops-010"
    seeds = [a.seed for r in Role for a in make_council(r, 10).agents]
    assert len(set(seeds)) == len(seeds)
    assert make_council(Role.QA, 3).agents[0].persona != council.agents[0].persona


@pytest.mark.parametrize("n", [0, 11, -1, True])
def test_council_size_is_bounded(n):
    with pytest.raises(InvalidArgument) as info:
        make_council(Role.DEV, n)
    assert info.value.field == "num_agents"


def test_roles_parse_case_insensitively_and_name_the_valid_ones():
    assert Role.parse("qa") is Role.QA and [str(r) for r in Role] == ["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"]
    with pytest.raises(InvalidArgument) as info:
        Role.parse("CEO")
    assert info.value.field == "role" and "DEV, QA, ARCHITECT, DEVOPS, DATA" in info.value.message
    assert Role is ev.Role  # one model per concept: the shared kernel's


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout_seconds": 0}, "constraints.timeout_seconds"),
        ({"timeout_seconds": float("nan")}, "constraints.timeout_seconds"),
        ({"token_budget": -1}, "constraints.token_budget"),
        ({"max_tokens": 0}, "constraints.max_tokens"),
        ({"rounds": 6}, "constraints.rounds"),
        ({"top_k": 0}, "constraints.top_k"),
        ({"rubric": (Criterion("a"), Criterion("A"))}, "constraints.rubric"),
        ({"requirements": tuple(f"r{i}" for i in range(21))}, "constraints.requirements"),
    ],
)
def test_constraints_are_validated_naming_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        TaskConstraints(**kwargs)
    assert info.value.field == field


def test_tasks_are_validated_and_get_the_roles_default_rubric():
    for bad, field in (({"task_id": " "}, "task_id"), ({"description": ""}, "description")):
        with pytest.raises(InvalidArgument) as info:
            Task(**{"task_id": "T", "description": "d", "role": Role.QA, **bad})
        assert info.value.field == field
    task = Task("T", "Do it", "qa", TaskConstraints(requirements=("tests ", " ")))
    assert task.role is Role.QA and task.constraints.rubric == default_rubric(Role.QA)
    assert task.constraints.requirements == ("tests",)
    created = Task.create("T2", "Deploy it", Role.DEVOPS, requirements=("probes",), story_id="S", rounds=2)
    assert created.constraints.rounds == 2 and created.constraints.rubric == default_rubric(Role.DEVOPS)
    assert TaskConstraints.for_role(Role.DATA).token_budget == 200_000


def test_ranking_mixes_peer_and_check_scores():
    def proposal(author: str) -> Proposal:
        return Proposal(f"p-{author}", author, Role.DEV, "content")

    ok = CheckResult("x", True)
    failed = CheckResult("y", False, findings=())
    idle = CheckResult("z", True, applicable=False)
    proposals = [proposal("a"), proposal("b"), proposal("c")]
    checks = {"p-a": (ok, failed, idle), "p-b": (ok, ok), "p-c": ()}
    votes = [
        Vote("b", "p-a", 1, {"c1": 10, "c2": 8}),
        Vote("c", "p-a", 2, {"c1": 8, "c2": 8}),
        Vote("a", "p-b", 1, {"c1": 6, "c2": 6}),
    ]
    ranked = rank_proposals(proposals, checks, votes)
    by = {r.proposal.author_id: r for r in ranked}
    assert by["a"].peer_score == 8.5 and by["a"].check_score == 5.0
    assert by["a"].score == pytest.approx(0.7 * 8.5 + 0.3 * 5.0)
    assert by["b"].score == pytest.approx(0.7 * 6 + 0.3 * 10)
    # c: no votes while others got some -> the mean peer score of the others; no checks -> peer alone
    assert by["c"].peer_score == pytest.approx((8.5 + 6) / 2) and by["c"].score == by["c"].peer_score
    assert [r.rank for r in ranked] == [1, 2, 3]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    only_checks = rank_proposals(proposals, checks, [])
    assert {r.proposal.author_id: r.score for r in only_checks} == {"a": 5.0, "b": 10.0, "c": 0.0}


# --- schemas and parsers ------------------------------------------------------------------------------------------

ALLOWED = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "enum", "minLength", "maxLength"},
    "integer": {"type", "minimum", "maximum"},
    "boolean": {"type"},
}


def assert_bounded(schema: dict, path: str = "$") -> None:
    kind = schema["type"]
    assert set(schema) <= ALLOWED[kind], f"{path}: {set(schema) - ALLOWED[kind]}"
    if kind == "object":
        assert schema["additionalProperties"] is False and set(schema["required"]) == set(schema["properties"])
        for name, sub in schema["properties"].items():
            assert_bounded(sub, f"{path}.{name}")
    elif kind == "array":
        assert "maxItems" in schema
        assert_bounded(schema["items"], f"{path}[]")
    elif kind == "string":
        assert "enum" in schema or "maxLength" in schema, path
    elif kind == "integer":
        assert {"minimum", "maximum"} <= set(schema), path


def test_every_schema_is_bounded_and_in_the_supported_subset():
    keys = prompts.criterion_keys(default_rubric(Role.DEV))
    for schema in (
        prompts.critique_schema(),
        prompts.score_schema(["A", "B", "C"], keys),
        prompts.selection_schema(["A", "B"]),
    ):
        assert_bounded(schema)
        json.dumps(schema)
    scores = prompts.score_schema(["A", "B"], keys)
    assert list(scores["properties"]) == ["A", "B"]
    assert scores["properties"]["A"]["properties"]["tests"] == {"type": "integer", "minimum": 1, "maximum": 10}


def test_criterion_keys_are_safe_and_unique():
    rubric = [Criterion("Correctness & Tests"), Criterion("correctness-tests"), Criterion("!!!")]
    assert prompts.criterion_keys(rubric) == ["correctness_tests", "correctness_tests_2", "criterion_3"]


def test_answers_are_parsed_tolerantly():
    fenced = 'Sure!\n```json\n{"verdict": "Revise", "summary": "  Too   long. ", "issues": ["a", "", 3]}\n```'
    critique = prompts.parse_critique(fenced)
    assert critique == prompts.CritiqueAnswer("revise", "Too long.", ("a",))
    assert prompts.parse_json('prefix {"a": {"b": 1}} suffix {"c": 2}') == {"a": {"b": 1}}
    long = prompts.parse_critique(json.dumps({"verdict": "accept", "summary": "x" * 999, "issues": []}))
    assert len(long.summary) == prompts.SUMMARY_MAX
    why = "B parses every date in the tests and rejects garbage."
    selection = prompts.parse_selection(json.dumps({"winner": "candidate b", "rationale": why}), ["A", "B"])
    assert selection == prompts.SelectionAnswer("B", why)


@pytest.mark.parametrize("rationale", ["C", "why", "B is best.", "B:clearly-superior,obviously!!!!!"])
def test_a_selection_without_a_real_reason_is_unusable(rationale):
    """A one-letter "C" (seen from a 135M model) is no rationale: bounded from below too."""
    with pytest.raises(prompts.AnswerError, match="must give a reason"):
        prompts.parse_selection(json.dumps({"winner": "B", "rationale": rationale}), ["A", "B"])
    schema = prompts.selection_schema(["A", "B"])["properties"]["rationale"]
    assert schema["minLength"] == prompts.RATIONALE_MIN and schema["maxLength"] == prompts.RATIONALE_MAX


@pytest.mark.parametrize(
    "text",
    ["", "no json here", "[1, 2]", '{"verdict": "maybe", "summary": "s"}', '{"verdict": "accept", "summary": ""}'],
)
def test_bad_critiques_are_rejected(text):
    with pytest.raises(prompts.AnswerError):
        prompts.parse_critique(text)


def test_scores_are_checked_against_their_bounds():
    keys = ["correctness", "tests"]
    good = {"correctness": 7, "tests": 8.0, "reason": "ok"}
    answers, dropped = prompts.parse_scores(
        json.dumps({"A": good, "B": {"correctness": 0, "tests": 5}}), ["A", "B"], keys
    )
    assert [(a.label, a.scores) for a in answers] == [("A", {"correctness": 7, "tests": 8})]
    assert dropped == [("B", "B.correctness must be 1..10, got 0")]  # returned, so the engine can record it
    with pytest.raises(prompts.AnswerError, match=r"must be 1\.\.10"):
        prompts.parse_scores(json.dumps({"A": {"correctness": 11, "tests": 5}}), ["A"], keys)
    with pytest.raises(prompts.AnswerError, match="integer"):
        prompts.parse_scores(json.dumps({"A": {"correctness": True, "tests": 5}}), ["A"], keys)
    wrapped, _ = prompts.parse_scores(json.dumps({"scores": {"A": good}}), ["A"], keys)
    assert wrapped[0].scores == {"correctness": 7, "tests": 8}


# --- executors ----------------------------------------------------------------------------------------------------


def make_call(agent: str, phase: Phase = Phase.GENERATE) -> AgentCall:
    rid = call_id("d1", phase, 0, agent)
    request = LLMRequest(messages=(ChatMessage("user", "hi"),), request_id=rid, schema_name="proposal")
    return AgentCall(rid, "d1", agent, phase, request)


def test_calls_and_outcomes_are_picklable_and_ids_deterministic():
    call = make_call("agent-dev-001")
    assert call.request_id == "d1:GENERATE:0:agent-dev-001"
    assert call_id("d1", Phase.CRITIQUE, 2, "a", "b") == "d1:CRITIQUE:2:a:b"
    outcome = CallOutcome(call, None, "LLM unavailable: down", "unavailable")
    assert pickle.loads(pickle.dumps(outcome)) == outcome


async def test_the_in_process_executor_keeps_order_and_classifies_failures():
    errors = {
        "agent-unavailable": Unavailable("vLLM at http://x unavailable"),
        "agent-llm": LLMError("bad answer"),
        "agent-bug": KeyError("oops"),
    }
    llm = ScriptedLLM(
        fail=lambda r: errors.get(r.request_id.split(":")[3]),
        delay=lambda r: 5 if "slow" in r.request_id else 0,
    )
    agents = ["agent-ok", "agent-unavailable", "agent-llm", "agent-bug", "agent-slow"]
    outcomes = await InProcessExecutor(llm, per_call_timeout=0.1).run([make_call(a) for a in agents])
    assert [o.call.agent_id for o in outcomes] == agents
    assert [o.error_kind for o in outcomes] == [None, "unavailable", "llm", "error", "timeout"]
    assert (
        outcomes[0].ok and outcomes[0].response is not None and "Proposal by agent-ok" in outcomes[0].response.content
    )
    assert outcomes[1].error == "LLM unavailable: vLLM at http://x unavailable"
    assert outcomes[2].error == "LLM error: bad answer" and outcomes[4].error == "timed out after 0.1s"
    assert await InProcessExecutor(llm).run([]) == []


async def test_cancelling_the_caller_cancels_the_calls():
    llm = ScriptedLLM(delay=30)
    run = asyncio.create_task(InProcessExecutor(llm).run([make_call("a"), make_call("b")]))
    await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert llm.active == 0


async def test_the_observed_executor_publishes_every_call():
    published: list[ev.Payload] = []

    async def publish(payload: ev.Payload) -> None:
        if isinstance(payload, ev.AgentResponseFailed):
            raise ConnectionError("NATS down")  # logged, never passed on
        published.append(payload)

    llm = ScriptedLLM(fail=lambda r: LLMError("no") if "agent-b" in r.request_id else None)
    executor = ObservedExecutor(InProcessExecutor(llm), publish, executor_name="in-process")
    outcomes = await executor.run([make_call("agent-a"), make_call("agent-b")])
    assert [o.ok for o in outcomes] == [True, False]
    dispatched = [p for p in published if isinstance(p, ev.AgentRequestDispatched)]
    assert [(p.agent_id, p.phase, p.executor) for p in dispatched] == [
        ("agent-a", "GENERATE", "in-process"),
        ("agent-b", "GENERATE", "in-process"),
    ]
    (completed,) = [p for p in published if isinstance(p, ev.AgentResponseCompleted)]
    assert completed.request_id == "d1:GENERATE:0:agent-a" and completed.prompt_tokens == 20
