"""Policy: every rung of the ladder, every budget, and rollback target selection."""

from __future__ import annotations

import pytest

from supervisor.detect.findings import (DEAD_RANK, DIVERGENCE, GRAD_BLOWUP, HANG, HARDWARE,
                                        LOSS_SPIKE, MISSING_HEARTBEAT, NON_FINITE, OOM,
                                        SLOW_CONVERGENCE, SPIKE_RECOVERED, STRAGGLER, Finding)
from supervisor.policy import (EXCLUDE_NODE, KILL_RESTART_HANG, RECORD, RESTART, ROLLBACK,
                               ROLLBACK_LR_DOWN, SKIP_UPDATE, STOP_PAGE, Decision, History,
                               Policy, RestartEntry, RollbackEntry, RunState)

T0 = 50_000.0


def finding(kind, step=100, *, wall=T0, rank=None, severity="critical", **evidence) -> Finding:
    return Finding(kind=kind, step=step, severity=severity, wall_time=wall, evidence=evidence,
                   rank=rank)


def divergence(onset, step=None, cause="no_recovery", wall=T0) -> Finding:
    return finding(DIVERGENCE, step or onset + 5, wall=wall, cause=cause, onset_step=onset,
                   recovery_steps=5)


def state(**kw) -> RunState:
    base = dict(current_step=200, generation=1, valid_checkpoints=[0, 25, 50, 57, 75, 150],
                batches_per_step=1, lr_scale=1.0, trainer_alive=True, mode="auto")
    base.update(kw)
    return RunState(**base)


def crash(kind=DEAD_RANK, wall=T0, host="node1", step=120) -> Finding:
    return finding(kind, step, wall=wall, rank=3, exitcode=-9, signal=9, signal_name="SIGKILL",
                   host=host)


P = Policy()


# --- rungs 1 and 2 -------------------------------------------------------------------------
def test_spike_onset_and_recovery_are_recorded_only():
    d = P.decide(finding(LOSS_SPIKE, 57, severity="warning", loss=5.0, median=2.5, z=9.0,
                         recovery_steps=5), state(), History())
    assert (d.action, d.rung, d.acts) == (RECORD, 1, False)
    d = P.decide(finding(SPIKE_RECOVERED, 59, severity="info", onset_step=57, steps_to_recover=2,
                         peak=5.0), state(), History())
    assert (d.action, d.rung) == (RECORD, 1)
    assert "step 57 recovered after 2 steps" in d.reason


@pytest.mark.parametrize("kind,ev", [(NON_FINITE, {"fields": ["loss"], "update_skipped": True}),
                                     (GRAD_BLOWUP, {"rule": "robust_z", "grad_norm": 40.0,
                                                    "median": 1.0, "ratio": 40.0, "z": 30.0})])
def test_one_bad_step_is_skip_update(kind, ev):
    d = P.decide(finding(kind, 77, **ev), state(), History())
    assert (d.action, d.rung, d.target_step) == (SKIP_UPDATE, 2, None)
    assert "step 77" in d.reason
    d = P.decide(finding(kind, 77, **ev), state(trainer_alive=False), History())
    assert d.action == RECORD


@pytest.mark.parametrize("kind", [STRAGGLER, HARDWARE, MISSING_HEARTBEAT, SLOW_CONVERGENCE])
def test_warnings_are_recorded(kind):
    d = P.decide(finding(kind, 10, severity="warning", rank=2, host="node1"), state(), History())
    assert (d.action, d.rung) == (RECORD, 1)


# --- rung 3: rollback ------------------------------------------------------------------------
def test_divergence_rolls_back_strictly_before_onset_and_skips_the_window():
    policy = Policy(Policy.Config(data_skip_margin_steps=3))
    d = policy.decide(divergence(57), state(), History())
    assert (d.action, d.rung, d.target_step, d.skip_batches) == (ROLLBACK, 3, 50, 10)
    assert d.lr_scale == 1.0 and d.acts
    assert d.reason == ("loss spike at step 57 did not recover within 5 steps; rolling back to "
                        "last-known-good step 50 and skipping 10 batches (steps 51-57 + 3 margin); if it "
                        "diverges again within 250 steps: the next rollback also scales the LR by 0.5 "
                        "(2 more rollbacks in this region, then stop and page)")


