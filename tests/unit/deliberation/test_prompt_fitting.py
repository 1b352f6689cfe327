"""Prompts fit the model's context window: the material is cut with a visible marker, the task, its tests and the
rubric never; a prompt that cannot fit is refused with the numbers, never sent. A fake counter (words) stands in for
the tokenizer (the real one and the real vLLM: tests/integration/llm/test_vllm_context_window.py)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from scripted_llm import TASK_TESTS, ScriptedLLM, ScriptedSandbox, make_task

from services.deliberation.domain import DeliberationStatus, Phase, Role, make_council
from services.deliberation.engine import DeliberationEngine, InProcessExecutor, describe_error, shared_system
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import CharEstimate, ChatMessage, ContextOverflow, ContextWindow, LLMRequest
from services.deliberation.prompts import MIN_KEPT, criterion_keys, fit_prompt, score_max_tokens, system_prompt

MARKER = re.compile(r"\[\.\.\. ([\d,]+) tokens trimmed to fit the model's ([\d,]+)-token window \.\.\.\]")


class Words:
    """One token per whitespace-separated word (and per marker word): a stand-in for a tokenizer."""

    name = "words"

    def count(self, text: str) -> int:
        return len(text.split())


def window(tokens: int) -> ContextWindow:
    return ContextWindow(tokens, Words(), "setting")


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def build(texts: list[str]) -> tuple[ChatMessage, ...]:
    body = "\n\n".join(f"## Text {i}\n{t}" for i, t in enumerate(texts))
    return (ChatMessage("system", "You review. The rubric: correctness."), ChatMessage("user", body))


# --- fit_prompt ---------------------------------------------------------------------------------------------------


def test_a_prompt_that_fits_is_built_as_it_is() -> None:
    texts = [words(50), words(20)]
    fitted = fit_prompt(build, texts, window(400), 100)
    assert fitted.messages == build(texts) and fitted.trimmed == 0 and fitted.texts_cut == 0
    assert fitted.tokens == window(400).prompt_tokens(build(texts)) <= 300


def test_long_texts_are_cut_to_one_length_short_ones_kept_whole_with_a_marker() -> None:
    w = window(600)
    texts = [words(1000, "a"), words(30, "b"), words(400, "c")]
    fitted = fit_prompt(build, texts, w, 200)

    assert fitted.tokens <= 400 == w.prompt_budget(200)
    assert fitted.tokens == w.prompt_tokens(fitted.messages)
    body = fitted.messages[1].content
    assert words(30, "b") in body  # the short one whole
    markers = MARKER.findall(body)
    assert len(markers) == 2 == fitted.texts_cut and all(size == "600" for _, size in markers)
    kept_a = len(re.findall(r"\ba\d+\b", body))
    kept_c = len(re.findall(r"\bc\d+\b", body))
    assert kept_a == kept_c >= MIN_KEPT  # water-filling: the long ones keep the same length
    assert body.index("a0 a1 a2") < body.index("[...")  # the head is kept
    cut = [int(n.replace(",", "")) for n, _ in markers]
    assert cut == [1000 - kept_a, 400 - kept_c] and fitted.trimmed == sum(cut)
    assert fitted.messages[0] == build(texts)[0]  # what is never cut


def test_a_prompt_that_cannot_fit_even_cut_names_the_numbers() -> None:
    fixed_only = (ChatMessage("system", words(300)),)
    with pytest.raises(ContextOverflow) as e:
        fit_prompt(lambda t: fixed_only + build(t), [words(500)], window(512), 256, "the SELECT prompt of arch-1")
    message = e.value.message
    assert message.startswith("the SELECT prompt of arch-1 does not fit the model's 512-token window")
    assert "256 for the answer (max_tokens)" in message and "500 tokens of material" in message
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.metadata["window"] == "512"
    assert describe_error(e.value) == (f"prompt too long: {message}", "overflow")


def test_max_tokens_as_large_as_the_window_leaves_no_room() -> None:
    with pytest.raises(ContextOverflow, match="2,048 for the answer"):
        fit_prompt(build, [words(10)], window(2048), 2048)


def test_the_char_estimate_over_counts_with_a_margin() -> None:
    assert CharEstimate().count("") == 0
    assert CharEstimate().count("x" * 300) == 110  # 300 / 3 + 10%
    w = ContextWindow(4096)
    assert w.counter.name == "chars/3+10%" and w.source == "server"
    messages = (ChatMessage("system", "x" * 30), ChatMessage("user", "y" * 30))
    assert w.prompt_tokens(messages) == 2 * (11 + ContextWindow.PER_MESSAGE) + ContextWindow.PRIMING


# --- the engine -----------------------------------------------------------------------------------------------------

LONG_CODE = "```python\n" + "\n".join(f"def f{i}(x):\n    return x + {i}  # step {i}" for i in range(150)) + "\n```"


def long_proposal(request: LLMRequest) -> str:
    agent = request.request_id.split(":")[3]
    return f"## Proposal by {agent}\n\n{LONG_CODE}"


def assert_every_call_fits(llm: ScriptedLLM, w: ContextWindow) -> None:
    assert llm.requests
    for request in llm.requests:
        prompt = w.prompt_tokens(request.messages)
        assert prompt + request.max_tokens <= w.tokens, (request.request_id, prompt, request.max_tokens)


async def deliberate(llm, task, council, architect, w):
    engine = DeliberationEngine(InProcessExecutor(llm), checker=ProposalChecker(ScriptedSandbox()), window=w)
    return await engine.run(task, council, architect, "d1")


async def test_long_proposals_are_cut_so_that_no_call_overflows_and_the_architect_decides(council, architect) -> None:
    llm = ScriptedLLM(answers={"proposal": long_proposal, "revision": long_proposal})
    task = make_task(tests=TASK_TESTS, max_tokens=200)
    w = window(1400)
    assert Words().count(LONG_CODE) > 600  # three finalists are twice the window

    result = await deliberate(llm, task, council, architect, w)

    assert result.status == DeliberationStatus.COMPLETED and not result.failures
    assert result.selection is not None and result.selection.method == "ARCHITECT"
    assert_every_call_fits(llm, w)
    select = llm.by_schema("selection")[0].messages[-1].content
    assert len(MARKER.findall(select)) == 3 and "1,400" in select
    # the task, its tests and the rubric are never cut
    assert task.description in select and "## Rubric" in select
    for criterion in task.constraints.rubric:
        assert (criterion.description or criterion.name) in select
    assert TASK_TESTS.strip() in llm.by_schema("selection")[0].messages[0].content
    assert any(
        "material cut to fit the model's 1,400-token window (setting, counted with words)" in n for n in result.notes
    )
    assert re.search(r"SELECT [\d,]+", " ".join(result.notes))


async def test_a_long_context_is_cut_once_so_the_council_still_shares_one_system_prompt(council, architect) -> None:
    llm = ScriptedLLM()
    task = make_task(tests=TASK_TESTS, max_tokens=200)
    task = replace(task, context="Context starts here. " + words(3000, "ctx"))
    w = window(1400)

    result = await deliberate(llm, task, council, architect, w)

    assert result.status == DeliberationStatus.COMPLETED and not result.failures
    assert_every_call_fits(llm, w)
    systems = {r.messages[0].content for r in llm.requests}
    assert systems == {shared_system(task, council.agents, w)}  # one prefix for every call
    system = systems.pop()
    assert "Context starts here. ctx0 ctx1" in system and len(MARKER.findall(system)) == 1
    assert TASK_TESTS.strip() in system
    # the context takes at most half of what the GENERATE prompt leaves
    empty = w.prompt_tokens((ChatMessage("system", system_prompt(task, "")),))
    assert w.counter.count(system) - w.counter.count(system_prompt(task, "")) <= (1400 - 200 - empty) // 2


async def test_without_a_window_prompts_are_sent_as_they_are(council, architect) -> None:
    llm = ScriptedLLM(answers={"proposal": long_proposal, "revision": long_proposal})
    result = await deliberate(llm, make_task(max_tokens=200), council, architect, None)
    assert result.status == DeliberationStatus.COMPLETED and not result.notes
    assert not any(MARKER.search(m.content) for r in llm.requests for m in r.messages)


async def test_a_task_whose_tests_do_not_fit_fails_in_generate_naming_the_numbers_and_calls_nobody(council) -> None:
    llm = ScriptedLLM()
    huge_tests = "\n".join(f"def test_{i}():\n    assert True  # case {i}" for i in range(400))
    result = await deliberate(llm, make_task(tests=huge_tests, max_tokens=200), council, None, window(1024))

    assert result.status == DeliberationStatus.FAILED and not llm.requests
    assert result.error_message.startswith("all 3 agents failed in GENERATE: prompt too long: the GENERATE prompt of")
    assert "does not fit the model's 1,024-token window" in result.error_message
    assert "200 for the answer (max_tokens)" in result.error_message
    assert [f.phase for f in result.failures] == [Phase.GENERATE] * 3


async def test_an_architect_prompt_that_cannot_fit_is_a_fallback_naming_why(council, architect) -> None:
    """Only the SELECT prompt is too long (a long persona, never cut): the fallback decides and says why."""
    architect = replace(architect, persona=words(1100, "p"))
    llm = ScriptedLLM()
    result = await deliberate(llm, make_task(max_tokens=200), council, architect, window(1400))

    assert result.status == DeliberationStatus.COMPLETED and not llm.by_schema("selection")
    assert result.selection is not None and result.selection.method == "FALLBACK"
    assert "could not be asked: prompt too long: the SELECT prompt of" in result.selection.rationale
    assert [(f.agent_id, f.phase) for f in result.failures] == [(architect.agent_id, Phase.SELECT)]


async def test_score_answers_get_at_most_half_a_known_window() -> None:
    council = make_council(Role.DEV, 7)
    llm = ScriptedLLM()
    w = window(3000)
    result = await deliberate(llm, make_task(max_tokens=200), council, None, w)
    assert result.status == DeliberationStatus.COMPLETED
    assert score_max_tokens(6, criterion_keys(make_task().constraints.rubric)) > 1500
    assert {r.max_tokens for r in llm.by_schema("scores")} == {1500}
    assert_every_call_fits(llm, w)
