"""Drift judgement as numbers: PSI against a hand computation, rate changes against the binomial
noise they must beat, and what the response_model column says about snapshots."""

from __future__ import annotations

import math

import pytest

from processors.drift import (
    PSI_EPSILON,
    ServedBy,
    is_pinned,
    psi,
    psi_reading,
    rate_change,
    relative_change,
    version_findings,
)


def _quantiles(values: list[float], n: int = 100) -> list[float]:
    """Evenly spaced mid-quantiles, as drift_by_model.sql asks the rollup for (0.005, 0.015, ...)."""
    s = sorted(values)
    return [s[min(len(s) - 1, int((k + 0.5) / n * len(s)))] for k in range(n)]


def test_identical_distributions_have_zero_psi() -> None:
    q = _quantiles([float(v) for v in range(1000)])
    assert psi(q, q) == pytest.approx(0.0, abs=1e-12)
    assert psi_reading(psi(q, q)) == "stable"


def test_psi_matches_a_hand_computation() -> None:
    # baseline: 0..999 → deciles at 100, 200, ... 900; window: every point shifted by +100, so
    # the first decile bin is empty, bins 2..9 keep 10% each, the last bin gets 20%
    base = _quantiles([float(v) for v in range(1000)])
    window = [v + 100 for v in base]
    shares_b = [0.1] * 10
    shares_w = [PSI_EPSILON] + [0.1] * 8 + [0.2]
    expected = sum((w - b) * math.log(w / b) for b, w in zip(shares_b, shares_w, strict=True))
    assert psi(base, window) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.2 and psi_reading(expected) == "significant"


def test_a_small_shift_is_moderate_or_stable_not_significant() -> None:
    base = _quantiles([float(v) for v in range(1000)])
    assert psi_reading(psi(base, [v + 30 for v in base])) in {"stable", "moderate"}


def test_tied_integer_lengths_merge_bins_instead_of_dividing_by_nothing() -> None:
    base = [5.0] * 90 + [6.0] * 10  # output lengths often tie: only two distinct edges survive
    assert psi(base, base) == pytest.approx(0.0, abs=1e-12)
    assert psi(base, [6.0] * 100) > 0.2
    assert psi([], base) is None and psi_reading(None) == "no data"


def test_relative_change_of_a_level() -> None:
    c = relative_change("output_tokens_avg", 200.0, 260.0, 0.2)
    assert c.drifted and c.detail == "+30.0%"
    assert not relative_change("output_tokens_avg", 200.0, 230.0, 0.2).drifted
    assert relative_change("output_tokens_avg", 0.0, 10.0, 0.2).detail == "no data"


def test_a_rate_change_must_beat_binomial_noise() -> None:
    # 2% → 4%: the same move, over 50 calls and over 5,000
    small = rate_change("refusal_rate", 0.02, 0.04, 50, 0.02)
    big = rate_change("refusal_rate", 0.02, 0.04, 5000, 0.02)
    se_small = math.sqrt(0.02 * 0.98 / 50)  # 0.0198: three of them are 0.059 > the 0.02 move
    se_big = math.sqrt(0.02 * 0.98 / 5000)  # 0.00198: 0.02 is ten of them
    assert 3 * se_small > 0.02 and 3 * se_big < 0.02
    assert not small.drifted and big.drifted and big.detail == "+2.0 pts"
    # beyond noise but under the minimum move that matters
    assert not rate_change("refusal_rate", 0.02, 0.03, 1_000_000, 0.02).drifted


@pytest.mark.parametrize(
    ("model", "pinned"),
    [
        ("gpt-4o-2024-08-06", True),
        ("claude-3-5-haiku-20241022", True),
        ("claude-3-5-sonnet@20240620", True),
        ("gemini-1.5-pro-002", True),
        ("anthropic.claude-3-haiku-20240307-v1:0", True),
        ("gpt-3.5-turbo-0125", True),
        ("gpt-4o", False),
        ("gpt-4o-mini", False),
        ("claude-3-5-sonnet-latest", False),
        ("gemini-2.0-flash", False),
    ],
)
def test_pinned_snapshots_and_moving_aliases(model: str, pinned: bool) -> None:
    assert is_pinned(model) is pinned


def test_a_new_snapshot_in_the_window_is_a_switch() -> None:
    served = [
        ServedBy("gpt-4o-mini-2024-07-18", 900, first_seen=0.0, last_seen=950.0),
        ServedBy("gpt-4o-mini-2025-10-28", 120, first_seen=910.0, last_seen=1000.0),
    ]
    found = version_findings("gpt-4o-mini", served, window_start=900.0)
    kinds = [f.kind for f in found]
    assert kinds == ["switched", "unpinned"]
    assert "gpt-4o-mini-2025-10-28" in found[0].detail and "120 calls" in found[0].detail
    # the same snapshots, but the new one already served the baseline: not a switch in this window
    assert [f.kind for f in version_findings("gpt-4o-mini", served, window_start=920.0)] == ["unpinned"]
    # nothing served the baseline at all (a new model): nothing to have switched from
    assert version_findings("gpt-4o-mini", served[1:], window_start=900.0)[0].kind == "unpinned"


