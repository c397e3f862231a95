"""ConvergenceWatch on synthetic loss curves L(t) = a + b·exp(−t/τ) with per-step noise."""

from __future__ import annotations

import math
import random

import pytest

from supervisor.detect.convergence import (
    ConvergenceWatch,
    isotonic_non_increasing,
    reference_from_spool_lines,
)
from supervisor.detect.findings import SLOW_CONVERGENCE, WARNING, Finding
from supervisor.protocol import StepRecord

TOKENS_PER_STEP = 8 * 4096
TAU = 40  # steps: the reference reaches a + b·e^-3 at step 120, like the tiny CPU drill


def curve(tau_steps: float, seed: int, steps: int, a: float = 1.2, b: float = 5.0, noise: float = 0.03,
          start: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for s in range(start, start + steps):
        tokens = s * TOKENS_PER_STEP
        loss = (a + b * math.exp(-tokens / (tau_steps * TOKENS_PER_STEP))) * (1 + rng.gauss(0, noise))
        out.append({"run_id": "r", "generation": 0, "step": s, "loss": loss, "grad_norm": 1.0, "lr": 8e-4,
                    "lr_scale": 1.0, "tokens_per_s": 1.0, "step_seconds": 1.0, "tokens_seen": tokens,
                    "wall_time": 1.7e9 + s})
    return out


def run(watch: ConvergenceWatch, records: list[dict]) -> list[Finding]:
    return [f for rec in records for f in watch.observe(rec)]


@pytest.fixture(scope="module")
def reference() -> list[tuple[float, float]]:
    return reference_from_spool_lines(curve(TAU, seed=0, steps=400))


# --- the reference curve ----------------------------------------------------------------------


def test_reference_is_monotone_and_skips_unusable_records():
    recs = curve(TAU, seed=0, steps=100)
    recs[10] = {**recs[10], "loss": float("nan")}
    recs[20] = {**recs[20], "loss": 99.0, "update_skipped": True}
    recs[30] = {**recs[30], "tokens_seen": 0}
    recs.insert(40, {"kind": "checkpoint_saved", "step": 40, "seconds": 1.0, "wall_time": 1.0})
    ref = reference_from_spool_lines(recs)
    assert len(ref) == 97  # 100 records minus NaN, skipped update, missing tokens
    losses = [loss for _, loss in ref]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert max(losses) < 99.0  # the skipped update's loss never entered
    tokens = [t for t, _ in ref]
    assert tokens == sorted(tokens) and 11 * TOKENS_PER_STEP not in tokens


def test_reference_after_a_rollback_keeps_the_newer_timeline():
    first = curve(TAU, seed=0, steps=60)
    # the reference run rolled back to step 40 and redid steps 41..80 with much lower losses
    redo = [{**r, "loss": 0.5} for r in curve(TAU, seed=1, steps=40, start=41)]
    ref = reference_from_spool_lines(first + redo, smoothing_window=1)
    assert [t for t, _ in ref] == [s * TOKENS_PER_STEP for s in range(1, 81)]
    assert ref[-1][1] == 0.5


def test_reference_accepts_step_record_models():
    recs = [StepRecord.model_validate(r) for r in curve(TAU, seed=0, steps=30)]
    assert len(reference_from_spool_lines(recs)) == 30


def test_reference_needs_two_usable_points():
    with pytest.raises(ValueError, match="fewer than two"):
        reference_from_spool_lines([{"step": 1, "loss": float("inf"), "tokens_seen": 10}])


def test_isotonic_fit_averages_violations_instead_of_taking_the_minimum():
    assert isotonic_non_increasing([3.0, 1.0, 2.0]) == [3.0, 1.5, 1.5]
    assert isotonic_non_increasing([5.0, 4.0, 4.0, 1.0]) == [5.0, 4.0, 4.0, 1.0]
    # a noisy plateau settles near its mean, not at its lowest point
    rng = random.Random(3)
    plateau = [1.2 + rng.gauss(0, 0.03) for _ in range(400)]
    fit = isotonic_non_increasing(plateau)
    assert min(plateau) < 1.13 and abs(fit[len(fit) // 2] - 1.2) < 0.02


def test_tokens_to_reach_interpolates_first_crossing():
    w = ConvergenceWatch([(100.0, 5.0), (200.0, 4.0), (250.0, 4.0), (300.0, 3.0)])
    assert w.reference_tokens_to_reach(3.5) == pytest.approx(250.0)  # between 200 (4.0) and 300 (3.0)
    assert w.reference_tokens_to_reach(4.0) == pytest.approx(200.0)  # first time, not the plateau's end
    assert w.reference_tokens_to_reach(9.0) == 100.0  # above the start: the first point
    assert w.reference_tokens_to_reach(2.9) is None  # never reached
    assert w.reference_min_loss == 3.0


# --- live runs ---------------------------------------------------------------------------------


def test_run_needing_2_5x_the_tokens_is_flagged_once_well_before_step_150(reference):
    watch = ConvergenceWatch(reference)
    findings = run(watch, curve(TAU * 2.5, seed=7, steps=400))
    assert len(findings) == 1
    f = findings[0]
    assert (f.kind, f.severity) == (SLOW_CONVERGENCE, WARNING)
    cfg = watch.config
    assert cfg.warmup_steps + cfg.patience - 1 <= f.step <= 100
    ev = f.evidence
    assert 1.8 < ev["ratio"] < 3.5 and ev["ratio"] - 1 > cfg.slowdown_threshold
    assert ev["reference_tokens"] < ev["tokens"] == f.step * TOKENS_PER_STEP
    assert ev["consecutive"] == cfg.patience
    assert watch.reference_tokens_to_reach(ev["compared_loss"]) == pytest.approx(ev["reference_tokens"])
    assert f.wall_time == 1.7e9 + f.step
    assert Finding.from_dict(f.to_dict()) == f


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_reference_shape_with_another_seed_raises_nothing(reference, seed):
    # 600 steps: runs on past the reference's 400, over the plateau, where a naive
    # tokens-to-reach comparison would call any longer run "slow"
    assert run(ConvergenceWatch(reference), curve(TAU, seed=seed, steps=600)) == []


@pytest.mark.parametrize("tau_factor", [0.5, 1.15])
def test_faster_run_and_seed_sized_differences_raise_nothing(reference, tau_factor):
    assert run(ConvergenceWatch(reference), curve(TAU * tau_factor, seed=11, steps=400)) == []


def test_live_loss_below_anything_the_reference_reached_is_fine(reference):
    # same speed early, then a lower floor than the reference ever saw
    assert run(ConvergenceWatch(reference), curve(TAU, seed=12, steps=400, a=0.9)) == []


def test_stuck_run_is_flagged(reference):
    flat = [{**r, "loss": 6.0} for r in curve(TAU, seed=0, steps=120)]
    findings = run(ConvergenceWatch(reference), flat)
    assert len(findings) == 1 and findings[0].evidence["ratio"] > 10


def test_warmup_steps_and_tokens_delay_judgement(reference):
    late = ConvergenceWatch(reference, ConvergenceWatch.Config(warmup_steps=120))
    (f,) = run(late, curve(TAU * 2.5, seed=7, steps=400))
    assert f.step >= 120 + late.config.patience - 1
    by_tokens = ConvergenceWatch(reference, ConvergenceWatch.Config(warmup_steps=0, warmup_tokens=150 * TOKENS_PER_STEP))
    (g,) = run(by_tokens, curve(TAU * 2.5, seed=7, steps=400))
    assert g.step >= 150 + by_tokens.config.patience - 1


def test_patience_requires_consecutive_slow_records(reference):
    eager = ConvergenceWatch(reference, ConvergenceWatch.Config(patience=1))
    patient = ConvergenceWatch(reference, ConvergenceWatch.Config(patience=20))
    (e,) = run(eager, curve(TAU * 2.5, seed=7, steps=200))
    (p,) = run(patient, curve(TAU * 2.5, seed=7, steps=200))
    assert e.step == eager.config.warmup_steps  # the first judged record already counts
    assert p.step == e.step + 19


def test_raises_once_until_reset(reference):
    watch = ConvergenceWatch(reference)
    slow = curve(TAU * 2.5, seed=7, steps=300)
    assert len(run(watch, slow)) == 1
    assert run(watch, curve(TAU * 2.5, seed=8, steps=300, start=301)) == []
    watch.reset()
    assert len(run(watch, slow)) == 1


def test_rollback_restarts_the_window_and_the_streak(reference):
    slow = curve(TAU * 2.5, seed=7, steps=200)
    watch = ConvergenceWatch(reference)  # warm-up 50, window 20, patience 20
    assert run(watch, slow[:65]) == []  # streak 16 of 20 so far
    # rolled back to step 40: tokens go backwards; without a restart the streak would
    # complete at step 53
    (f,) = run(watch, slow[40:])
    assert f.step == 60 + 19  # window full again at step 60, then 20 slow records


def test_ignores_non_finite_skipped_and_tokenless_records(reference):
    watch = ConvergenceWatch(reference)
    slow = curve(TAU * 2.5, seed=7, steps=400)
    junk = []
    for r in slow:
        junk.append(r)
        junk.append({**r, "loss": float("nan")})
        junk.append({**r, "loss": 50.0, "update_skipped": True})
        junk.append({**r, "loss": 50.0, "tokens_seen": 0})
    (f,) = run(watch, junk)
    (g,) = run(ConvergenceWatch(reference), slow)
    assert f.step == g.step and f.evidence == g.evidence


def test_accepts_step_record_models(reference):
    recs = [StepRecord.model_validate(r) for r in curve(TAU * 2.5, seed=7, steps=150)]
    assert len(run(ConvergenceWatch(reference), recs)) == 1


def test_bad_config_and_reference_are_rejected():
    with pytest.raises(ValueError):
        ConvergenceWatch([(1.0, 2.0), (2.0, 1.0)], ConvergenceWatch.Config(slowdown_threshold=0))
    with pytest.raises(ValueError):
        ConvergenceWatch([(1.0, 2.0), (2.0, 1.0)], ConvergenceWatch.Config(patience=0))
    with pytest.raises(ValueError):
        ConvergenceWatch([(2.0, 2.0), (1.0, 1.0)])  # tokens out of order
    with pytest.raises(ValueError):
        ConvergenceWatch([])


def test_past_the_reference_end_tokens_are_capped():
    # The reference stopped at step 150, still improving. The live run tracks it (3% higher)
    # and then sits at the reference's final loss: we cannot know whether the reference would
    # have sat there too, so running longer alone must not read as "slow".
    short_ref = reference_from_spool_lines(curve(TAU, seed=0, steps=150, noise=0.0))
    live = curve(TAU, seed=0, steps=150, noise=0.0)
    live = [{**r, "loss": r["loss"] * 1.03} for r in live]
    live += [{**r, "loss": live[-1]["loss"]} for r in curve(TAU, seed=0, steps=250, start=151)]
    assert run(ConvergenceWatch(short_ref), live) == []
    # ... while a run far behind is still caught past the end (capped ratio 150/60 = 2.5)
    behind = [{**r, "loss": short_ref[59][1]} for r in curve(TAU, seed=0, steps=100, start=200)]
    (f,) = run(ConvergenceWatch(short_ref, ConvergenceWatch.Config(warmup_steps=0)), behind)
    assert f.evidence["compared_tokens"] == 150 * TOKENS_PER_STEP < f.evidence["tokens"]
    assert 2.0 < f.evidence["ratio"] < 3.0
