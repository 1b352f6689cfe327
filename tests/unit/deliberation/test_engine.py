"""The deliberation engine with a scripted LLM: phases, peer review, voting, selection, bounds and failures."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import replace

import httpx
import pytest
from scripted_llm import TASK_TESTS, ScriptedLLM, ScriptedSandbox, candidates_shown, default_scores, make_task, parts

from services.common.errors import Unavailable
from services.common.llm import VLLMClient
from services.deliberation.domain import (
    DeliberationResult,
    DeliberationStatus,
    Phase,
    ProgressEvent,
    Role,
    make_council,
)
from services.deliberation.engine import DeliberationEngine, InProcessExecutor, projected_tokens
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import LLMError, TokenUsage

ALL_PHASES = [Phase.GENERATE, Phase.CRITIQUE, Phase.REVISE, Phase.CHECK, Phase.SCORE, Phase.SELECT]


async def deliberate(llm, task, council, architect=None, sandbox=None, **engine_kw) -> DeliberationResult:
    checker = ProposalChecker(sandbox if sandbox is not None else ScriptedSandbox())
    engine = DeliberationEngine(InProcessExecutor(llm), checker=checker, **engine_kw)
    return await engine.run(task, council, architect, "d1")


def authors(result: DeliberationResult) -> list[str]:
    return [r.proposal.author_id for r in result.results]


async def test_a_full_deliberation_completes_with_everything_recorded(llm, task, council, architect):
    events: list[ProgressEvent] = []

    async def on_progress(e: ProgressEvent) -> None:
        events.append(e)

    sandbox = ScriptedSandbox()
    result = await deliberate(llm, make_task(tests=TASK_TESTS), council, architect, sandbox, on_progress=on_progress)

    assert result.status == DeliberationStatus.COMPLETED and result.error_message == ""
    assert result.verified and "tests.task (the task's tests: 2/2 passed" in result.verified_reason
    assert not result.notes
    assert [r.rank for r in result.results] == [1, 2, 3]
    assert sorted(authors(result)) == [a.agent_id for a in council.agents]
    assert result.selection is not None and result.selection.method == "ARCHITECT"
    assert result.selection.selected_by == architect.agent_id and result.selection.rationale
    assert result.winner is not None and result.winner_id == result.winner.proposal.author_id
    assert result.context_version == "v7" and result.story_id == "S-1" and result.council_id == "council-dev"
    assert list(result.phase_durations_ms) == ALL_PHASES
    assert not result.failures
    for r in result.results:
        assert r.proposal.author_role == Role.DEV and r.proposal.content == r.proposal.revisions[-1].content
        assert {c.name for c in r.checks} >= {"deliverable", "python.syntax", "python.lint", "tests.task"}
        assert r.check_score == 10.0 and r.peer_score == 7.0 and r.score == pytest.approx(0.7 * 7 + 0.3 * 10)
        # every revision was checked: the original before its critic saw it, the revision before the ranking
        assert [len(v.checks) > 0 for v in r.proposal.revisions] == [True, True] and r.checks == r.proposal.revisions[
            -1
        ].checks
    # each revision ran once in the sandbox: solution.py and the task's tests
    assert len(sandbox.executions) == 6
    assert all(set(e.files) == {"solution.py"} and set(e.test_files) == {"test_task.py"} for e in sandbox.executions)
    # tokens: 3 generate + 3 critique + 3 revise + 3 score + 1 select calls of 30 tokens
    assert result.total_tokens == 13 * 30
    assert result.tokens_by_phase == {
        Phase.GENERATE: 90,
        Phase.CRITIQUE: 90,
        Phase.REVISE: 90,
        Phase.SCORE: 90,
        Phase.SELECT: 30,
    }
    assert result.tokens_by_agent[architect.agent_id] == 30
    assert all(v == 120 for k, v in result.tokens_by_agent.items() if k != architect.agent_id)
    assert len({(u.agent_id, u.phase) for u in result.usage}) == len(result.usage) == 13

    started = [e.phase for e in events if e.kind == "phase_started"]
    completed = [e.phase for e in events if e.kind == "phase_completed"]
    grounded = [Phase.GENERATE, Phase.CHECK, Phase.CRITIQUE, Phase.REVISE]  # checked before its critic reads it
    assert started[:4] == completed[:4] == grounded and started[-1] == completed[-1] == Phase.SELECT
    assert (
        set(started[4:6]) == set(completed[4:6]) == {Phase.CHECK, Phase.SCORE}
    )  # the last checks run while peers score
    assert events[0].kind == "deliberation_started" and events[-1].kind == "deliberation_completed"
    assert sum(e.kind == "agent_completed" and e.phase == Phase.GENERATE for e in events) == 3
    assert all(e.deliberation_id == "d1" and e.task_id == "T-1" and e.role == Role.DEV for e in events)


async def test_requests_share_the_prefix_and_carry_each_agents_sampling(llm, task, council, architect):
    await deliberate(llm, task, council, architect)
    systems = {r.messages[0].content for r in llm.requests}
    assert len(systems) == 1  # the whole council and the architect share the system prompt
    (system,) = systems
    assert "pydantic" in system and "version v7" in system  # the context
    # the task opens every user message: a small model ignores a task given in the system message
    assert all(
        r.messages[1].content.startswith("Task T-1: Write a Python function that parses ISO dates")
        for r in llm.requests
    )
    assert all("Requirements:\n- tests" in r.messages[1].content for r in llm.requests)
    assert all("correctness" in r.messages[-1].content for r in llm.requests if r.schema_name in ("critique", "scores"))
    assert all(r.messages[0].role == "system" and r.messages[-1].role == "user" for r in llm.requests)
    assert not any(r.enable_thinking for r in llm.requests)
    assert all(r.max_tokens >= task.constraints.max_tokens for r in llm.requests)
    for r in llm.requests:
        assert (r.json_schema is None) == (r.schema_name in ("proposal", "revision"))
    specs = {a.agent_id: a for a in (*council.agents, architect)}
    for r in llm.requests:
        agent = specs[parts(r)["agent"]]
        assert (r.temperature, r.seed) == (agent.temperature, agent.seed)
        assert agent.persona in "".join(m.content for m in r.messages[1:])  # agent-specific: after the prefix
    ids = [r.request_id for r in llm.requests]
    assert len(ids) == len(set(ids))
    assert "d1:GENERATE:0:agent-dev-001" in ids and "d1:CRITIQUE:1:agent-dev-002:agent-dev-001" in ids


async def test_rounds_keep_every_revision_and_critics_are_never_authors(llm, council, architect):
    result = await deliberate(llm, make_task(rounds=2), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    for r in result.results:
        revisions = r.proposal.revisions
        assert [v.number for v in revisions] == [0, 1, 2]
        assert revisions[0].reason == "original proposal" and "round 2" in revisions[2].reason
        assert len({v.content for v in revisions}) == 3 and r.proposal.content == revisions[2].content
    assert len(result.critiques) == 6
    assert all(c.critic_id != c.author_id for c in result.critiques)
    critics = defaultdict(set)
    for c in result.critiques:
        critics[c.author_id].add(c.critic_id)
    assert all(len(v) == 2 for v in critics.values())  # a different critic each round
    assert [c.round for c in result.critiques] == [1, 1, 1, 2, 2, 2]
    # the author revises with the critique it received, replaying its own generation turn
    revise = llm.by_schema("revision")[0]
    assert [m.role for m in revise.messages] == ["system", "user", "assistant", "user"]
    assert "Add a docstring." in revise.messages[-1].content


async def test_no_rounds_means_no_review(llm, council, architect):
    result = await deliberate(llm, make_task(rounds=0), council, architect)
    assert result.status == DeliberationStatus.COMPLETED and not result.critiques
    assert Phase.CRITIQUE not in result.phase_durations_ms
    assert all(len(r.proposal.revisions) == 1 for r in result.results)


async def test_a_council_of_one_skips_review_and_votes_and_says_so(llm, architect):
    events: list[ProgressEvent] = []

    async def on_progress(e: ProgressEvent) -> None:
        events.append(e)

    result = await deliberate(llm, make_task(), make_council(Role.DEV, 1), architect, on_progress=on_progress)
    assert result.status == DeliberationStatus.COMPLETED
    assert len(result.results) == 1 and not result.critiques and not result.results[0].votes
    skipped = {e.phase: e.detail for e in events if e.kind == "phase_completed"}
    assert "skipped" in skipped[Phase.CRITIQUE] and "skipped" in skipped[Phase.SCORE]
    assert result.selection is not None and result.selection.method == "FALLBACK"
    assert "only one proposal" in result.selection.rationale
    assert result.results[0].score == result.results[0].check_score  # nobody voted: checks alone
    assert not llm.by_schema("selection") and not llm.by_schema("scores")


async def test_nobody_votes_for_their_own_proposal(llm, task, council, architect):
    result = await deliberate(llm, task, council, architect)
    for r in result.results:
        voters = {v.voter_id for v in r.votes}
        assert r.proposal.author_id not in voters
        assert voters == {a.agent_id for a in council.agents} - {r.proposal.author_id}
        assert all(v.proposal_id == r.proposal.proposal_id for v in r.votes)
        assert all(set(v.scores) == {c.name for c in make_task().constraints.rubric} for v in r.votes)
    for request in llm.by_schema("scores"):
        voter = parts(request)["agent"]
        assert voter not in candidates_shown(request).values()


@pytest.mark.parametrize("n", [3, 4, 5])
async def test_every_proposal_is_shown_in_every_position_once(n):
    llm = ScriptedLLM()
    council = make_council(Role.DEV, n)
    result = await deliberate(llm, make_task(), council)
    positions = {r.proposal.author_id: sorted(v.position for v in r.votes) for r in result.results}
    assert positions == {a.agent_id: list(range(1, n)) for a in council.agents}
    # the labels are neutral: the same label names different authors for different voters
    shown = [candidates_shown(r) for r in llm.by_schema("scores")]
    assert len({s["A"] for s in shown}) == n


async def test_order_swapping_cancels_a_position_biased_voter(council, architect):
    def first_is_best(request):
        out = {}
        for i, (label, sub) in enumerate(request.json_schema["properties"].items()):
            keys = [k for k in sub["properties"] if k != "reason"]
            out[label] = {**dict.fromkeys(keys, 10 if i == 0 else 2), "reason": "first seen"}
        return json.dumps(out)

    llm = ScriptedLLM(answers={"scores": first_is_best})
    result = await deliberate(llm, make_task(), council, architect)
    assert len({r.peer_score for r in result.results}) == 1  # position bias spread evenly over the proposals


async def test_peer_scores_rank_the_proposals(council, architect):
    favourite = "agent-dev-003"

    def scores(request):
        out = {}
        for label, author in candidates_shown(request).items():
            keys = [k for k in request.json_schema["properties"][label]["properties"] if k != "reason"]
            out[label] = {**dict.fromkeys(keys, 9 if author == favourite else 4), "reason": "as I see it"}
        return json.dumps(out)

    result = await deliberate(ScriptedLLM(answers={"scores": scores}), make_task(), council, architect)
    assert authors(result)[0] == favourite
    assert result.results[0].peer_score == 9.0 and result.results[1].peer_score == 4.0
    assert result.results[0].score == pytest.approx(0.7 * 9 + 0.3 * 10)


async def test_the_architect_picks_among_the_top_k(council, architect):
    def pick_b(request):
        assert request.json_schema["properties"]["winner"]["enum"] == ["A", "B"]  # top_k = 2
        return json.dumps({"winner": "B", "rationale": "B handles invalid input best and its tests say so."})

    llm = ScriptedLLM(answers={"selection": pick_b})
    result = await deliberate(llm, make_task(top_k=2), council, architect)
    assert result.selection is not None and result.selection.method == "ARCHITECT"
    assert result.winner_id == result.results[1].proposal.author_id  # B = the second best scored
    assert result.selection.rationale == "B handles invalid input best and its tests say so."
    (select,) = llm.by_schema("selection")
    assert parts(select)["agent"] == architect.agent_id and "combined score" in select.messages[-1].content


@pytest.mark.parametrize(
    ("answer", "error", "why"),
    [
        (None, LLMError("vLLM rejected the request (HTTP 400): bad"), "LLM error"),
        (json.dumps({"winner": "Z", "rationale": "Z is best"}), None, "'winner' must be one of"),
        ("I like the second one.", None, "no JSON object"),
    ],
)
async def test_the_fallback_decides_when_the_architect_fails(council, architect, answer, error, why):
    llm = ScriptedLLM(
        answers={"selection": lambda _: answer} if answer else {},
        fail=lambda r: error if r.schema_name == "selection" else None,
    )
    result = await deliberate(llm, make_task(), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    assert result.selection is not None and result.selection.method == "FALLBACK"
    assert result.selection.selected_by == "engine"
    assert why in result.selection.rationale and architect.agent_id in result.selection.rationale
    assert result.winner_id == result.results[0].proposal.author_id
    assert [(f.agent_id, f.phase) for f in result.failures] == [(architect.agent_id, Phase.SELECT)]


async def test_the_fallback_decides_without_an_architect(llm, task, council):
    result = await deliberate(llm, task, council, None)
    assert result.selection is not None and result.selection.method == "FALLBACK"
    assert "no ARCHITECT" in result.selection.rationale
    assert result.winner_id == result.results[0].proposal.author_id
    assert not llm.by_schema("selection")


async def test_the_fallback_breaks_ties_by_check_findings_then_author(council):
    def proposal(request):
        agent = parts(request)["agent"]
        image = "nginx:latest" if agent == "agent-dev-001" else "nginx:1.27"
        return f"Proposal by {agent}: tests.\n\n```yaml\nimage: {image}\n```\n"

    llm = ScriptedLLM(answers={"proposal": proposal, "revision": lambda r: r.messages[2].content})
    result = await deliberate(llm, make_task(), council)
    # equal peer scores; 001 fails the image check, 002 and 003 tie and the author id decides
    assert authors(result) == ["agent-dev-002", "agent-dev-003", "agent-dev-001"]
    assert result.results[2].check_score < 10 and result.winner_id == "agent-dev-002"


async def test_the_deadline_ends_in_timeout_with_partial_results(council, architect):
    llm = ScriptedLLM(delay=0.3)
    result = await deliberate(llm, make_task(timeout_seconds=0.5), council, architect)
    assert result.status == DeliberationStatus.TIMEOUT
    assert "0.5s" in result.error_message and "CRITIQUE" in result.error_message
    assert len(result.results) == 3 and all(len(r.proposal.revisions) == 1 for r in result.results)
    assert result.selection is not None and result.selection.method == "FALLBACK"
    assert "stopped early" in result.selection.rationale
    assert set(result.phase_durations_ms) == {Phase.GENERATE, Phase.CHECK, Phase.CRITIQUE}
    assert result.tokens_by_phase == {Phase.GENERATE: 90}


async def test_a_deadline_during_generate_keeps_nothing_but_never_hangs(council, architect):
    result = await deliberate(ScriptedLLM(delay=30), make_task(timeout_seconds=0.2), council, architect)
    assert result.status == DeliberationStatus.TIMEOUT and "GENERATE" in result.error_message
    assert not result.results and result.selection is None
    assert result.duration_ms < 10_000  # the LLM would have taken 30 s: the deadline ended it


class RecordingExecutor(InProcessExecutor):
    """The in-process executor, remembering each phase's calls (to know what a phase projects)."""

    def __init__(self, llm) -> None:
        super().__init__(llm)
        self.phases: dict[Phase, list] = defaultdict(list)

    async def run(self, calls):
        self.phases[calls[0].phase].extend(calls)
        return await super().run(calls)


