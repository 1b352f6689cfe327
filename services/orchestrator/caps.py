"""Spending caps (issue 13): how many deliberations a caller may start per minute, and how many tokens the
deliberations it started may spend per rolling day. Pure: the counters live behind the application's `Meter` port
(Valkey, adapters/valkey.py, so replicas share them); the caps per role come from SPENDING_CAPS.

A caller is a token subject. For each limit it gets the most generous cap among its roles (0 = unlimited wins);
roles without an entry are ignored, and a caller none of whose roles has one is not capped (the roles that may
deliberate, deliberator and admin, always have one: settings merge SPENDING_CAPS over the defaults). With
authentication off the composition root gives no caps: nothing is capped.

Deliberations started: a fixed one-minute window that opens with the caller's first start. Tokens: hourly buckets,
the last 24 summed (a rolling day at an hour's resolution); a bucket leaves the day 24 hours after its hour began.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MINUTE = 60
HOUR = 3600
DAY_HOURS = 24


@dataclass(frozen=True)
class Caps:
    """One role's caps; 0 = unlimited."""

    deliberations_per_minute: int = 0
    tokens_per_day: int = 0


@dataclass(frozen=True)
class Limit:
    """A caller's cap for one limit (0 = unlimited) and the role it came from ("" when none of its roles has one)."""

    value: int = 0
    role: str = ""


def limits(roles: frozenset[str], caps: Mapping[str, Caps]) -> tuple[Limit, Limit]:
    """(deliberations per minute, tokens per day): for each, the most generous cap among the caller's roles."""

    def most_generous(name: str) -> Limit:
        found = [Limit(getattr(caps[r], name), r) for r in sorted(roles) if r in caps]
        unlimited = [x for x in found if x.value == 0]
        return (unlimited or sorted(found, key=lambda x: -x.value) or [Limit()])[0]

    return most_generous("deliberations_per_minute"), most_generous("tokens_per_day")


@dataclass(frozen=True)
class Usage:
    """A caller's counters as read at `now` (seconds since the epoch)."""

    subject: str
    started: int = 0  # deliberations started in the current one-minute window
    window_left: float = 0.0  # seconds until that window closes (0: none open)
    tokens_by_hour: Mapping[int, int] = field(default_factory=dict)  # hour (epoch // 3600) -> tokens, the last 24
    now: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(self.tokens_by_hour.values())

    def tokens_below(self, cap: int) -> float:
        """Seconds until the rolling day's tokens fall below `cap`, as the oldest hours leave it."""
        left, at = self.tokens, self.now
        for hour in sorted(self.tokens_by_hour):
            if left < cap:
                break
            left -= self.tokens_by_hour[hour]
            at = (hour + DAY_HOURS) * HOUR
        return max(at - self.now, 0.0)


@dataclass(frozen=True)
class Refusal:
    """Why a caller may not start a deliberation now, and when that changes."""

    subject: str
    limit: str  # deliberations_per_minute | tokens_per_day
    used: int
    cap: Limit
    resets_in: int  # seconds

    def message(self, who: str = "") -> str:
        what = (
            "deliberations started this minute"
            if self.limit == "deliberations_per_minute"
            else "tokens spent in the last 24 h"
        )
        return (
            f"spending cap: {who or self.subject} has {self.used} {what}, the cap is {self.cap.value} "
            f"({self.limit} of role {self.cap.role}); resets in {self.resets_in} s"
        )

    def metadata(self, now: float) -> dict[str, str]:
        """For the ErrorInfo of the RESOURCE_EXHAUSTED status."""
        return {
            "caller": self.subject,
            "limit": self.limit,
            "used": str(self.used),
            "cap": str(self.cap.value),
            "role": self.cap.role,
            "resets_in_seconds": str(self.resets_in),
            "resets_at_unix": str(math.ceil(now) + self.resets_in),
        }


def check(usage: Usage, roles: frozenset[str], caps: Mapping[str, Caps]) -> Refusal | None:
    """Whether the caller may start one more deliberation, `usage` being its counters before it: None when it may."""
    per_minute, per_day = limits(roles, caps)
    if per_minute.value and usage.started >= per_minute.value:
        return Refusal(
            usage.subject, "deliberations_per_minute", usage.started, per_minute, max(math.ceil(usage.window_left), 1)
        )
    if per_day.value and usage.tokens >= per_day.value:
        return Refusal(
            usage.subject, "tokens_per_day", usage.tokens, per_day, max(math.ceil(usage.tokens_below(per_day.value)), 1)
        )
    return None


@dataclass(frozen=True)
class CallerUsage:
    """A caller's usage beside its caps (GetStatus)."""

    caller: str
    deliberations_this_minute: int
    deliberations_per_minute: int
    tokens_last_day: int
    tokens_per_day: int


def report(usage: Usage, roles: frozenset[str], caps: Mapping[str, Caps]) -> CallerUsage:
    per_minute, per_day = limits(roles, caps)
    return CallerUsage(usage.subject, usage.started, per_minute.value, usage.tokens, per_day.value)
