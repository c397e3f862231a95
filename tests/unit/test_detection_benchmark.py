"""The detection benchmark's gate, on the committed curves (bench/detection/curves, real
torchtitan CPU runs made by bench/detection/generate.py): the project's detectors and policy,
through `replay`, must act on every diverged event and raise nothing on clean runs.

Two gates. The default detectors against the band labels (labels.band_label, the issue's
"back in band by itself"): every diverged event acted on, heavy actions on benign events a
ratchet. `[detect.loss_spike] strict = true` against the twin labels (labels.label, which also
counts a lasting setback against the clean twin as diverged): the strict rules' own ratchets,
so they cannot rot while off by default.

Also checks both labeling rules and the anchors on hand-made curves, so a broken rule cannot
make the gate pass by labeling nothing as diverged.
"""

from __future__ import annotations

import math

import pytest

from bench.detection import labels as L
from bench.detection.anchors import foundry_kill_loss_spike, megatron_nan_and_10x, olmo_skip_step
from bench.detection.matrix import runs
from bench.detection.score import CURVES, PROJECT, score, strict_suite

AVAILABLE = [r for r in runs() if (CURVES / f"{r.id}.jsonl.gz").is_file()
             and (CURVES / f"{r.twin}.jsonl.gz").is_file()]


def _need_curves():
    if not any(r.kind != "clean" for r in AVAILABLE):
        pytest.fail("no committed benchmark curves: run `python -m bench.detection.generate`")


@pytest.fixture(scope="module")
def tallies():
    _need_curves()
    return score(AVAILABLE)[0]


@pytest.fixture(scope="module")
def strict_tallies():
    _need_curves()
    return score(AVAILABLE, rule="twin", suite_config=strict_suite())[0]


def test_every_diverged_event_is_acted_on(tallies):
    t = tallies[PROJECT]
    assert t.diverged > 0, "the committed set has no diverged event: the gate would be vacuous"
    assert t.misses == [], f"diverged events not acted on: {t.misses}"


#: A ratchet for heavy actions (rollback, stop) on benign events (recovered / no effect): the
#: issue allows at most 1 per 28; any new one fails, and one no longer taken must go.
KNOWN_FALSE_HEAVY = {
    # seeds 1-2: an LR x100 10-step burst whose loss spiked three times in 7 steps (46, 48, 51):
    # the cluster rule (3 onsets in 50 steps) rolled it back; it was back in its band at step 55
    "tiny-lr0.0008-s2-p13-lr_spike",
    # seeds 7-8: a held LR x100 drift at LR 2e-3; its spike at 97 was cooled, rose 31 % over its
    # level at patience (worsening) and was rolled back at 107; it came back in band at 115
    "tiny-lr0.002-s7-p24-drift",
}


def test_heavy_actions_on_benign_events_do_not_grow(tallies):
    t = tallies[PROJECT]
    got = {entry.split(" ")[0] for entry in t.false_heavy}
    assert got <= KNOWN_FALSE_HEAVY, f"new heavy actions on benign events: {sorted(got - KNOWN_FALSE_HEAVY)}"
    assert got == KNOWN_FALSE_HEAVY, "a known false heavy action is gone: remove it from KNOWN_FALSE_HEAVY"
    assert t.benign_heavy * 28 <= t.benign, (t.benign_heavy, t.benign)  # the 1 per 28


def test_no_alarm_on_clean_runs(tallies, strict_tallies):
    for t in (tallies[PROJECT], strict_tallies[PROJECT]):
        assert t.clean > 0
        assert t.clean_alarms == 0, t.alarms


