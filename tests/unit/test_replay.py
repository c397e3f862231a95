"""Replay: the daemon's detectors and policy over a spool, with rollbacks simulated."""

from __future__ import annotations

import math
import random

import pytest

from supervisor.detect.findings import DIVERGENCE, HANG, LOSS_SPIKE, NON_FINITE, SPIKE_RECOVERED
from supervisor.detect.suite import DetectorSuite
from supervisor.policy import (KILL_RESTART_HANG, RECORD, ROLLBACK, ROLLBACK_LR_DOWN, SKIP_UPDATE,
                               STOP_PAGE, History, Policy, RunState)
from supervisor.protocol import StepRecord
from supervisor.replay import ReplayError, format_decisions, replay

T0 = 1_000.0


def base_loss(step: int) -> float:
    return 2.0 + 8.5 * math.exp(-step / 40)


def line(step, loss=None, *, gen=0, wall=None, grad=1.0, lr_scale=1.0, rank_times=None) -> dict:
    return StepRecord(run_id="run", generation=gen, step=step,
                      loss=base_loss(step) if loss is None else loss, grad_norm=grad, lr=3e-4,
                      lr_scale=lr_scale, tokens_per_s=1e4, step_seconds=1.0,
                      wall_time=T0 + step if wall is None else wall,
                      rank_step_seconds=rank_times).model_dump()


def ckpt(step, wall=None) -> dict:
    return {"kind": "checkpoint_saved", "step": step, "seconds": 2.0,
            "wall_time": T0 + step + 0.5 if wall is None else wall}


def noisy(n, seed=0, start=1, wall0=T0):
    rng = random.Random(seed)
    return [line(s, base_loss(s) * (1 + rng.gauss(0, 0.02)), wall=wall0 + s)
            for s in range(start, n + 1)]


def summary(pairs):
    return [(f.kind, f.step, d.action, d.target_step) for f, d in pairs]


def test_clean_spool_replays_to_nothing():
    lines = noisy(400) + [ckpt(100), {"kind": "directive_applied", "directive_id": "d1",
                                      "directive": "checkpoint_now", "step": 5, "ok": True,
                                      "wall_time": T0}, {"kind": "whatever-new", "x": 1}]
    assert replay(lines) == []
    assert "no findings" in format_decisions([])


def test_replay_equals_feeding_the_suite_and_policy_directly():
    lines = noisy(300)
    lines[199] = line(200, base_loss(200) * 2.0)  # recovering spike
    lines[249] = line(250, float("nan"))  # one bad step
    lines += [line(s, base_loss(s), rank_times=[1.0, 1.0, 1.7, 1.0]) for s in range(301, 306)]
    pairs = replay(lines)

    suite, policy, history = DetectorSuite(), Policy(), History()
    direct = []
    for d in lines:
        r = StepRecord.model_validate(d)
        for f in suite.observe_record(r):
            st = RunState(current_step=r.step, generation=0, valid_checkpoints=[], lr_scale=1.0)
            dec = policy.decide(f, st, history)
            history.record(f, dec)
            direct.append((f, dec))
    assert [(f.to_dict(), d.to_dict()) for f, d in pairs] == \
        [(f.to_dict(), d.to_dict()) for f, d in direct]
    assert [(k, s, a) for k, s, a, _ in summary(pairs)] == [
        (LOSS_SPIKE, 200, RECORD), (SPIKE_RECOVERED, 201, RECORD), (NON_FINITE, 250, SKIP_UPDATE),
        ("straggler", 303, RECORD)]


def test_divergence_rolls_back_to_newest_checkpoint_before_onset():
    lines = noisy(120)
    lines.insert(50, ckpt(50))
    lines.insert(101, ckpt(100))
    lines += [line(s, 6.0, grad=60.0) for s in range(121, 140)]  # loss and grad norm blow up
    pairs = replay(lines, policy_config=Policy.Config(data_skip_margin_steps=3))
    first = [(k, s, a, t) for k, s, a, t in summary(pairs)][:2]
    assert first == [(LOSS_SPIKE, 121, RECORD, None), (DIVERGENCE, 121, ROLLBACK, 100)]
    assert pairs[1][1].skip_batches == 121 - 100 + 3
    assert pairs[1][1].reason.startswith("blow-up at step 121: loss 6 is 2.")