def test_skip_batches_scale_with_batches_per_step():
    policy = Policy(Policy.Config(data_skip_margin_steps=3))
    d = policy.decide(divergence(57), state(batches_per_step=4), History())
    assert d.skip_batches == (57 - 50 + 3) * 4
    assert "4 batches per step" in d.reason


# The loss at step N is measured on the weights after update N-1, so a checkpoint at N-1 may
# already hold the bad update: the target is the newest valid checkpoint <= onset - 2.
@pytest.mark.parametrize("onset,target", [(58, 50), (59, 57), (57, 50), (52, 50), (51, 25), (50, 25),
                                          (2, 0), (10_000, 150)])
def test_rollback_target_is_newest_valid_checkpoint_before_onset(onset, target):
    assert P.rollback_target(onset, state()) == target


def test_no_checkpoint_before_onset_stops_and_pages():
    d = P.decide(divergence(40), state(valid_checkpoints=[50, 100]), History())
    assert (d.action, d.rung, d.target_step) == (STOP_PAGE, 5, None)
    assert "no valid checkpoint before step 40" in d.reason


def test_last_known_good_is_the_fallback_when_catalog_list_is_empty():
    d = P.decide(divergence(57), state(valid_checkpoints=[], last_known_good=40), History())
    assert (d.action, d.target_step) == (ROLLBACK, 40)
    assert P.rollback_target(57, state(valid_checkpoints=[], last_known_good=57)) is None


def test_cluster_and_nan_streak_divergences_roll_back_from_their_onset():
    d = P.decide(finding(DIVERGENCE, 90, cause="cluster", onset_step=60,
                         spike_steps=[60, 75, 90], cluster_window_steps=50), state(), History())
    assert (d.action, d.target_step) == (ROLLBACK, 57)
    assert d.reason.startswith("3 loss spikes within 50 steps (steps 60, 75, 90)")
    d = P.decide(finding(DIVERGENCE, 79, cause="non_finite_streak", onset_step=77, consecutive=3,
                         fields=["loss"]), state(), History())
    assert (d.action, d.target_step) == (ROLLBACK, 75)


def test_landed_high_divergence_rolls_back_and_names_the_numbers():
    d = P.decide(finding(DIVERGENCE, 70, cause="landed_high", onset_step=60, loss=2.955,
                         previous_loss=6.691, expected=2.309, landing_ratio=1.28, landing_tolerance=0.2),
                 state(), History())
    assert (d.action, d.target_step) == (ROLLBACK, 57)
    assert d.reason.startswith("loss spike at step 60 dropped back in one step (6.691 -> 2.955) but landed "
                               "1.28x the pre-spike trend 2.309 (> 1 + 0.2): the weights kept the damage")


def test_damage_and_stuck_high_divergences_roll_back_and_name_the_numbers():
    d = P.decide(finding(DIVERGENCE, 65, cause="landed_after_damage", onset_step=55, loss=3.162,
                         previous_loss=6.739, median=3.61, damage=6.84, spike_steps=10, landing_damage=4.0),
                 state(), History())
    assert (d.action, d.target_step) == (ROLLBACK, 50)
    assert d.reason.startswith("loss spike at step 55 dropped back in one step (6.739 -> 3.162) after 10 steps "
                               "whose summed excess over the median 3.61 was 6.84 (>= 4): the weights trained")
    d = P.decide(finding(DIVERGENCE, 81, cause="stuck_high", onset_step=76, level=6.92, level_ratio=2.939,
                         median=2.355, patience_steps=5, stuck_level_ratio=2.5, grad_ratio=11.0,
                         stuck_grad_ratio=4.0), state(), History())
    assert (d.action, d.target_step) == (ROLLBACK, 57)
    assert d.reason.startswith("loss spike at step 76 is still at 6.92, 2.939x its median 2.355 after 5 steps "
                               "(>= 2.5x) with grad norms 11x theirs (>= 4x): the weights were thrown out of "
                               "their basin")