def test_a_switch_after_a_pinned_reference_period_is_found_even_before_the_window() -> None:
    served = [
        ServedBy("gpt-4o-mini-2024-07-18", 900, first_seen=0.0, last_seen=700.0),  # the signed-off week
        ServedBy("gpt-4o-mini-2025-10-28", 300, first_seen=750.0, last_seen=1000.0),  # since the gap
    ]
    # reference [0, 500), window [900, 1000): the new snapshot appeared at 750, in between
    found = version_findings("gpt-4o-mini", served, window_start=900.0, baseline_end=500.0)
    assert [f.kind for f in found] == ["switched", "unpinned"] and "2025-10-28" in found[0].detail
    # a trailing baseline ending where the window starts saw it already: not news in this window
    assert [f.kind for f in version_findings("gpt-4o-mini", served, window_start=900.0)] == ["unpinned"]
    # a snapshot that served only the gap and stopped is no switch either
    gone = [served[0], ServedBy("gpt-4o-mini-2025-10-28", 3, first_seen=750.0, last_seen=760.0)]
    assert [f.kind for f in version_findings("gpt-4o-mini", gone, 900.0, baseline_end=500.0)] == ["unpinned"]


def test_an_alias_is_reported_even_when_no_response_model_says_what_served_it() -> None:
    (found,) = version_findings("gpt-4o", [], window_start=5.0)
    assert found.kind == "unpinned" and "gpt-4o is an alias with no pinned snapshot" in found.detail
    echoed = [ServedBy("gpt-4o", 10, 0.0, 10.0)]  # the provider echoes the alias back
    assert [f.kind for f in version_findings("gpt-4o", echoed, window_start=5.0)] == ["unpinned"]
    assert version_findings("gpt-4o-2024-08-06", [], window_start=5.0) == []


def test_a_pinned_model_served_by_itself_reports_nothing() -> None:
    served = [ServedBy("gpt-4o-2024-08-06", 10, 0.0, 10.0)]
    assert version_findings("gpt-4o-2024-08-06", served, window_start=5.0) == []


def test_drift_memory_learns_then_compares_with_its_trailing_windows() -> None:
    from processors.drift import DriftMemory
    from processors.sketch import QuantileSketch

    def sketch(values: range | list[int]) -> QuantileSketch:
        s = QuantileSketch()
        s.extend([float(v) for v in values])
        return s

    memory = DriftMemory(baseline=4, warmup=2)
    first = memory.observe(sketch(range(100)), {"a"}, 100)
    assert first == {"output_tokens_psi": None, "response_models_new": None}  # learning
    memory.observe(sketch(range(100)), {"a"}, 100)
    same = memory.observe(sketch(range(100)), {"a"}, 100)
    assert same["output_tokens_psi"] == pytest.approx(0.0, abs=0.01) and same["response_models_new"] == 0.0
    moved = memory.observe(sketch(range(100, 200)), {"a", "b"}, 100)
    assert moved["output_tokens_psi"] is not None and moved["output_tokens_psi"] > 1.0
    assert moved["response_models_new"] == 1.0
    assert memory.observe(sketch([]), set(), 0) == {"output_tokens_psi": None, "response_models_new": None}
    # "b" stays known while it is inside the trailing windows; "a" is forgotten once it is not
    for _ in range(5):
        memory.observe(sketch(range(100)), {"b"}, 100)
    assert memory.observe(sketch(range(100)), {"a", "b"}, 100)["response_models_new"] == 1.0


def test_a_rate_near_100_percent_is_not_certainty_and_a_small_baseline_is_noisy() -> None:
    # one invalid output of 50 after a perfect baseline: 100% → 98% is not drift
    assert not rate_change("schema_valid_rate", 1.0, 0.98, 50, 0.01).drifted
    # 2% → 6% over 400 calls beats a known baseline (se 0.7 pts) but not one measured on 60 calls
    assert rate_change("refusal_rate", 0.02, 0.06, 400, 0.02).drifted
    assert not rate_change("refusal_rate", 0.02, 0.06, 400, 0.02, n_baseline=60).drifted
    # the demo's refusal regression, both sides 400 calls: pooled p 6%, se 1.7 pts, +8 pts is 4.8 of them
    assert rate_change("refusal_rate", 0.02, 0.10, 400, 0.02, n_baseline=400).drifted