async def test_a_phase_that_would_exceed_the_token_budget_is_not_started(council, architect):
    """The budget is checked before a phase is dispatched, on its projection (prompts at 3 characters a token,
    completions at max_tokens): the deliberation stops FAILED with what it has, and no call goes over."""
    recording = RecordingExecutor(ScriptedLLM())
    await DeliberationEngine(recording, checker=ProposalChecker(ScriptedSandbox())).run(
        make_task(), council, architect, "d1"
    )
    generate, critique = (projected_tokens(recording.phases[p]) for p in (Phase.GENERATE, Phase.CRITIQUE))
    used_after_generate = 3 * 30
    budget = used_after_generate + critique - 1  # GENERATE fits, CRITIQUE does not
    assert generate <= budget
    llm = ScriptedLLM()
    result = await deliberate(llm, make_task(token_budget=budget), council, architect)
    assert result.status == DeliberationStatus.FAILED
    assert result.error_message == (
        f"token budget of {budget} would be exceeded by the CRITIQUE phase ({used_after_generate} tokens used, "
        f"{critique} projected): not started"
    )
    assert not llm.by_schema("critique") and len(llm.requests) == 3
    assert len(result.results) == 3 and result.selection is not None and result.selection.method == "FALLBACK"
    assert result.total_tokens <= budget


