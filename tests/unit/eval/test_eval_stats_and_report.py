"""The statistics against values computed by hand, and the summary built from records."""

from __future__ import annotations

import pytest

from services.eval.records import Record
from services.eval.report import Report, comparisons, markdown, plot, summarize
from services.eval.stats import mcnemar_exact, paired, wilson


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # z = 1.96: 0/10 -> high = z^2 / (n + z^2) = 3.8415 / 13.8415; 10/10 -> low = n / (n + z^2)
        (0, 10, 0.0, 0.27753),
        (10, 10, 0.72247, 1.0),
        # 5/10: centre 0.5, half = z / (1 + z^2/n) * sqrt(0.025 + z^2/400) = 1.41600 * 0.18602 = 0.26341
        (5, 10, 0.23659, 0.76341),
        # 1/3: centre (1/3 + 0.64024) / 2.28049 = 0.42691, half = 0.85946 * sqrt(0.074074 + 0.106711) = 0.36544
        (1, 3, 0.06149, 0.79235),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson_interval_by_hand(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_bounds_hold_the_proportion_exactly_at_the_extremes():
    """Rounding once put the lower bound of 0/12 a hair above 0, and the plot refused a negative error bar."""
    for n in range(1, 300):
        for k in (0, 1, n - 1, n):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0


def test_the_plot_draws_every_mode_even_when_nothing_passed(tmp_path):
    summaries = [summarize(m, [rec(f"p{i}", m, "failed") for i in range(12)]) for m in ("single", "council")]
    plot(summaries, tmp_path / "plot.png", "title")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson(4, 3)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 5, 2 * (1 + 6) / 64),  # 0.21875
        (0, 6, 2 / 64),  # 0.03125
        (5, 1, 2 * (1 + 6) / 64),  # symmetric
        (2, 9, 2 * (1 + 11 + 55) / 2048),  # 0.0654296875
        (3, 3, 1.0),  # 2 x 42/64 > 1: capped
        (0, 0, 1.0),  # no discordant pair: no evidence
        (0, 1, 1.0),
    ],
)
def test_exact_mcnemar_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-12)


def test_paired_counts_only_the_problems_both_scored():
    pair = paired(
        "single",
        "council",
        {"a": True, "b": False, "c": True, "d": False},
        {"a": True, "b": True, "c": False, "e": True},
    )
    assert (pair.n, pair.both, pair.first_only, pair.second_only, pair.neither) == (3, 1, 1, 1, 0)
    assert pair.p_value == 1.0


def rec(problem: str, mode: str, outcome: str, tokens: tuple[int, int] = (100, 50), **over) -> Record:
    return Record(
        problem, mode, outcome, prompt_tokens=tokens[0], completion_tokens=tokens[1], llm_calls=1, seconds=2.0, **over
    )  # type: ignore[arg-type]


def test_a_mode_summary_leaves_infrastructure_errors_out():
    records = [
        rec("p1", "single", "passed"),
        rec("p2", "single", "failed", (300, 150)),
        rec("p3", "single", "error", (999, 999), reason="sandbox: UNAVAILABLE"),
    ]
    s = summarize("single", records)
    assert (s.scored, s.solved, s.errors) == (2, 1, 1)
    assert s.pass_at_1 == 0.5 and s.interval == wilson(1, 2)
    assert (s.prompt_tokens, s.completion_tokens, s.tokens) == (200, 100, 300)
    assert s.tokens_per_solved == 600  # every scored problem's tokens over the solved ones
    assert summarize("x", [rec("p1", "x", "failed")]).tokens_per_solved is None


def test_the_markdown_states_the_facts_the_table_the_pairs_and_the_errors():
    by_mode = {
        "single": [rec("p1", "single", "passed"), rec("p2", "single", "failed"), rec("p3", "single", "failed")],
        "council": [
            rec("p1", "council", "passed"),
            rec("p2", "council", "passed"),
            rec("p3", "council", "error", reason="why"),
        ],
    }
    report = Report(
        title="fleet eval: T",
        facts=[("model", "`m`"), ("seeds", "--seed 7")],
        summaries=[summarize(m, rs) for m, rs in by_mode.items()],
        pairs=comparisons(by_mode),
        errors=[r for rs in by_mode.values() for r in rs if not r.scored],
        notes=["p9: not evaluated"],
    )
    text = markdown(report, "plot.png")
    assert text.startswith("# fleet eval: T\n\n- model: `m`\n- seeds: --seed 7\n")
    assert "| single | 33.3% | 6.1% to 79.2% | 1 / 3 | 150 (100 + 50) | 450 | 1.0 | 2.0 | 0 |" in text
    assert "| council | 100.0% | 34.2% to 100.0% | 2 / 2 | 150 (100 + 50) | 150 | 1.0 | 2.0 | 1 |" in text
    assert "| single vs council | 2 | 1 | 0 | 1 | 0 | 1 |" in text
    assert "- p3 · council: why" in text and "- p9: not evaluated" in text and "![" in text