def test_lr_burst_divergence_rolls_back_before_the_burst_and_names_it():
    d = P.decide(finding(DIVERGENCE, 80, cause="lr_burst", onset_step=71, burst_start=70, burst_end=79,
                         burst_steps=10, burst_peak_factor=100.0, burst_displacement=990.0,
                         burst_displacement_bar=600.0), state(), History())
    assert d.action == ROLLBACK and d.target_step is not None and d.target_step <= 69
    assert d.reason.startswith("loss spike at step 71 came with an off-schedule LR burst: steps 70-79 ran at up "
                               "to 100x the schedule's peak LR and moved the weights 990 extra normal steps "
                               "(>= 600): too far")
    # the spike's own onset is named, not the burst's first step the rollback is measured from
    d = P.decide(finding(DIVERGENCE, 80, cause="lr_burst", onset_step=70, spike_onset_step=72, burst_start=70,
                         burst_end=79, burst_steps=10, burst_peak_factor=100.0, burst_displacement=990.0,
                         burst_displacement_bar=600.0), state(), History())
    assert d.reason.startswith("loss spike at step 72 came with an off-schedule LR burst: steps 70-79")
    assert d.target_step is not None and d.target_step <= 68


# --- rungs 4 and 5: same region again -----------------------------------------------------------
def test_ladder_walk_in_one_region_escalates_then_stops():
    h = History()
    seen, reasons = [], []
    scale = 1.0
    for i, onset in enumerate([100, 110, 95, 105]):
        d = P.decide(divergence(onset, wall=T0 + i), state(lr_scale=scale), h)
        seen.append((d.action, d.rung, d.lr_scale))
        reasons.append(d.reason)
        h.record(divergence(onset, wall=T0 + i), d)
        if d.lr_scale is not None:
            scale = d.lr_scale
    assert seen == [(ROLLBACK, 3, 1.0), (ROLLBACK_LR_DOWN, 4, 0.5), (ROLLBACK_LR_DOWN, 4, 0.25),
                    (STOP_PAGE, 5, None)]
    assert len(h.rollbacks) == 3
    assert [r.onset_step for r in h.rollbacks] == [100, 110, 95]
    # each reason says what the next divergence here gets, and that is what it got
    assert reasons[0].endswith("if it diverges again within 250 steps: the next rollback also scales the LR "
                               "by 0.5 (2 more rollbacks in this region, then stop and page)")
    assert reasons[1].endswith("if it diverges again within 250 steps: scale the LR by 0.5 again "
                               "(1 more rollback in this region, then stop and page)")
    assert reasons[2].endswith("if it diverges again within 250 steps: stop and page (this region's 3 "
                               "rollbacks are spent)")


def poisoned(onset, *, sudden, wall=T0) -> Finding:
    ev = dict(cause="poisoned_update", onset_step=onset, grad_norm="nan", loss=2.1, update_skipped=False,
              sudden=sudden)
    if sudden:
        ev.update(loss_median=2.0, sudden_loss_ratio=1.5)
    return finding(DIVERGENCE, onset, wall=wall, **ev)


def test_a_sudden_poisoned_update_after_a_spike_rollback_keeps_the_lr():
    """The goodput schedule's order: an LR blow-up is rolled back, then a NaN batch poisons the
    weights a few steps on. Nothing was growing before the NaN (loss 2.1, median 2.0), so it is a
    plain rollback: halving the LR for it cost the final loss (1.46 vs 1.34 clean)."""
    h = History()
    spike = divergence(56, cause="severe")
    h.record(spike, d0 := P.decide(spike, state(), h))
    assert d0.action == ROLLBACK
    f = poisoned(62, sudden=True, wall=T0 + 10)
    d = P.decide(f, state(), h)
    assert (d.action, d.rung, d.lr_scale, d.target_step) == (ROLLBACK, 3, 1.0, 57)
    assert "rollback 2 of 3 in this region, LR kept" in d.reason and "loss 2.1 was normal (median 2)" in d.reason
    # the spike's rollback here was instability: the next one costs LR (as below)
    assert d.reason.endswith("the next rollback also scales the LR by 0.5 (1 more rollback in this region, "
                             "then stop and page)")
    h.record(f, d)
    assert [r.lr_suspect for r in h.rollbacks] == [True, False]
    # the same NaN out of a blown-up loss is instability: rung 4 as before
    d = P.decide(poisoned(64, sudden=False, wall=T0 + 20), state(), h)
    assert (d.action, d.lr_scale) == (ROLLBACK_LR_DOWN, 0.5)
    assert "rollback for onset 56" in d.reason