async def test_the_budget_never_fails_a_finished_deliberation(council, architect):
    """Past SELECT nothing is checked: a deliberation whose last call used more than its projection completes.
    And when the architect's call itself does not fit what is left, the fallback decides, noted."""

    class Costly(ScriptedLLM):
        async def complete(self, request, on_delta=None):
            response = await super().complete(request, on_delta)
            if request.schema_name == self.costly:
                return replace(response, usage=TokenUsage(self.cost, 10))
            return response

    over = Costly()
    over.costly, over.cost = "selection", 60_000
    result = await deliberate(over, make_task(token_budget=50_000), council, architect)
    assert result.status == DeliberationStatus.COMPLETED and result.selection.method == "ARCHITECT"
    assert result.total_tokens > 50_000  # the architect's answer went over; nothing fails after it

    tight = Costly()
    tight.costly, tight.cost = "scores", 33_000  # three votes leave no room for the architect's projected call
    result = await deliberate(tight, make_task(token_budget=100_000), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    assert result.selection.method == "FALLBACK" and "token budget" in result.selection.rationale
    assert any("token budget of 100000" in n for n in result.notes)
    assert not tight.by_schema("selection")


async def test_an_unlimited_budget_is_zero(council, architect):
    llm = ScriptedLLM(tokens=(10_000_000, 10))
    result = await deliberate(llm, make_task(token_budget=0), council, architect)
    assert result.status == DeliberationStatus.COMPLETED and result.total_tokens > 100_000_000


async def test_every_agent_failing_fails_the_deliberation_with_the_reason(council, architect):
    down = Unavailable("vLLM at http://127.0.0.1:9 unavailable after 1 attempt: connection failed")
    result = await deliberate(ScriptedLLM(fail=lambda _: down), make_task(), council, architect)
    assert result.status == DeliberationStatus.FAILED
    assert result.error_message.startswith("all 3 agents failed in GENERATE: LLM unavailable: vLLM at")
    assert "127.0.0.1" in result.error_message
    assert [f.phase for f in result.failures] == [Phase.GENERATE] * 3
    assert not result.results and result.selection is None and result.winner_id == ""
    assert list(result.phase_durations_ms) == [Phase.GENERATE]


async def test_one_agent_failing_lets_the_others_finish(council, architect):
    def fail(request):
        if parts(request)["agent"] == "agent-dev-002" and request.schema_name == "proposal":
            return LLMError("unparsable chat completion")
        return None

    result = await deliberate(ScriptedLLM(fail=fail), make_task(), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    assert sorted(authors(result)) == ["agent-dev-001", "agent-dev-003"]
    assert [(f.agent_id, f.phase) for f in result.failures] == [("agent-dev-002", Phase.GENERATE)]
    assert "LLM error: unparsable" in result.failures[0].error
    assert all(c.critic_id != c.author_id for c in result.critiques) and len(result.critiques) == 2
    # the agent without a proposal still reviews and votes
    assert {v.voter_id for r in result.results for v in r.votes} == {a.agent_id for a in council.agents}


async def test_an_unusable_critique_is_that_critics_failure(council, architect):
    def critique(request):
        if parts(request)["agent"] == "agent-dev-002":
            return json.dumps({"verdict": "maybe", "summary": "?", "issues": []})
        return json.dumps({"verdict": "accept", "summary": "Good.", "issues": ["x" * 500] * 9})

    result = await deliberate(ScriptedLLM(answers={"critique": critique}), make_task(), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    assert [(f.agent_id, f.phase) for f in result.failures] == [("agent-dev-002", Phase.CRITIQUE)]
    assert "'verdict' must be one of accept, revise" in result.failures[0].error
    assert len(result.critiques) == 2 and all(len(c.issues) == 5 for c in result.critiques)
    assert all(len(i) <= 200 for c in result.critiques for i in c.issues)
    by_author = {r.proposal.author_id: r.proposal for r in result.results}
    assert len(by_author["agent-dev-001"].revisions) == 1  # its critic (002) failed: nothing to revise with


async def test_invalid_scores_are_rejected_and_recorded(council, architect):
    def scores(request):
        if parts(request)["agent"] == "agent-dev-001":
            return json.dumps({label: {"correctness": 11} for label in request.json_schema["properties"]})
        return default_scores(request)

    result = await deliberate(ScriptedLLM(answers={"scores": scores}), make_task(), council, architect)
    assert [(f.agent_id, f.phase) for f in result.failures] == [("agent-dev-001", Phase.SCORE)]
    assert "must be 1..10, got 11" in result.failures[0].error
    assert not any(v.voter_id == "agent-dev-001" for r in result.results for v in r.votes)


async def test_no_peer_judgement_at_all_fails_the_deliberation_keeping_what_is_known(council, architect):
    """The LLM went away after the proposals: a ranking on checks alone would pose as a deliberation."""

    def fail(request):
        return Unavailable("vLLM down") if request.schema_name == "scores" else None

    result = await deliberate(ScriptedLLM(fail=fail), make_task(), council, architect)
    assert result.status == DeliberationStatus.FAILED
    assert result.error_message.startswith("no peer judgement: all 3 agents failed in SCORE: LLM unavailable")
    assert len(result.results) == 3 and all(r.checks for r in result.results)  # partial results kept
    assert result.selection is not None and result.selection.method == "FALLBACK"
    assert Phase.SELECT not in result.phase_durations_ms


async def test_unusable_scores_from_every_voter_leave_a_ranking_on_what_is_known(council, architect):
    """The LLM answered, badly (a small model): the voters failed, not the deliberation."""
    result = await deliberate(ScriptedLLM(answers={"scores": lambda request: "{}"}), make_task(), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    assert [f.phase for f in result.failures] == [Phase.SCORE] * 3
    assert not any(r.votes for r in result.results) and all(r.checks for r in result.results)
    assert result.selection is not None and result.winner_id


async def test_each_phase_runs_its_calls_concurrently(council, architect):
    llm = ScriptedLLM(delay=0.2)
    result = await deliberate(llm, make_task(), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    assert llm.max_active == 3
    assert {s: llm.peak_by_schema[s] for s in ("proposal", "critique", "revision", "scores")} == dict.fromkeys(
        ("proposal", "critique", "revision", "scores"), 3
    )  # the three calls of each phase were at the LLM at once
    for phase in (Phase.GENERATE, Phase.CRITIQUE, Phase.REVISE, Phase.SCORE):
        assert result.phase_durations_ms[phase] >= 180, (phase, result.phase_durations_ms)


async def test_checks_run_off_the_event_loop_and_concurrently(llm, council, architect, monkeypatch):
    import services.deliberation.grounding as grounding_module

    running, peak, ticks_during = 0, 0, []
    lock = threading.Lock()

    def slow_checks(content, requirements):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        before = ticks
        time.sleep(0.2)  # blocking, like ruff in a subprocess
        ticks_during.append(ticks - before)
        with lock:
            running -= 1
        return []

    monkeypatch.setattr(grounding_module, "run_checks", slow_checks)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        result = await deliberate(llm, make_task(), council, architect)
    finally:
        t.cancel()
    assert result.status == DeliberationStatus.COMPLETED
    assert peak == 3  # the three proposals were checked at once
    assert max(ticks_during) >= 1  # the event loop ran while a check blocked its thread


async def test_a_failing_progress_callback_does_not_break_the_run(llm, task, council, architect):
    async def broken(_: ProgressEvent) -> None:
        raise RuntimeError("dashboard down")

    result = await deliberate(llm, task, council, architect, on_progress=broken)
    assert result.status == DeliberationStatus.COMPLETED


async def test_the_result_round_trips_through_json(llm, task, council, architect):
    result = await deliberate(ScriptedLLM(fail=lambda r: None), task, council, architect)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["status"] == "COMPLETED" and data["phase_durations_ms"]["GENERATE"] >= 0
    back = DeliberationResult.from_dict(data)
    assert back == result
    assert back.tokens_by_phase == result.tokens_by_phase and back.winner == result.winner
    assert isinstance(back.results[0].checks, tuple) and isinstance(back.role, Role)


async def test_a_pending_record_round_trips_too(task):
    pending = DeliberationResult.pending("d9", task, "council-dev", "in-process")
    assert pending.status == DeliberationStatus.PENDING and pending.winner is None and pending.total_tokens == 0
    assert DeliberationResult.from_dict(json.loads(json.dumps(pending.to_dict()))) == pending


async def test_against_the_loopback_openai_server(task, council, architect):
    """The real vLLM client and the loopback server's schema-driven answers (in process): the schemas are
    accepted and the random-but-valid answers go through every phase."""
    from openai_server import create_app

    transport = httpx.ASGITransport(app=create_app())
    async with VLLMClient("http://loopback", "test-model", transport=transport, max_retries=0) as client:
        for seed in range(3):
            result = await DeliberationEngine(InProcessExecutor(client)).run(task, council, architect, f"d{seed}")
            assert result.status == DeliberationStatus.COMPLETED, result.error_message
            assert not result.failures, result.failures
            assert len(result.results) == 3 and all(r.votes for r in result.results)
            assert result.selection is not None and result.selection.method == "ARCHITECT"
            assert result.total_tokens > 0
            assert Counter(c.critic_id != c.author_id for c in result.critiques) == Counter({True: 3})


async def test_checks_run_while_the_peers_score(council, architect, monkeypatch):
    import services.deliberation.grounding as grounding_module

    checking: list[tuple[float, float]] = []

    def slow_checks(content, requirements):
        start = time.perf_counter()
        time.sleep(0.3)
        checking.append((start, time.perf_counter()))
        return []

    monkeypatch.setattr(grounding_module, "run_checks", slow_checks)
    llm = ScriptedLLM(delay=0.3)
    result = await deliberate(llm, make_task(), council, architect)
    assert result.status == DeliberationStatus.COMPLETED
    scoring = [(start, end) for schema, start, end in llm.spans if schema == "scores"]
    assert len(checking) == 6 and len(scoring) == 3  # the originals (before review) and the revisions
    last = sorted(checking)[3:]
    # the revisions' checks overlapped the peers' scoring calls: off the critical path, not after it
    assert all(any(c0 < s1 and s0 < c1 for s0, s1 in scoring) for c0, c1 in last)


def test_a_voter_using_every_character_the_score_schema_allows_is_not_cut_off():
    """Guided decoding may fill each reason to its maxLength (a random-weight model does): the request leaves room
    for it, counted in characters (every token is at least one)."""
    from services.deliberation.prompts import REASON_MAX, SCORE_MAX, labels, score_max_tokens, score_schema

    keys = ["correctness", "readability", "tests", "security"]
    for n in (1, 2, 4):
        schema = score_schema(labels(n), keys)
        longest = {lab: {**{k: SCORE_MAX for k in keys}, "reason": "x" * REASON_MAX} for lab in schema["properties"]}
        assert len(json.dumps(longest, separators=(",", ":"))) <= score_max_tokens(n, keys)
