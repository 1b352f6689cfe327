"""The council at work, live: one row per agent (phase, tokens streamed so far, elapsed) for `fleet demo` and
`fleet deliberate`, drawn by a rich `Live` on a terminal.

`CouncilBoard` is fed from two sources, whichever the command has:
- the fleet's events on NATS (`feed`): a deliberation's start, each agent call dispatched, its streamed tokens
  (`vllm.streaming.chunk` TokenChunk events, published by the Ray workers every ~100 ms), its answer or failure;
- the orchestrator's StreamDeliberation progress (`progress`): phases started and ended, agents' answers with
  their token counts.

While an answer streams its tokens are estimated from the text (~4 characters a token, marked `~`); the answer's
event carries the exact count, which replaces the estimate. Without token chunks (the in-process executor, or no
NATS at hand) a row still shows its phase, state and time, and the exact count once the agent answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from services.common import events as ev

CHARS_PER_TOKEN = 4  # the live estimate while an answer streams (SmolLM2's and Qwen's BPE on English and code)


@dataclass
class AgentRow:
    agent_id: str
    phase: str = ""
    state: str = "waiting"  # waiting, streaming, answered, failed
    chars: int = 0  # streamed in this call
    tokens: int | None = None  # this call's exact completion tokens, once it answered
    total: int = 0  # exact tokens of the agent's finished calls in this deliberation
    calls: int = 0
    started: float | None = None
    ended: float | None = None
    error: str = ""

    def streamed(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        return f"~{self.chars // CHARS_PER_TOKEN}" if self.chars else "0"


@dataclass
class Deliberation:
    deliberation_id: str
    role: str
    label: str  # what the table calls it: role and task
    agents: dict[str, AgentRow] = field(default_factory=dict)
    phase: str = ""
    phase_at: float | None = None  # when `phase` started
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    outcome: str = ""


class CouncilBoard:
    """What each agent of the followed deliberations is doing; `render()` draws it (thread-safe: rich's refresh
    thread renders while the event loop feeds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.t0 = clock()
        self.deliberations: dict[str, Deliberation] = {}
        self._lock = threading.Lock()

    # --- what happened -----------------------------------------------------------------------------------------

    def started(self, deliberation_id: str, role: str, label: str = "") -> Deliberation:
        with self._lock:
            d = self.deliberations.get(deliberation_id)
            if d is None:
                d = Deliberation(deliberation_id, role, label or role, started=self.clock())
                self.deliberations[deliberation_id] = d
            return d

    def _row(self, deliberation_id: str, agent_id: str) -> AgentRow | None:
        d = self.deliberations.get(deliberation_id)
        if d is None:
            return None
        return d.agents.setdefault(agent_id, AgentRow(agent_id))

    def phase(self, deliberation_id: str, phase: str) -> None:
        with self._lock:
            if (d := self.deliberations.get(deliberation_id)) and d.phase != phase:
                d.phase, d.phase_at = phase, self.clock()

    def call_started(self, deliberation_id: str, agent_id: str, phase: str) -> None:
        with self._lock:
            row = self._row(deliberation_id, agent_id)
            if row is None or (row.phase == phase and row.state == "streaming"):
                return  # unknown deliberation, or a second signal of the same call (dispatched + stream start)
            row.phase, row.state, row.chars, row.tokens, row.error = phase, "streaming", 0, None, ""
            row.started, row.ended = self.clock(), None
            d = self.deliberations[deliberation_id]
            if d.phase != phase:
                d.phase, d.phase_at = phase, row.started

    def streamed(self, deliberation_id: str, agent_id: str, phase: str, text: str) -> None:
        with self._lock:
            row = self._row(deliberation_id, agent_id)
            if row is None:
                return
            if row.phase != phase or row.state != "streaming":  # the dispatch event was missed
                row.phase, row.state, row.chars, row.tokens = phase, "streaming", 0, None
                row.started, row.ended = self.clock(), None
            row.chars += len(text)

    def answered(self, deliberation_id: str, agent_id: str, phase: str, tokens: int | None) -> None:
        with self._lock:
            row = self._row(deliberation_id, agent_id)
            if row is None or (row.state == "answered" and row.phase == phase):
                return  # already counted (the answer's event and the progress event both say so)
            if row.phase != phase or row.started is None:  # no sign of its start: the phase's start then
                d = self.deliberations[deliberation_id]
                row.started = d.phase_at if d.phase == phase else None
            row.phase, row.state, row.ended = phase, "answered", self.clock()
            row.tokens = tokens if tokens is not None else row.chars // CHARS_PER_TOKEN
            row.total += row.tokens
            row.calls += 1

    def failed(self, deliberation_id: str, agent_id: str, phase: str, error: str) -> None:
        with self._lock:
            row = self._row(deliberation_id, agent_id)
            if row is None:
                return
            row.phase, row.state, row.ended, row.error = phase, "failed", self.clock(), error
            row.calls += 1

    def ended(self, deliberation_id: str, outcome: str) -> None:
        with self._lock:
            if d := self.deliberations.get(deliberation_id):
                d.ended, d.outcome, d.phase = self.clock(), outcome, ""
                for row in d.agents.values():
                    if row.state == "streaming":  # its answer event did not come (cut by the deadline...)
                        row.state, row.ended = "stopped", d.ended

    # --- the sources -------------------------------------------------------------------------------------------

    def feed(self, payload: ev.Payload) -> None:
        """An event of the catalog (NATS): only those of deliberations `started` here count."""
        p = payload
        if isinstance(p, ev.DeliberationStarted):
            self.started(p.deliberation_id, str(p.role), f"{p.role} · {p.task_id}")
        elif isinstance(p, ev.AgentRequestDispatched):
            self.call_started(p.deliberation_id, p.agent_id, p.phase)
        elif isinstance(p, ev.TokenChunk):
            if p.kind == "start":
                self.call_started(p.deliberation_id, p.agent_id, p.phase)
            elif p.kind == "tokens":
                self.streamed(p.deliberation_id, p.agent_id, p.phase, p.text)
        elif isinstance(p, ev.AgentResponseCompleted):
            self.answered(p.deliberation_id, p.agent_id, p.phase, p.completion_tokens)
        elif isinstance(p, ev.AgentResponseFailed):
            self.failed(p.deliberation_id, p.agent_id, p.phase, p.error)
        elif isinstance(p, ev.DeliberationCompleted):
            self.ended(p.deliberation_id, f"completed, winner {p.winner_id}")
        elif isinstance(p, ev.DeliberationFailed):
            self.ended(p.deliberation_id, f"{p.status}: {p.error[:80]}")

    def progress(self, p) -> None:  # p: a fleet.deliberation.v1.ProgressEvent (the proto)
        """A StreamDeliberation progress event."""
        if p.deliberation_id not in self.deliberations:
            self.started(p.deliberation_id, p.role, f"{p.role} · {p.task_id}")
        if p.kind == "phase_started":
            self.phase(p.deliberation_id, p.phase)
        elif p.kind == "agent_completed":  # of an answer (its tokens), or of a proposal checked (none)
            self.answered(p.deliberation_id, p.agent_id, p.phase, p.completion_tokens or None)
        elif p.kind == "agent_failed":
            self.failed(p.deliberation_id, p.agent_id, p.phase, p.detail)
        elif p.kind == "deliberation_completed":
            self.ended(p.deliberation_id, p.detail)

    # --- drawing -----------------------------------------------------------------------------------------------

    def render(self) -> RenderableType:
        now = self.clock()
        with self._lock:
            tables: list[RenderableType] = []
            for d in self.deliberations.values():
                took = (d.ended or now) - d.started
                status = d.outcome or (f"phase {d.phase}" if d.phase else "starting")
                table = Table(
                    "agent",
                    "phase",
                    "state",
                    "tokens",
                    "total",
                    "elapsed",
                    title=f"{d.label} — {status} — {took:.0f} s",
                    title_justify="left",
                    expand=False,
                )
                for row in d.agents.values():
                    colour = {"streaming": "yellow", "answered": "green", "failed": "red"}.get(row.state, "dim")
                    elapsed = "" if row.started is None else f"{(row.ended or now) - row.started:.1f} s"
                    table.add_row(
                        row.agent_id,
                        row.phase,
                        Text(row.state + (f" ({row.error[:40]})" if row.error else ""), style=colour),
                        row.streamed(),
                        str(row.total),
                        elapsed,
                    )
                tables.append(table)
            if not tables:
                return Text(f"waiting for the councils to start … {now - self.t0:.0f} s", style="dim")
            return Group(*tables)