def test_after_sudden_poisonings_only_an_instability_rollback_makes_the_next_cost_lr():
    h = History()
    for i, onset in enumerate((60, 70)):
        f = poisoned(onset, sudden=True, wall=T0 + i)
        h.record(f, d := P.decide(f, state(), h))
        assert d.reason.endswith(f"roll back again, LR kept ({2 - i} more rollback{'s' if i == 0 else ''} in "
                                 "this region, then stop and page)")
    assert [r.lr_suspect for r in h.rollbacks] == [False, False]
    d = P.decide(divergence(80, wall=T0 + 5), state(), h)
    assert (d.action, d.lr_scale) == (ROLLBACK, 1.0)
    assert "earlier rollbacks here were for sudden poisoned updates" in d.reason
    # the region's budget still counts them: the third rollback was the last one allowed
    h.record(divergence(80, wall=T0 + 5), d)
    d = P.decide(poisoned(90, sudden=True, wall=T0 + 6), state(), h)
    assert (d.action, d.rung) == (STOP_PAGE, 5)


def test_a_journaled_history_without_the_field_still_counts_as_lr_suspect():
    h = History.from_dict({"rollbacks": [dict(onset_step=100, target_step=75, wall_time=T0 - 10, lr_scale=1.0,
                                              cause="no_recovery")]})
    assert h.rollbacks[0].lr_suspect is True
    assert P.decide(divergence(120), state(), h).action == ROLLBACK_LR_DOWN


def test_lr_down_carries_ramp_and_explains_itself():
    h = History(rollbacks=[RollbackEntry(onset_step=100, target_step=75, wall_time=T0 - 10,
                                         lr_scale=1.0)])
    d = P.decide(divergence(120), state(lr_scale=0.8), h)
    assert (d.action, d.target_step, d.lr_scale, d.ramp_steps) == (ROLLBACK_LR_DOWN, 75, 0.4, 100)
    assert "onset 100" in d.reason and "0.4" in d.reason and "100-step re-warm" in d.reason


def test_divergence_in_another_region_is_a_plain_rollback():
    h = History(rollbacks=[RollbackEntry(100, 75, T0 - 10, 1.0)])
    d = P.decide(divergence(1_000), state(valid_checkpoints=[75, 900]), h)
    assert (d.action, d.target_step) == (ROLLBACK, 900)


def test_total_rollback_budget_stops():
    policy = Policy(Policy.Config(max_total_rollbacks=2))
    h = History(rollbacks=[RollbackEntry(1_000, 900, T0, 1.0),
                           RollbackEntry(5_000, 4_900, T0, 1.0)])
    d = policy.decide(divergence(57), state(), h)
    assert (d.action, d.rung) == (STOP_PAGE, 5)
    assert "all 2 rollbacks" in d.reason


def test_lr_floor_stops_instead_of_crawling():
    h = History(rollbacks=[RollbackEntry(100, 75, T0, 1.0)])
    d = P.decide(divergence(110), state(lr_scale=0.08), h)
    assert d.action == STOP_PAGE


# --- crashes, OOM, hangs -----------------------------------------------------------------------
def test_dead_rank_restarts_at_once_then_backs_off_only_in_a_crash_loop():
    """Failures 20 s apart (each within the 120 s crash-loop window of the previous restart's
    start) back off 0, 10, 20, 40, 80; the sixth within the hour stops."""
    h = History()
    backoffs, wall = [], T0
    for i in range(5):
        d = P.decide(crash(wall=wall), state(), h)
        assert (d.action, d.target_step, d.rung) == (RESTART, 150, 3)
        backoffs.append(d.backoff_seconds)
        h.record(crash(wall=wall), d)
        wall += d.backoff_seconds + 20
    assert backoffs == [0, 10, 20, 40, 80]
    assert "at once" in P.decide(crash(), state(), History()).reason
    d = P.decide(crash(wall=wall), state(), h)  # sixth within the hour: budget exhausted
    assert (d.action, d.rung) == (STOP_PAGE, 5)
    assert "5 restarts in the last 1h" in d.reason


