"""The detection benchmark's gate, on the committed curves (bench/detection/curves, real
torchtitan CPU runs made by bench/detection/generate.py): the project's detectors and policy,
through `replay`, must act on every diverged event and raise nothing on clean runs.

Also checks the labeling rule and the anchors on hand-made curves, so a broken rule cannot
make the gate pass by labeling nothing as diverged.
"""

from __future__ import annotations

import math

import pytest

from bench.detection import labels as L
from bench.detection.anchors import foundry_kill_loss_spike, megatron_nan_and_10x, olmo_skip_step
from bench.detection.matrix import runs
from bench.detection.score import CURVES, PROJECT, score

AVAILABLE = [r for r in runs() if (CURVES / f"{r.id}.jsonl.gz").is_file()
             and (CURVES / f"{r.twin}.jsonl.gz").is_file()]


@pytest.fixture(scope="module")
def tallies():
    if not any(r.kind != "clean" for r in AVAILABLE):
        pytest.fail("no committed benchmark curves: run `python -m bench.detection.generate`")
    return score(AVAILABLE)[0]


#: A ratchet, not a pass: the diverged events the detectors miss on the committed curves (the
#: issue asks for none; any other miss fails, and catching one of these must remove it here).
#: Seeds 1-4 have none since the landing-damage and stuck-high rules (loss_spike.py),
#: which caught the two misses of seeds 3-4 (a 100 % corrupt 10-step window that landed on trend; an
#: LR x300 blow-up still 2.9x its median at patience) after those seeds were retired into tuning.
KNOWN_MISSES = {
    # found by the one scoring of the fresh test half (seeds 5-6, 2026-12-02), not tuned on:
    # an LR x100 one-step spike that never lifted the loss 20 % over its median (the guard skipped
    # two blown-up gradients) yet ends 23 % above its twin 40 steps later. Its burst moved the
    # weights 99 extra steps, where x100 one-step bursts are benign in 3 of 4 (lr_burst.py)
    "tiny-lr0.0008-s6-p03-lr_spike",
    # (the two LR x100 10-step misses of seeds 6 and 7 are caught since the LR-burst rule,
    # 2026-12-02, tuned on seeds 1-10, at the burst's end: delay 10)
    # found by the one scoring of the fifth test half (seeds 11-12, 2026-12-02), not tuned on: the
    # same class, an LR x100 3-step spike of the tiny model at 8e-4 (a burst of 297 extra steps, where
    # x100 for 3 steps diverged in 1 of 4 tuning runs) cooled at patience, back in band at step 83,
    # ending 19 % above its twin
    "tiny-lr0.0008-s12-p07-lr_spike",
}


def test_every_diverged_event_is_acted_on(tallies):
    t = tallies[PROJECT]
    assert t.diverged > 0, "the committed set has no diverged event: the gate would be vacuous"
    assert set(t.misses) <= KNOWN_MISSES, f"diverged events not acted on: {set(t.misses) - KNOWN_MISSES}"
    assert set(t.misses) == KNOWN_MISSES, "a known miss is caught now: remove it from KNOWN_MISSES"


#: The same ratchet for heavy actions (rollback, stop) on benign events (recovered / no effect):
#: the issue allows at most 1 per 28; any new one fails, and one no longer taken must go.
KNOWN_FALSE_HEAVY = {
    # test half, seeds 5-6: a 25 % corrupt 10-step window whose spike opened at 1.97x its median
    # (the tuning half's reached 1.23x); landed_after_damage rolled it back, it came back by itself
    "tiny-lr0.002-s5-p21-bad_batch",
    # seeds 9-10 (retired into tuning unscored, matrix.py): the 6-layer model's LR x100 10-step
    # burst (990 extra steps) came back within 37 steps, where the tiny model's four never did; on
    # its own curve it looks like them (loss 1.2-1.6x, grad norm 4-7x its median), so the LR-burst
    # rule rolls it back at the burst's end
    "deep6-lr0.0008-s9-p13-lr_spike",
    # seeds 9-10: a held LR x100 drift on the tiny model at 8e-4 whose spike ended a grad-norm rise
    # of 1.47x (the drift rule, bar 1.3x; diverged drifts rose 1.39-1.76x) and came back by itself
    "tiny-lr0.0008-s10-p24-drift",
    # (seeds 7-8's and 9-10's 10 fully corrupt steps at LR 2e-3, stuck high at patience, are a cool
    # since the stuck-high rule also needs the grad norm there >= 5x its median: theirs had fallen to
    # 0.9x and 2.8x, the LR blow-ups' stayed at 9.6-19x)
}


def test_heavy_actions_on_benign_events_do_not_grow(tallies):
    t = tallies[PROJECT]
    got = {entry.split(" ")[0] for entry in t.false_heavy}
    assert got <= KNOWN_FALSE_HEAVY, f"new heavy actions on benign events: {sorted(got - KNOWN_FALSE_HEAVY)}"
    assert got == KNOWN_FALSE_HEAVY, "a known false heavy action is gone: remove it from KNOWN_FALSE_HEAVY"


def test_no_alarm_on_clean_runs(tallies):
    t = tallies[PROJECT]
    assert t.clean > 0
    assert t.clean_alarms == 0, t.alarms


def test_label_rule_on_hand_made_curves():
    clean = {s: 6.0 * math.exp(-s / 60) + 2.0 for s in range(1, 141)}
    spike = {**clean, **{50: clean[50] * 3}}
    slow = {s: v * (1 + (0.3 * math.exp(-(s - 50) / 8) if s >= 50 else 0)) for s, v in clean.items()}
    stuck = {s: v * (1.4 if s >= 50 else 1.0) for s, v in clean.items()}
    nan = {**clean, **{s: float("nan") for s in range(61, 141)}}
    assert L.label(clean, clean, 50, 50)[0] == L.NO_EFFECT
    assert L.label(spike, clean, 50, 50)[0] == L.NO_EFFECT  # one step: the 5-step median ignores it
    assert L.label(slow, clean, 50, 50)[0] == L.RECOVERED
    assert L.label(stuck, clean, 50, 50)[0] == L.DIVERGED
    assert L.label(nan, clean, 60, 60) == (L.DIVERGED, {"first_non_finite_step": 61})


def curve(losses, grads=None):
    return [{"step": s, "loss": v, "grad_norm": (grads or {}).get(s, 1.0)} for s, v in losses.items()]


def test_anchor_rules_act_as_published():
    flat = {s: 3.0 for s in range(1, 101)}
    five_high = {**flat, **{s: 7.0 for s in range(50, 55)}}
    four_high = {**flat, **{s: 7.0 for s in range(50, 54)}}
    assert foundry_kill_loss_spike(curve(five_high)) == [(54, "heavy")]  # > patience 4 in a row
    assert foundry_kill_loss_spike(curve(four_high)) == []
    assert megatron_nan_and_10x(curve({**flat, **{60: 31.0}})) == [(60, "heavy")]
    assert megatron_nan_and_10x(curve({**flat, **{60: float("nan")}})) == [(60, "heavy")]
    assert megatron_nan_and_10x(curve(five_high)) == []
    noisy = {s: 3.0 + 0.01 * (s % 7) for s in range(1, 101)}
    assert olmo_skip_step(curve({**noisy, **{70: 4.0}})) == [(70, "light")]
