"""Young/Daly checkpoint interval: hand computations, step conversion, MTBF estimate."""

from __future__ import annotations

import math

import pytest

from supervisor.checkpoint_interval import (
    daly_seconds,
    expected_waste_fraction,
    mtbf_from_failures,
    recommend_interval_steps,
    young_daly_seconds,
)

C, MTBF = 60.0, 8 * 3600.0  # 60 s saves, one failure every 8 hours


def test_young_matches_hand_computation():
    # sqrt(2 * 60 * 28800) = sqrt(3_456_000) = 1859.03 s (~31 min)
    assert young_daly_seconds(C, MTBF) == pytest.approx(1859.03, abs=0.01)
    assert young_daly_seconds(0.0, MTBF) == 0.0


def test_daly_matches_hand_computation_and_is_close_to_young_when_saves_are_cheap():
    x = 60.0 / (2 * 28800.0)
    expected = math.sqrt(2 * 60.0 * 28800.0) * (1 + math.sqrt(x) / 3 + x / 9) - 60.0
    assert daly_seconds(C, MTBF) == pytest.approx(expected, rel=1e-12)
    assert daly_seconds(C, MTBF) == pytest.approx(1819.3, abs=0.1)
    assert abs(daly_seconds(C, MTBF) / young_daly_seconds(C, MTBF) - 1) < 0.05


def test_daly_caps_at_mtbf_when_saves_cost_more_than_two_mtbf():
    assert daly_seconds(1000.0, 400.0) == 400.0


def test_young_interval_minimises_expected_waste():
    tau = young_daly_seconds(C, MTBF)
    best = expected_waste_fraction(tau, C, MTBF)
    assert best == pytest.approx(math.sqrt(2 * C / MTBF), rel=1e-9)
    for other in (tau / 3, tau / 1.5, tau * 1.5, tau * 3):
        assert expected_waste_fraction(other, C, MTBF) > best


def test_recommend_converts_to_steps_and_records_inputs():
    rec = recommend_interval_steps(C, MTBF, step_seconds=10.0, min_steps=10, max_steps=10_000)
    assert rec.seconds == pytest.approx(1859.03, abs=0.01)
    assert rec.steps == 186  # round(185.9)
    assert rec.clamped is None
    assert rec.effective_seconds == pytest.approx(1860.0)
    assert rec.inputs == {"save_cost_s": 60.0, "mtbf_s": 28800.0, "step_seconds": 10.0,
                          "min_steps": 10.0, "max_steps": 10_000.0}
    assert "sqrt(2 * C * MTBF)" in rec.formula
    assert rec.expected_waste_fraction == pytest.approx(60 / 1860 + 1860 / (2 * 28800), rel=1e-9)


def test_recommend_with_daly_formula():
    rec = recommend_interval_steps(C, MTBF, step_seconds=10.0, formula="daly")
    assert rec.steps == round(daly_seconds(C, MTBF) / 10.0) == 182
    assert "Daly" in rec.formula


def test_recommend_clamps_to_bounds():
    low = recommend_interval_steps(C, MTBF, step_seconds=10.0, min_steps=500, max_steps=1000)
    assert (low.steps, low.clamped) == (500, "min_steps")
    assert low.seconds == pytest.approx(1859.03, abs=0.01)  # the optimum is still reported
    high = recommend_interval_steps(C, MTBF, step_seconds=10.0, min_steps=1, max_steps=100)
    assert (high.steps, high.clamped) == (100, "max_steps")
    # a free save still checkpoints at least every step, never every 0 steps
    assert recommend_interval_steps(0.0, MTBF, step_seconds=10.0).steps == 1


@pytest.mark.parametrize("kwargs", [
    dict(save_cost_s=-1.0, mtbf_s=MTBF, step_seconds=1.0),
    dict(save_cost_s=C, mtbf_s=0.0, step_seconds=1.0),
    dict(save_cost_s=C, mtbf_s=math.inf, step_seconds=1.0),
    dict(save_cost_s=C, mtbf_s=MTBF, step_seconds=0.0),
    dict(save_cost_s=C, mtbf_s=MTBF, step_seconds=1.0, min_steps=0),
    dict(save_cost_s=C, mtbf_s=MTBF, step_seconds=1.0, min_steps=10, max_steps=5),
    dict(save_cost_s=C, mtbf_s=MTBF, step_seconds=1.0, formula="magic"),
])
def test_recommend_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        recommend_interval_steps(**kwargs)


def test_mtbf_is_observed_time_over_failures_in_window():
    # 3 failures in one hour -> 1200 s
    assert mtbf_from_failures([100.0, 200.0, 3000.0], observed_since=0.0, now=3600.0) == 1200.0
    # failures before the window or after `now` do not count
    assert mtbf_from_failures([-50.0, 100.0, 5000.0], observed_since=0.0, now=3600.0) == 3600.0


def test_mtbf_without_failures_uses_prior_or_none():
    assert mtbf_from_failures([], observed_since=0.0, now=3600.0) is None
    assert mtbf_from_failures([-1.0], observed_since=0.0, now=3600.0, prior_mtbf_s=86400.0) == 86400.0


def test_mtbf_rejects_inverted_window():
    with pytest.raises(ValueError):
        mtbf_from_failures([1.0], observed_since=10.0, now=10.0)
    with pytest.raises(ValueError):
        mtbf_from_failures([], observed_since=0.0, now=1.0, prior_mtbf_s=0.0)


def test_end_to_end_from_failure_history():
    mtbf = mtbf_from_failures([3600.0 * k for k in (5, 13, 21)], observed_since=0.0, now=24 * 3600.0)
    assert mtbf == 8 * 3600.0
    assert recommend_interval_steps(C, mtbf, step_seconds=5.0).steps == round(1859.03 / 5.0)