def test_supervised_spool_with_rewind_detects_relapse_and_lowers_lr():
    # generation 0: healthy to 100, checkpoint at 95, spike at 101 that never recovers;
    # the trainer keeps going until 108, then the rollback lands and steps restart at 96.
    lines = noisy(100) + [ckpt(95, wall=T0 + 95.5)]
    lines += [line(s, 6.0, grad=60.0) for s in range(101, 109)]
    wall = T0 + 200
    lines += [line(s, base_loss(s), wall=wall + s) for s in range(96, 101)]
    lines += [line(s, 6.0, grad=60.0, wall=wall + s) for s in range(101, 110)]  # same region again
    pairs = replay(lines)
    acts = [(f.kind, f.step, d.action, d.target_step, d.lr_scale) for f, d in pairs
            if f.kind == DIVERGENCE]
    assert acts == [(DIVERGENCE, 101, ROLLBACK, 95, 1.0),
                    (DIVERGENCE, 101, ROLLBACK_LR_DOWN, 95, 0.5)]
    # the relapse was judged against the baseline restored at step 95, not after a warm-up
    spikes = [f for f, _ in pairs if f.kind == LOSS_SPIKE]
    assert [f.step for f in spikes] == [101, 101]
    assert spikes[1].evidence["window"] == 20  # the full window: restored, not warming up


def test_rewind_quarantines_checkpoints_of_the_abandoned_trajectory():
    lines = noisy(100) + [ckpt(60), ckpt(90)]
    lines += [line(s, base_loss(s), wall=T0 + 500 + s) for s in range(61, 130)]  # rewound to 60
    lines += [line(s, 6.0, grad=60.0, wall=T0 + 500 + s) for s in range(130, 140)]
    pairs = replay(lines)
    div = [(f, d) for f, d in pairs if f.kind == DIVERGENCE]
    assert div and div[0][1].target_step == 60  # checkpoint 90 belonged to the old segment


def test_unsupervised_spool_escalates_and_stops_at_stop_page():
    lines = noisy(200) + [ckpt(150)]
    lines += [line(s, 6.0 + 0.01 * s) for s in range(201, 500)]  # never comes back down
    pairs = replay(lines)
    ladder = [(d.action, d.rung) for f, d in pairs if f.kind == DIVERGENCE]
    assert ladder == [(ROLLBACK, 3), (ROLLBACK_LR_DOWN, 4), (ROLLBACK_LR_DOWN, 4), (STOP_PAGE, 5)]
    assert pairs[-1][1].action == STOP_PAGE  # the daemon stops there: nothing after it
    assert [d.lr_scale for f, d in pairs if d.action == ROLLBACK_LR_DOWN] == [0.5, 0.25]


def test_advise_mode_flags_everything_and_changes_nothing():
    lines = noisy(200) + [ckpt(150)] + [line(s, 6.0) for s in range(201, 260)]
    pairs = replay(lines, mode="advise")
    assert pairs and all(d.advisory for _, d in pairs)
    assert [d.action for f, d in pairs if f.kind == DIVERGENCE] == [ROLLBACK]
    assert "(advisory)" in format_decisions(pairs)


def test_gap_in_the_spool_is_a_hang_detected_at_the_deadline():
    lines = noisy(50) + [ckpt(40)]
    lines += [line(s, base_loss(s), wall=T0 + 500 + s) for s in range(51, 60)]
    pairs = replay(lines)
    assert summary(pairs) == [(HANG, 50, KILL_RESTART_HANG, 40)]
    hang = pairs[0][0]
    assert hang.wall_time == pytest.approx(T0 + 50 + 10.0)  # 10 x 1 s step time
    assert "restarting from checkpoint step 40" in pairs[0][1].reason


def test_new_generation_in_the_spool_starts_a_new_segment():
    lines = noisy(80) + [ckpt(70)]
    lines += [{"kind": "started", "step": 70, "wall_time": T0 + 100.0}]
    lines += [line(s, base_loss(s), gen=1, wall=T0 + 100 + s) for s in range(71, 100)]
    lines += [line(81, float("nan"), gen=0, wall=T0 + 300)]  # a stale record of generation 0
    assert replay(lines) == []


def test_bad_lines_are_clear_errors():
    with pytest.raises(ReplayError, match="line 2: not a valid step record"):
        replay([line(1), {"step": 2, "loss": 1.0}])
    with pytest.raises(ReplayError, match="line 1: not a valid checkpoint_saved event"):
        replay([{"kind": "checkpoint_saved", "step": -1}])
    with pytest.raises(ReplayError, match="line 1: expected a JSON object"):
        replay([[1, 2]])


def test_format_decisions_has_one_line_per_finding_with_reason():
    lines = noisy(120) + [ckpt(50)] + [line(s, 6.0, grad=60.0) for s in range(121, 130)]
    pairs = replay(lines)
    text = format_decisions(pairs)
    assert len(text.splitlines()) == len(pairs)
    assert "divergence" in text and "rolling back to last-known-good step 50" in text
