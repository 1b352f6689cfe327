"""The spending-cap policy (services/orchestrator/caps.py) and its setting: pure, no servers."""

from __future__ import annotations

import pytest

from services.common.settings import SettingsError, load_settings
from services.orchestrator.caps import HOUR, Caps, Limit, Usage, check, limits, report
from services.orchestrator.settings import OrchestratorSettings

CAPS = {
    "deliberator": Caps(deliberations_per_minute=2, tokens_per_day=1000),
    "product-owner": Caps(deliberations_per_minute=5, tokens_per_day=500),
    "admin": Caps(),
}
DEV = frozenset({"deliberator"})
NOW = 100 * HOUR + 30.0  # half a minute into hour 100


def test_a_caller_gets_the_most_generous_cap_among_its_roles_and_unlimited_wins():
    assert limits(DEV, CAPS) == (Limit(2, "deliberator"), Limit(1000, "deliberator"))
    both = frozenset({"deliberator", "product-owner"})
    assert limits(both, CAPS) == (Limit(5, "product-owner"), Limit(1000, "deliberator"))
    assert limits(frozenset({"deliberator", "admin"}), CAPS) == (Limit(0, "admin"), Limit(0, "admin"))
    assert limits(frozenset({"viewer"}), CAPS) == (Limit(), Limit())  # no entry: not capped
    assert limits(DEV, {}) == (Limit(), Limit())  # authentication off: no caps at all


def test_deliberations_per_minute_refused_at_the_cap_with_when_it_resets():
    assert check(Usage("dana", started=1, window_left=40.0, now=NOW), DEV, CAPS) is None
    refusal = check(Usage("dana", started=2, window_left=39.2, now=NOW), DEV, CAPS)
    assert refusal is not None
    assert (refusal.limit, refusal.used, refusal.cap, refusal.resets_in) == (
        "deliberations_per_minute",
        2,
        Limit(2, "deliberator"),
        40,
    )
    text = refusal.message("dana@example.com")
    assert "dana@example.com" in text and "2 deliberations started this minute" in text and "cap is 2" in text
    assert "resets in 40 s" in text and "role deliberator" in text
    meta = refusal.metadata(NOW)
    assert meta["resets_in_seconds"] == "40" and meta["resets_at_unix"] == str(int(NOW) + 40)
    assert meta["caller"] == "dana" and meta["limit"] == "deliberations_per_minute"
    assert check(Usage("root", started=99, window_left=1.0, now=NOW), frozenset({"admin"}), CAPS) is None


def test_tokens_over_a_rolling_day_reset_as_the_oldest_hours_leave_it():
    # 600 tokens 23 hours ago (leaves the day at hour 101), 300 two hours ago, 200 this hour: 1100 >= 1000.
    usage = Usage("dana", tokens_by_hour={77: 600, 98: 300, 100: 200}, now=NOW)
    assert usage.tokens == 1100
    refusal = check(usage, DEV, CAPS)
    assert refusal is not None and refusal.limit == "tokens_per_day" and refusal.used == 1100
    assert refusal.resets_in == HOUR - 30  # when hour 77 leaves: 500 < 1000
    assert "1100 tokens spent in the last 24 h" in refusal.message() and "resets in 3570 s" in refusal.message()
    # Two hours must leave before it falls below the cap.
    assert Usage("dana", tokens_by_hour={77: 100, 80: 500, 100: 600}, now=NOW).tokens_below(1000) == 4 * HOUR - 30
    assert check(Usage("dana", tokens_by_hour={100: 999}, now=NOW), DEV, CAPS) is None
    assert report(usage, DEV, CAPS).tokens_last_day == 1100


def test_spending_caps_setting_over_the_defaults_and_a_bad_value_names_the_variable(monkeypatch):
    defaults = load_settings(OrchestratorSettings).spending_caps
    assert (defaults["deliberator"].deliberations_per_minute, defaults["deliberator"].tokens_per_day) == (10, 2_000_000)
    assert defaults["admin"].deliberations_per_minute == 0 and defaults["service"].tokens_per_day == 0
    monkeypatch.setenv("SPENDING_CAPS", '{"deliberator": {"deliberations_per_minute": 2}}')
    caps = load_settings(OrchestratorSettings).spending_caps
    assert caps["deliberator"].deliberations_per_minute == 2 and caps["deliberator"].tokens_per_day == 2_000_000
    assert caps["product-owner"].deliberations_per_minute == 10
    for bad in ('{"deliberator": {"deliberations_per_minute": -1}}', '{"boss": {}}', '{"admin": {"per_hour": 1}}'):
        monkeypatch.setenv("SPENDING_CAPS", bad)
        with pytest.raises(SettingsError, match="SPENDING_CAPS"):
            load_settings(OrchestratorSettings)
