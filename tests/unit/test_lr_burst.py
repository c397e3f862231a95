"""LrBurstTracker: what counts as an off-schedule LR burst and how far it moved the weights."""

from __future__ import annotations

import math

import pytest

from supervisor.detect.lr_burst import Burst, LrBurstTracker

PEAK = 1e-3


def warmup_then_cosine(step: int, warmup: int = 50, total: int = 400) -> float:
    if step <= warmup:
        return PEAK * step / warmup
    return PEAK * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def run(lrs, scales=None, skipped=()) -> list[Burst]:
    t = LrBurstTracker()
    out = []
    for i, lr in enumerate(lrs):
        b = t.observe(i + 1, lr, 1.0 if scales is None else scales[i], (i + 1) in skipped)
        if b is not None:
            out.append(b)
    return out


def test_warmup_and_decay_are_never_bursts():
    assert run([warmup_then_cosine(s) for s in range(1, 401)]) == []


def test_a_warm_restart_back_to_the_peak_is_not_a_burst():
    """SGDR: the LR falls to ~0 and jumps back to the schedule's peak; the peak is the reference."""
    lrs = [warmup_then_cosine(s) for s in range(1, 400)] + [warmup_then_cosine(s) for s in range(51, 400)]
    assert run(lrs) == []


def test_the_supervisors_own_scale_is_divided_out():
    """A cool to x0.05 and a re-warm back to x1 over 5 steps: the record's LR jumps 20x, the schedule did not."""
    scales = [1.0] * 100 + [0.05] * 50 + [0.2, 0.4, 0.6, 0.8] + [1.0] * 50
    lrs = [PEAK * s for s in scales]
    assert run(lrs, scales) == []


def test_a_burst_is_measured_when_it_ends():
    lrs = [PEAK] * 60 + [100 * PEAK] * 10 + [PEAK] * 5
    [b] = run(lrs)
    assert (b.start, b.end) == (61, 70)
    assert b.peak_factor == pytest.approx(100.0) and b.displacement == pytest.approx(990.0)


def test_skipped_updates_moved_nothing():
    lrs = [PEAK] * 60 + [100 * PEAK] * 3 + [PEAK] * 5
    [b] = run(lrs, skipped={61, 62})
    assert b.displacement == pytest.approx(99.0) and (b.start, b.end) == (61, 63)


def test_a_raised_lr_that_holds_is_a_new_level_not_a_burst():
    """A held x10 (a changed config): dropped after max_steps; later the level is the schedule."""
    lrs = [PEAK] * 60 + [10 * PEAK] * 100 + [PEAK] * 10 + [10 * PEAK] * 5 + [PEAK] * 5
    assert run(lrs) == []


def test_nothing_is_judged_before_min_history_and_bad_numbers_are_ignored():
    """The first warm-up steps double the LR; a non-finite LR or a zero scale (a re-warm's first
    step) is not a step of the schedule."""
    assert run([PEAK * s / 100 for s in range(1, 9)] + [PEAK] * 20) == []
    t = LrBurstTracker()
    for s in range(1, 30):
        assert t.observe(s, PEAK, 1.0, False) is None
    assert t.observe(30, math.nan, 1.0, False) is None
    assert t.observe(31, 100 * PEAK, 0.0, False) is None
    assert t.observe(32, math.inf, 1.0, False) is None
    assert t.peak == PEAK


def test_a_level_that_ended_leaves_the_reference_after_the_peak_window():
    """An operator's 30-step x10 experiment is a level, not a burst; once the LR is back, the
    reference forgets it after `peak_window` steps, so a later x100 burst is seen again (an
    all-time peak would have been 10x higher for the rest of the run)."""
    burst = [100 * PEAK] * 10
    lrs = [PEAK] * 60 + [10 * PEAK] * 30 + [PEAK] * 50 + burst + [PEAK] * 300 + burst + [PEAK] * 2
    first, second = run(lrs)
    # the first x100 came while the x10 level was still in the window: only 10x that reference
    assert (first.start, first.peak_factor, first.displacement) == (141, pytest.approx(10.0), pytest.approx(90.0))
    assert second.start == 60 + 30 + 50 + 10 + 300 + 1
    assert second.peak_factor == pytest.approx(100.0) and second.displacement == pytest.approx(990.0)
