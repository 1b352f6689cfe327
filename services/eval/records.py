"""Per-problem records of `fleet eval`, one JSON object a line in `<output>/records.jsonl`, and the settings they
were made with in `<output>/run.json`.

Resumable: a record is appended (flushed and fsynced) as soon as its (problem, mode) is scored, so an interrupted run
loses only what was in flight; a rerun into the same folder skips every (problem, mode) it finds recorded, except
infrastructure errors, which it tries again (the latest record of a pair wins). A line cut short by a crash is
dropped. A rerun with other settings that decide the results (model, dataset, seed, max tokens, limits) is refused:
its records would not be comparable.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.eval.dataset import EvalError

RECORDS = "records.jsonl"
RUN = "run.json"
Outcome = Literal["passed", "failed", "error"]


@dataclass(frozen=True)
class Record:
    """One problem answered in one mode and scored against its hidden tests.

    outcome: passed / failed (the hidden tests' verdict, or no code to run) / error (infrastructure: the sandbox,
    the LLM server or the orchestrator could not do its part; reported apart, tried again by a rerun).
    """

    problem: str
    mode: str
    outcome: Outcome
    reason: str = ""  # why it failed or errored, in words
    hidden: str = ""  # the sandbox's outcome of the hidden tests (PASSED, FAILED, ERROR, TIMEOUT, KILLED; "": not run)
    code: str = ""  # the chosen answer's code (solution.py without the preamble)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    seconds: float = 0.0  # wall time of the mode (answering, choosing), without the hidden tests
    k: int = 0  # self-consistency's samples
    detail: dict[str, Any] = field(default_factory=dict)  # what the mode did (samples, deliberation)
    finished_at: str = ""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def scored(self) -> bool:
        return self.outcome != "error"

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


class RecordStore:
    """The records of one output folder (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.path = folder / RECORDS
        self.settings = settings
        self._latest: dict[tuple[str, str], Record] = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EvalError(f"--output {folder}: {e.strerror or e}") from None
        self._check_settings()
        self._load()

    def _check_settings(self) -> None:
        run = self.folder / RUN
        if run.exists():
            try:
                recorded = json.loads(run.read_text())["settings"]
            except (ValueError, KeyError, TypeError) as e:
                raise EvalError(f"{run}: unreadable ({e}); remove it or use another --output") from None
            differ = {k: (recorded.get(k), v) for k, v in self.settings.items() if recorded.get(k) != v}
            if differ:
                what = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in differ.items())
                raise EvalError(f"{self.folder} holds records made with other settings ({what}): use another --output")
        else:
            run.write_text(json.dumps({"settings": self.settings}, indent=2) + "\n")

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # the last line was cut short (a crash mid-write): drop it
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        for n, line in enumerate(data.decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = Record(**json.loads(line))
            except (ValueError, TypeError) as e:
                raise EvalError(f"{self.path} line {n}: not a record ({e})") from None
            self._latest[(record.problem, record.mode)] = record

    def get(self, problem: str, mode: str) -> Record | None:
        """The latest record of (problem, mode), errors included."""
        return self._latest.get((problem, mode))

    def done(self, problem: str, mode: str) -> bool:
        """Recorded with a result (an infrastructure error is not one)."""
        record = self.get(problem, mode)
        return record is not None and record.scored

    def add(self, record: Record) -> None:
        line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._latest[(record.problem, record.mode)] = record