#: Strict mode against the twin labels: the diverged events it misses (a ratchet, as above).
#: Both are the class no rule of the run's own curve separates: an LR x100 spike of 1-3 steps of
#: the tiny model at 8e-4 (x100 for 1-3 steps diverged from its twin in 1 of 4 such runs)
STRICT_KNOWN_MISSES = {
    # seeds 5-6: never lifted the loss 20 % over its median (the guard skipped two blown-up
    # gradients) yet ends 23 % above its twin 40 steps later
    "tiny-lr0.0008-s6-p03-lr_spike",
    # seeds 11-12: a 3-step burst of 297 extra steps, cooled at patience, back in band at step 83,
    # ending 19 % above its twin
    "tiny-lr0.0008-s12-p07-lr_spike",
    # sixth test half (seeds 13-14), scored once: the same class (x100 for 3 steps, back in band at
    # step 78, ending 16 % above its twin) ...
    "tiny-lr0.0008-s13-p07-lr_spike",
    # ... and the 6-layer model's LR x300 one-step spike, 2.0x its median at patience (the stuck-high
    # bar is 2.5x): cooled, back in band at step 72, ending 14 % above its twin
    "deep6-lr0.0008-s13-p04-lr_spike",
}
STRICT_KNOWN_FALSE_HEAVY = {
    # seeds 5-6: a 25 % corrupt 10-step window whose spike opened at 1.97x its median;
    # landed_after_damage rolled it back, it came back by itself
    "tiny-lr0.002-s5-p21-bad_batch",
    # seeds 9-10: the 6-layer model's LR x100 10-step burst (990 extra steps) came back within 37
    # steps, where the tiny model's four never did; the LR-burst rule rolls it back at the burst's end
    "deep6-lr0.0008-s9-p13-lr_spike",
    # seeds 9-10: a held LR x100 drift whose spike ended a grad-norm rise of 1.47x (the drift rule,
    # bar 1.3x) and came back by itself
    "tiny-lr0.0008-s10-p24-drift",
    # sixth test half (seeds 13-14), scored once: a 25 % corrupt 10-step window at LR 2e-3 again
    # (landed_after_damage, summed excess 8.5) ...
    "tiny-lr0.002-s14-p21-bad_batch",
    # ... and a held x100 drift of the 6-layer model (grad-norm rise 1.45x) that had no lasting effect
    "deep6-lr0.0008-s13-p24-drift",
}


def test_strict_rules_catch_the_setbacks_the_twin_labels_call_diverged(tallies, strict_tallies):
    t = strict_tallies[PROJECT]
    assert set(t.misses) == STRICT_KNOWN_MISSES, f"strict misses changed: {sorted(set(t.misses) ^ STRICT_KNOWN_MISSES)}"
    got = {entry.split(" ")[0] for entry in t.false_heavy}
    assert got == STRICT_KNOWN_FALSE_HEAVY, f"strict false heavy changed: {sorted(got ^ STRICT_KNOWN_FALSE_HEAVY)}"
    # the strict rules are what catch the setbacks: off, far more twin-diverged events go unacted on
    off = score(AVAILABLE, rule="twin")[0][PROJECT]
    assert len(off.misses) >= len(t.misses) + 10, (len(off.misses), len(t.misses))


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


def test_band_rule_on_hand_made_curves():
    """The band is the run's own: 10 % over the median of the 20 losses before the onset."""
    clean = {s: 6.0 * math.exp(-s / 60) + 2.0 for s in range(1, 141)}
    slow = {s: v * (1 + (0.6 * math.exp(-(s - 50) / 8) if s >= 50 else 0)) for s, v in clean.items()}
    # a setback the band does not see: 8 % over the twin for ever, under the pre-onset level
    setback = {s: v * (1.08 if s >= 50 else 1.0) for s, v in clean.items()}
    stuck = {s: v * (1.8 if s >= 50 else 1.0) for s, v in clean.items()}
    nan = {**clean, **{s: float("nan") for s in range(61, 141)}}
    assert L.band_label(clean, 50, 50)[0] == L.NO_EFFECT
    assert L.band_label(slow, 50, 50)[0] == L.RECOVERED
    assert L.label(setback, clean, 50, 50)[0] == L.DIVERGED and L.band_label(setback, 50, 50)[0] == L.NO_EFFECT
    assert L.band_label(stuck, 50, 50)[0] == L.DIVERGED
    assert L.band_label(nan, 60, 60) == (L.DIVERGED, {"first_non_finite_step": 61})
    with pytest.raises(ValueError, match="no finite loss"):
        L.band_label({**clean, **{s: float("nan") for s in range(30, 50)}}, 50, 50)


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
