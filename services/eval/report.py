"""What `fleet eval` reports: per-mode summaries, the paired comparisons, the Markdown summary and the plot."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.eval.records import Record
from services.eval.stats import Paired, paired, wilson


@dataclass(frozen=True)
class ModeSummary:
    mode: str
    scored: int
    solved: int
    errors: int
    prompt_tokens: float  # means per scored problem
    completion_tokens: float
    llm_calls: float
    seconds: float
    total_tokens: int  # over the scored problems

    @property
    def pass_at_1(self) -> float:
        return self.solved / self.scored if self.scored else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.solved, self.scored)

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_solved(self) -> float | None:
        return self.total_tokens / self.solved if self.solved else None


def summarize(mode: str, records: Sequence[Record]) -> ModeSummary:
    scored = [r for r in records if r.scored]
    n = len(scored) or 1
    return ModeSummary(
        mode=mode,
        scored=len(scored),
        solved=sum(r.passed for r in scored),
        errors=len(records) - len(scored),
        prompt_tokens=sum(r.prompt_tokens for r in scored) / n,
        completion_tokens=sum(r.completion_tokens for r in scored) / n,
        llm_calls=sum(r.llm_calls for r in scored) / n,
        seconds=sum(r.seconds for r in scored) / n,
        total_tokens=sum(r.tokens for r in scored),
    )


def comparisons(by_mode: dict[str, Sequence[Record]]) -> list[Paired]:
    """Every pair of modes, in the order given, on the problems both scored."""
    solved = {m: {r.problem: r.passed for r in rs if r.scored} for m, rs in by_mode.items()}
    return [paired(a, b, solved[a], solved[b]) for a, b in itertools.combinations(by_mode, 2)]


@dataclass(frozen=True)
class Report:
    """Everything the summary states."""

    title: str
    facts: list[tuple[str, str]]  # (what, value): model, endpoint, seeds, max tokens, date, ...
    summaries: list[ModeSummary]
    pairs: list[Paired]
    errors: list[Record] = field(default_factory=list)  # infrastructure errors, not counted
    notes: list[str] = field(default_factory=list)  # the harness's own findings


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(report: Report, plot_name: str) -> str:
    out = [f"# {report.title}", ""]
    out += [f"- {what}: {value}" for what, value in report.facts]
    out += [
        "",
        "| mode | pass@1 | 95% CI (Wilson) | solved / scored | tokens / problem (prompt + completion) "
        "| tokens / solved | LLM calls / problem | wall s / problem | infra errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.summaries:
        lo, hi = s.interval
        per_solved = f"{s.tokens_per_solved:.0f}" if s.tokens_per_solved is not None else "—"
        out.append(
            f"| {s.mode} | {_pct(s.pass_at_1)} | {_pct(lo)} to {_pct(hi)} | {s.solved} / {s.scored} | "
            f"{s.tokens:.0f} ({s.prompt_tokens:.0f} + {s.completion_tokens:.0f}) | {per_solved} | "
            f"{s.llm_calls:.1f} | {s.seconds:.1f} | {s.errors} |"
        )
    if report.pairs:
        out += [
            "",
            "## Paired comparisons (the problems both modes scored)",
            "",
            "| A vs B | problems | both solved | only A | only B | neither | McNemar exact p |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {p.first} vs {p.second} | {p.n} | {p.both} | {p.first_only} | {p.second_only} | {p.neither} | "
            f"{p.p_value:.3g} |"
            for p in report.pairs
        ]
    if report.errors:
        out += ["", "## Infrastructure errors (neither passes nor failures; a rerun tries them again)", ""]
        out += [f"- {r.problem} · {r.mode}: {r.reason}" for r in report.errors]
    if report.notes:
        out += ["", "## Harness", ""] + [f"- {n}" for n in report.notes]
    out += ["", f"![pass@1 against tokens per problem]({plot_name})", ""]
    return "\n".join(out)


def plot(summaries: Sequence[ModeSummary], path: Path, title: str) -> None:
    """pass@1 against tokens per problem, one point per mode, with its Wilson interval (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = itertools.cycle("osD^v")
    for s in summaries:  # equal budgets put points on top of each other: the markers and the legend tell them apart
        lo, hi = s.interval
        ax.errorbar(
            [s.tokens],
            [s.pass_at_1],
            yerr=[[s.pass_at_1 - lo], [hi - s.pass_at_1]],
            fmt=next(markers),
            markersize=8,
            markerfacecolor="none",
            capsize=5,
            label=f"{s.mode}: {s.solved}/{s.scored}, {s.tokens:.0f} tokens",
        )
    ax.set_xlabel("tokens per problem (prompt + completion)")
    ax.set_ylabel("pass@1 on the hidden tests (95% Wilson interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0, right=max((s.tokens for s in summaries), default=1) * 1.3 or 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
