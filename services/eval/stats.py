"""The statistics of `fleet eval`: pass@1 with a Wilson 95% interval, and exact McNemar tests between paired modes.

pass@1 is the share of scored problems whose one chosen answer passed the hidden tests (one answer per problem and
mode, so pass@1 is a proportion of n Bernoulli trials). Problems whose scoring hit an infrastructure error are not
scored (reported apart). Two modes are compared on the problems both scored: b = solved by the first only, c = by
the second only; the exact McNemar test is the two-sided binomial test of b against b + c trials at 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n successes a bound is exactly 0 or 1 (centre and half are equal there, up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 x P(X <= min(b, c)), X ~ Binomial(b + c,
    1/2), capped at 1 (1 when there is no discordant pair)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class Paired:
    """Two modes on the problems both scored."""

    first: str
    second: str
    both: int  # solved by both
    first_only: int  # b
    second_only: int  # c
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.first_only + self.second_only + self.neither

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.first_only, self.second_only)


def paired(first: str, second: str, solved_first: dict[str, bool], solved_second: dict[str, bool]) -> Paired:
    """`solved_*`: problem -> passed, for the problems each mode scored."""
    common = solved_first.keys() & solved_second.keys()
    pairs = [(solved_first[p], solved_second[p]) for p in common]
    return Paired(
        first,
        second,
        both=sum(a and b for a, b in pairs),
        first_only=sum(a and not b for a, b in pairs),
        second_only=sum(b and not a for a, b in pairs),
        neither=sum(not a and not b for a, b in pairs),
    )