def test_a_restart_after_a_healthy_stretch_is_immediate():
    """A failure later than the window after the previous restart began is not a crash loop,
    however many restarts the hour holds; the wait the previous restart spent counts as not
    yet started (a long backoff does not age the loop out by itself)."""
    h = History(restarts=[RestartEntry(T0 - 1000, DEAD_RANK, 10, backoff_seconds=0.0),
                          RestartEntry(T0 - 121, DEAD_RANK, 50, backoff_seconds=0.0)])
    d = P.decide(crash(), state(), h)
    assert (d.action, d.backoff_seconds) == (RESTART, 0)
    assert "at once" in d.reason and "restart 3 of 5" in d.reason
    h2 = History(restarts=[RestartEntry(T0 - 119, DEAD_RANK, 50, backoff_seconds=0.0)])
    assert P.decide(crash(), state(), h2).backoff_seconds == 10
    # restarted at T0-200 after an 100 s wait: it began at T0-100, so a failure at T0 is 100 s in
    h3 = History(restarts=[RestartEntry(T0 - 260, DEAD_RANK, 50, backoff_seconds=0.0),
                           RestartEntry(T0 - 200, DEAD_RANK, 50, backoff_seconds=100.0)])
    assert P.decide(crash(), state(), h3).backoff_seconds == 20
    wide = Policy(Policy.Config(crash_loop_window_seconds=600))
    assert wide.decide(crash(), state(), h).backoff_seconds == 10


def test_a_restart_that_trained_a_healthy_stretch_ends_the_loop_however_soon():
    """Independent faults 40 s apart are not a crash loop when the restarted job trained
    `crash_loop_healthy_steps` past its checkpoint; a failure right after resuming is."""
    h = History(restarts=[RestartEntry(T0 - 40, DEAD_RANK, 61, backoff_seconds=0.0, resume_step=50)])
    healthy = P.decide(crash(step=90), state(), h)
    assert (healthy.action, healthy.backoff_seconds) == (RESTART, 0)
    assert "healthy stretch" in healthy.reason
    stuck = P.decide(crash(step=55), state(), h)  # 5 steps past step 50: not healthy yet
    assert stuck.backoff_seconds == 10 and "crash loop of 2" in stuck.reason
    lenient = Policy(Policy.Config(crash_loop_healthy_steps=50))
    assert lenient.decide(crash(step=90), state(), h).backoff_seconds == 10


def test_backoff_is_capped_and_old_restarts_age_out():
    policy = Policy(Policy.Config(max_restarts=20, backoff_max_seconds=100))
    h = History(restarts=[RestartEntry(T0 - 10 * i, DEAD_RANK, 10) for i in range(1, 8)])
    assert policy.decide(crash(), state(), h).backoff_seconds == 100
    old = History(restarts=[RestartEntry(T0 - 7_200, DEAD_RANK, 10)] * 10)
    d = P.decide(crash(), state(), old)
    assert (d.action, d.backoff_seconds) == (RESTART, 0)


def test_crash_loop_length_and_restart_history_round_trip():
    h = History()
    d = P.decide(crash(), state(), h)
    h.record(crash(), d)
    d2 = P.decide(crash(wall=T0 + 30), state(), h)
    h.record(crash(wall=T0 + 30), d2)
    assert [(r.backoff_seconds, r.resume_step) for r in h.restarts] == [(0, 150), (10, 150)]
    back = History.from_dict(h.to_dict())
    assert back.crash_loop_length(T0 + 60, 155, 120, 10) == 2
    assert back.crash_loop_length(T0 + 30 + 10 + 121, 155, 120, 10) == 0
    # a journal written before backoff_seconds existed still loads
    legacy = {"restarts": [{"wall_time": T0, "kind": DEAD_RANK, "step": 5, "host": None, "rank": None}]}
    assert History.from_dict(legacy).restarts[0].backoff_seconds == 0.0


