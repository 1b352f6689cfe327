"""The live view's board: one row per agent from the fleet's events (NATS) or StreamDeliberation progress."""

from __future__ import annotations

from rich.console import Console

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from services.common import events as ev
from services.local.live import CouncilBoard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _text(board: CouncilBoard) -> str:
    console = Console(width=200, record=True, force_terminal=False)
    console.print(board.render())
    return console.export_text()


def _row(text: str, agent: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"│ {agent} "))
    return [cell.strip() for cell in line.strip()[1:-1].split("│")]


def test_rows_follow_the_nats_events_of_the_deliberations_followed() -> None:
    clock = Clock()
    board = CouncilBoard(clock)
    assert "waiting for the councils" in _text(board)
    board.feed(
        ev.DeliberationStarted(deliberation_id="d1", task_id="t1", role=ev.Role.DEV, council_id="c", num_agents=2)
    )
    for agent in ("a1", "a2"):
        board.feed(
            ev.AgentRequestDispatched(request_id=f"r-{agent}", deliberation_id="d1", agent_id=agent, phase="GENERATE")
        )
        board.feed(ev.TokenChunk(deliberation_id="d1", agent_id=agent, phase="GENERATE", kind="start", seq=0))
    board.feed(
        ev.TokenChunk(deliberation_id="d1", agent_id="a1", phase="GENERATE", kind="tokens", seq=1, text="x" * 40)
    )
    board.feed(
        ev.TokenChunk(deliberation_id="d1", agent_id="a1", phase="GENERATE", kind="tokens", seq=2, text="y" * 20)
    )
    board.feed(
        ev.TokenChunk(deliberation_id="other", agent_id="a1", phase="GENERATE", kind="tokens", seq=1, text="z" * 400)
    )
    clock.now += 2.5
    text = _text(board)
    assert "DEV · t1 — phase GENERATE — 2 s" in text
    assert _row(text, "a1") == ["a1", "GENERATE", "streaming", "~15", "0", "2.5 s"]  # 60 characters streamed
    assert _row(text, "a2") == ["a2", "GENERATE", "streaming", "0", "0", "2.5 s"]

    board.feed(
        ev.AgentResponseCompleted(
            request_id="r-a1",
            deliberation_id="d1",
            agent_id="a1",
            phase="GENERATE",
            content="...",
            completion_tokens=17,
        )
    )
    board.feed(
        ev.AgentResponseFailed(request_id="r-a2", deliberation_id="d1", agent_id="a2", phase="GENERATE", error="boom")
    )
    clock.now += 10
    text = _text(board)
    assert _row(text, "a1") == ["a1", "GENERATE", "answered", "17", "17", "2.5 s"]  # the exact count; time frozen
    assert _row(text, "a2")[:3] == ["a2", "GENERATE", "failed (boom)"]

    board.feed(ev.AgentRequestDispatched(request_id="r2", deliberation_id="d1", agent_id="a1", phase="CRITIQUE"))
    board.feed(ev.TokenChunk(deliberation_id="d1", agent_id="a1", phase="CRITIQUE", kind="start", seq=0))
    clock.now += 1
    assert _row(_text(board), "a1") == ["a1", "CRITIQUE", "streaming", "0", "17", "1.0 s"]
    board.feed(
        ev.DeliberationCompleted(
            deliberation_id="d1",
            task_id="t1",
            role=ev.Role.DEV,
            winner_id="a1",
            winner_proposal_id="p",
            winner_content="",
            winner_score=1.0,
            selection_method="ARCHITECT",
        )
    )
    text = _text(board)
    assert "DEV · t1 — completed, winner a1 — 14 s" in text
    assert _row(text, "a1")[2] == "stopped"  # its answer never came


def test_rows_follow_stream_deliberation_progress_and_tokens() -> None:
    clock = Clock()
    board = CouncilBoard(clock)

    def progress(kind: str, phase: str = "", agent: str = "", detail: str = "", tokens: int = 0) -> dpb.ProgressEvent:
        return dpb.ProgressEvent(
            deliberation_id="d1",
            task_id="t1",
            role="QA",
            phase=phase,
            kind=kind,
            agent_id=agent,
            detail=detail,
            completion_tokens=tokens,
        )

    board.progress(progress("deliberation_started"))
    board.progress(progress("phase_started", "GENERATE"))
    assert "QA · t1 — phase GENERATE" in _text(board)
    board.feed(
        ev.TokenChunk(deliberation_id="d1", agent_id="q1", phase="GENERATE", kind="tokens", seq=1, text="abcd" * 5)
    )
    clock.now += 1
    assert _row(_text(board), "q1") == ["q1", "GENERATE", "streaming", "~5", "0", "1.0 s"]
    # the detail counts prompt and answer ("40 tokens"); the rows count what the agents wrote
    board.progress(progress("agent_completed", "GENERATE", "q1", "40 tokens", tokens=9))
    board.progress(progress("agent_completed", "GENERATE", "q2", "45 tokens", tokens=11))  # nothing streamed
    text = _text(board)
    assert _row(text, "q1")[:5] == ["q1", "GENERATE", "answered", "9", "9"]
    assert _row(text, "q2") == ["q2", "GENERATE", "answered", "11", "11", "1.0 s"]  # since the phase started
    board.progress(progress("deliberation_completed", detail="COMPLETED (verified)"))
    assert "QA · t1 — COMPLETED (verified)" in _text(board)