def test_hang_is_kill_restart_and_shares_the_restart_budget():
    hang = finding(HANG, 300, rank=2, seconds_without_progress=30.0, timeout_seconds=30.0,
                   basis="steps")
    d = P.decide(hang, state(), History())
    assert (d.action, d.target_step, d.backoff_seconds) == (KILL_RESTART_HANG, 150, 0)
    assert "rank 2 stopped heartbeating" in d.reason
    full = History(restarts=[RestartEntry(T0 - i, DEAD_RANK, 10) for i in range(1, 6)])
    assert P.decide(hang, state(), full).action == STOP_PAGE


def test_oom_once_restarts_repeated_oom_moves_to_a_safer_layout():
    h = History()
    d1 = P.decide(crash(OOM), state(), h)
    assert (d1.action, d1.next_layout, d1.rung) == (RESTART, False, 3)
    h.record(crash(OOM), d1)
    d2 = P.decide(crash(OOM, wall=T0 + 100), state(), h)
    assert (d2.action, d2.next_layout, d2.rung) == (RESTART, True, 4)
    assert "safer layout" in d2.reason


def test_repeated_crashes_on_one_host_exclude_it_when_enabled():
    policy = Policy(Policy.Config(exclude_node_after=2))
    h = History(restarts=[RestartEntry(T0 - 100, DEAD_RANK, 10, host="node7")])
    d = policy.decide(crash(host="node7"), state(), h)
    assert (d.action, d.node, d.target_step) == (EXCLUDE_NODE, "node7", 150)
    assert policy.decide(crash(host="node8"), state(), h).action == RESTART
    assert P.decide(crash(host="node7"), state(), h).action == RESTART  # off by default


def test_crash_without_any_checkpoint():
    d = P.decide(crash(), state(valid_checkpoints=[], current_step=30), History())
    assert (d.action, d.target_step) == (RESTART, 0)
    assert "from scratch" in d.reason
    d = P.decide(crash(), state(valid_checkpoints=[], current_step=50_000), History())
    assert d.action == STOP_PAGE


# --- modes, unknown kinds, (de)serialisation -------------------------------------------------
def test_advise_mode_computes_the_same_decision_but_flags_it():
    auto = P.decide(divergence(57), state(), History())
    adv = P.decide(divergence(57), state(mode="advise"), History())
    assert adv.advisory and not adv.acts
    assert (adv.action, adv.target_step, adv.skip_batches, adv.reason) == \
        (auto.action, auto.target_step, auto.skip_batches, auto.reason)
    h = History()
    h.record(divergence(57), adv)
    assert h.rollbacks == []  # advice is not an action; it spends no budget


def test_off_mode_only_records():
    d = P.decide(crash(), state(mode="off"), History())
    assert (d.action, d.acts) == (RECORD, False)
    assert "auto would restart" in d.reason


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError):
        P.decide(crash(), state(mode="yolo"), History())


def test_decision_and_history_round_trip():
    d = P.decide(divergence(57), state(), History())
    assert Decision.from_dict(d.to_dict()) == d
    with pytest.raises(ValueError):
        Decision.from_dict({**d.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        Decision(action="reboot_universe", reason="", rung=0)
    h = History()
    h.record(divergence(57), d)
    h.record(crash(), P.decide(crash(), state(), h))
    assert History.from_dict(h.to_dict()) == h
    assert h.restarts[0].host == "node1" and h.restarts[0].rank == 3
    assert h.rollbacks[0] == RollbackEntry(57, 50, T0, 1.0, "no_recovery")


def test_record_and_skip_do_not_spend_budget():
    h = History()
    for kind in (LOSS_SPIKE, NON_FINITE):
        f = finding(kind, 10, fields=["loss"])
        h.record(f, P.decide(f, state(), h))
    assert h == History()
    assert P.decide(finding(DEAD_RANK), state(), h).action == RESTART


# --- exclusion after repeated hardware findings on one host ------------------------------------
def hw(host, pattern="xid", wall=T0) -> Finding:
    return finding(HARDWARE, 120, wall=wall, severity="warning", pattern=pattern, source="log",
                   detail="NVRM: Xid 79", host=host)


def test_repeated_hardware_findings_on_one_host_exclude_it_single_ones_are_recorded():
    from supervisor.actions import DecisionLoop

    loop = DecisionLoop(Policy(Policy.Config(exclude_on_hardware=True, exclude_hardware_after=2,
                                             hardware_window_seconds=3600.0)))
    first = loop.decide(hw("node-b"), state())
    assert first.action == RECORD and "hardware finding 1 on host node-b" in first.reason
    assert "excluded at 2" in first.reason
    # another host's finding is its own count
    assert loop.decide(hw("node-c", wall=T0 + 10), state()).action == RECORD
    second = loop.decide(hw("node-b", "fell_off_bus", wall=T0 + 20), state())
    assert second.action == EXCLUDE_NODE and second.node == "node-b" and second.target_step == 150
    assert "hardware finding 2 on host node-b" in second.reason
    # a finding outside the window does not count: node-c's first is an hour and more before
    late = loop.decide(hw("node-c", wall=T0 + 10 + 3601), state())
    assert late.action == RECORD and "hardware finding 1 on host node-c" in late.reason


def test_hardware_findings_are_counted_while_an_action_runs_and_survive_a_daemon_restart():
    from supervisor.actions import DecisionLoop

    cfg = Policy.Config(exclude_on_hardware=True, exclude_hardware_after=3)
    loop = DecisionLoop(Policy(cfg))
    loop.in_flight = object()  # a restart runs: no decision, but the finding counts
    assert loop.decide(hw("node-b"), state()) is None
    loop.in_flight = None
    assert loop.decide(hw("node-b", "ecc", wall=T0 + 1), state()).action == RECORD
    # the daemon journals History.to_dict(); a restarted daemon reads it back
    again = DecisionLoop(Policy(cfg), History.from_dict(loop.history.to_dict()))
    d = again.decide(hw("node-b", "fell_off_bus", wall=T0 + 2), state())
    assert d.action == EXCLUDE_NODE and "hardware finding 3" in d.reason


def test_hardware_exclusion_threshold_one_and_off():
    assert P.decide(hw("node-b"), state(), History()).action == RECORD  # exclude_on_hardware off (default)
    one = Policy(Policy.Config(exclude_on_hardware=True, exclude_hardware_after=1))
    assert one.decide(hw("node-b"), state(), History()).action == EXCLUDE_NODE
    # no host named (a single-node run's log line): recorded, never an exclusion
    assert one.decide(finding(HARDWARE, 120, severity="warning", pattern="xid"), state(), History()).action == RECORD


def test_policy_explain_states_the_hardware_threshold():
    from supervisor.detect.loss_spike import LossSpikeDetector
    from supervisor.detect.non_finite import NonFiniteDetector
    from supervisor.policy import explain

    text = explain(Policy.Config(exclude_on_hardware=True, exclude_hardware_after=3,
                                 hardware_window_seconds=7200.0), LossSpikeDetector.Config(), NonFiniteDetector.Config())
    assert "hardware finding number 3 naming it within 2h" in text
    off = explain(Policy.Config(), LossSpikeDetector.Config(), NonFiniteDetector.Config())
    assert "policy.exclude_on_hardware is off" in off


def test_policy_explain_names_the_strict_rules_only_when_they_are_on():
    from supervisor.detect.loss_spike import LossSpikeDetector
    from supervisor.detect.non_finite import NonFiniteDetector
    from supervisor.policy import explain

    off = explain(Policy.Config(), LossSpikeDetector.Config(), NonFiniteDetector.Config())
    on = explain(Policy.Config(), LossSpikeDetector.Config(strict=True, burst_displacement=450.0),
                 NonFiniteDetector.Config())
    assert "strict rules       off" in off and "never rolled back" in off
    for clause in ("ends a drift", "pre-spike trend", "stuck high at patience", "off-schedule LR burst"):
        assert clause not in off, clause
        assert clause in on, clause
    assert ">= 450 extra normal steps" in on  # the numbers in effect, not the defaults
