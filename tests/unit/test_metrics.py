"""Metrics: every series is rendered with the expected name, labels and value, parsed back
with prometheus_client's own text parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.metrics import Metrics
from supervisor.protocol import StepRecord


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


def record(step: int, wall: float, **kw) -> StepRecord:
    base = dict(run_id="r1", generation=2, step=step, loss=2.25, grad_norm=0.75, lr=3e-4,
                lr_scale=0.5, tokens_per_s=12345.0, step_seconds=1.5, peak_mem_gib=40.0,
                wall_time=wall)
    base.update(kw)
    return StepRecord(**base)


def test_step_record_updates_gauges():
    m = Metrics()
    m.observe_step(record(100, 1000.0))
    s = samples(m)
    assert s[("titan_step", ())] == 100
    assert s[("titan_loss", ())] == 2.25
    assert s[("titan_grad_norm", ())] == 0.75
    assert s[("titan_lr", ())] == 3e-4
    assert s[("titan_lr_scale", ())] == 0.5
    assert s[("titan_tokens_per_second", ())] == 12345.0
    assert s[("titan_step_seconds", ())] == 1.5
    assert s[("titan_peak_memory_bytes", ())] == 40.0 * 1024 ** 3
    assert s[("titan_generation", ())] == 2
    assert s[("titan_last_step_timestamp_seconds", ())] == 1000.0


def test_older_record_does_not_move_gauges_back_but_counts():
    m = Metrics()
    m.observe_step(record(100, 1000.0))
    m.observe_step(record(90, 900.0, dropped_records=3, update_skipped=True))
    assert value(m, "titan_step") == 100
    assert value(m, "titan_telemetry_dropped_records_total") == 3
    assert value(m, "titan_updates_skipped_total") == 1


def test_non_finite_loss_is_exported():
    m = Metrics()
    m.observe_step(record(5, 10.0, loss=float("nan"), grad_norm=float("inf")))
    assert math.isnan(value(m, "titan_loss"))
    assert value(m, "titan_grad_norm") == math.inf


def test_dropped_records_are_a_running_total_per_generation():
    """The trainer sends its process's running total (training/telemetry.py)."""
    m = Metrics()
    m.observe_step(record(1, 1.0, dropped_records=4))
    m.observe_step(record(2, 2.0, dropped_records=6))
    m.observe_step(record(2, 2.0, dropped_records=6))  # resent: not counted again
    m.observe_step(record(3, 3.0, dropped_records=5))  # reordered: never goes back
    assert value(m, "titan_telemetry_dropped_records_total") == 6
    m.observe_step(record(4, 4.0, generation=3, dropped_records=2))  # new process, from 0
    assert value(m, "titan_telemetry_dropped_records_total") == 8


def test_dropped_heartbeats_are_counted_apart_from_dropped_records():
    """Rank 0's relay beats that did not get through ride on its records, a running total of
    their own: the two counts never mix, and each resets with a new generation."""
    m = Metrics()
    m.observe_step(record(1, 1.0, dropped_records=3, dropped_heartbeats=5))
    m.observe_step(record(2, 2.0, dropped_records=3, dropped_heartbeats=7))
    m.observe_step(record(3, 3.0, dropped_records=4, dropped_heartbeats=6))  # reordered
    assert value(m, "titan_telemetry_dropped_heartbeats_total") == 7
    assert value(m, "titan_telemetry_dropped_records_total") == 4
    m.observe_step(record(4, 4.0, generation=1, dropped_heartbeats=1))
    assert value(m, "titan_telemetry_dropped_heartbeats_total") == 8


def test_counters_by_kind():
    m = Metrics()
    m.observe_incident("loss_spike")
    m.observe_incident("loss_spike")
    m.observe_incident("hang")
    m.observe_finding("non_finite")
    m.observe_decision("rollback")
    m.observe_decision("page", advisory=True)
    m.observe_action("rollback", "done")
    m.observe_action("restart", "failed")
    m.observe_action("restart", "done")
    s = samples(m)
    assert s[("titan_incidents_total", (("kind", "loss_spike"),))] == 2
    assert s[("titan_incidents_total", (("kind", "hang"),))] == 1
    assert s[("titan_findings_total", (("kind", "non_finite"),))] == 1
    assert s[("titan_decisions_total", (("action", "rollback"), ("advisory", "false")))] == 1
    assert s[("titan_decisions_total", (("action", "page"), ("advisory", "true")))] == 1
    assert s[("titan_actions_total", (("kind", "restart"), ("result", "failed")))] == 1
    assert s[("titan_actions_total", (("kind", "rollback"), ("result", "done")))] == 1
    assert s[("titan_restarts_total", (("cause", "hang"),))] == 1  # only the restart that was done, cause = open incident


def test_state_is_one_hot_including_new_states():
    m = Metrics()
    m.set_state("running")
    m.set_state("recovering")
    s = samples(m)
    assert s[("titan_supervisor_state", (("state", "recovering"),))] == 1
    assert s[("titan_supervisor_state", (("state", "running"),))] == 0
    m.set_state("draining")  # not in Config.states: added, others zeroed
    s = samples(m)
    assert s[("titan_supervisor_state", (("state", "draining"),))] == 1
    assert sum(v for (n, _), v in s.items() if n == "titan_supervisor_state") == 1
    assert m.current_state == "draining"


def test_checkpoint_age_computed_at_scrape_time():
    clock = Clock(1000.0)
    m = Metrics(clock=clock)
    assert not any(n == "titan_checkpoint_age_seconds" for n, _ in samples(m))
    m.set_checkpoint(1200, saved_at=900.0)
    assert value(m, "titan_checkpoint_last_step") == 1200
    assert value(m, "titan_checkpoint_age_seconds") == 100.0
    clock.t = 1300.0
    assert value(m, "titan_checkpoint_age_seconds") == 400.0


def test_goodput_losses_intervals_up_info():
    m = Metrics()
    m.set_goodput(0.93)
    m.add_lost(steps=300, gpu_hours=12.5)
    m.observe_incident("dead_rank")
    m.add_lost(steps=10, gpu_hours=0.5)
    m.inc_restarts()
    m.set_checkpoint_interval(500)
    m.set_recommended_checkpoint_interval(350)
    m.set_up(True)
    m.set_run_info("run-42", preset="llama3_8b")
    s = samples(m)
    assert s[("titan_goodput_ratio", ())] == 0.93
    assert s[("titan_lost_steps_total", (("kind", "operator"),))] == 300
    assert s[("titan_lost_steps_total", (("kind", "dead_rank"),))] == 10
    assert s[("titan_lost_gpu_seconds_total", (("kind", "operator"),))] == 12.5 * 3600
    assert s[("titan_lost_gpu_seconds_total", (("kind", "dead_rank"),))] == 0.5 * 3600
    assert s[("titan_restarts_total", (("cause", "dead_rank"),))] == 1
    assert s[("titan_checkpoint_interval_steps", ())] == 500
    assert s[("titan_recommended_checkpoint_interval_steps", ())] == 350
    assert s[("titan_trainer_up", ())] == 1
    assert s[("titan_open_incidents", (("kind", "dead_rank"),))] == 1
    assert s[("titan_run_info", (("preset", "llama3_8b"), ("run_id", "run-42")))] == 1
    with pytest.raises(ValueError):
        m.set_goodput(1.5)
    with pytest.raises(ValueError):
        m.add_lost(steps=-1)


def test_registries_are_independent_and_not_global():
    from prometheus_client import REGISTRY

    a, b = Metrics(), Metrics()
    a.observe_incident("hang")
    assert ("titan_incidents_total", (("kind", "hang"),)) in samples(a)
    assert ("titan_incidents_total", (("kind", "hang"),)) not in samples(b)
    assert REGISTRY.get_sample_value("titan_step") is None
    assert a.content_type.startswith("text/plain")


def test_every_required_series_is_exposed():
    m = Metrics()
    m.observe_step(record(1, 1.0))
    m.set_checkpoint(1, saved_at=1.0)
    names = {fam.name for fam in text_string_to_metric_families(m.render().decode())}
    required = {"titan_step", "titan_loss", "titan_grad_norm", "titan_lr", "titan_lr_scale",
                "titan_tokens_per_second", "titan_step_seconds", "titan_generation",
                "titan_supervisor_state", "titan_incidents", "titan_actions", "titan_findings",
                "titan_checkpoint_last_step", "titan_checkpoint_age_seconds",
                "titan_goodput_ratio", "titan_lost_steps", "titan_lost_gpu_seconds",
                "titan_telemetry_dropped_records", "titan_restarts", "titan_checkpoint_interval_steps",
                "titan_recommended_checkpoint_interval_steps", "titan_trainer_up"}
    assert required <= names, required - names


class HB:
    def __init__(self, rank: int, generation: int = 2, host: str = "node-a") -> None:
        self.rank, self.generation, self.host = rank, generation, host


def test_heartbeat_and_last_step_ages_are_per_rank_at_scrape_time_and_reset_per_generation():
    clock = Clock(100.0)
    m = Metrics(clock=clock)
    m.observe_heartbeat(HB(0, host="node-a"))
    clock.t = 103.0
    m.observe_heartbeat(HB(1, host="node-b"))
    m.observe_step(record(7, 103.0, rank_step_seconds=[0.5, 2.0]))
    clock.t = 110.0
    assert value(m, "titan_rank_heartbeat_age_seconds", rank="0", node="node-a") == 10.0
    assert value(m, "titan_rank_heartbeat_age_seconds", rank="1", node="node-b") == 7.0
    assert value(m, "titan_last_step_age_seconds") == 7.0
    assert value(m, "titan_rank_step_seconds", rank="1", node="node-b") == 2.0
    m.observe_heartbeat(HB(0, generation=3, host="node-c"))  # new generation: old ranks forgotten
    names = [k for k in samples(m) if k[0].startswith("titan_rank_")]
    assert names == [("titan_rank_heartbeat_age_seconds", (("node", "node-c"), ("rank", "0")))]


def test_rollbacks_restarts_and_human_needed_by_cause():
    m = Metrics()
    m.observe_action("rollback", "done")  # no incident open: an operator's command
    m.observe_incident("divergence")
    m.observe_action("rollback_lr_down", "done")
    m.observe_action("rollback", "failed")
    m.observe_incident_closed()
    m.observe_incident("hang")
    m.observe_action("kill_restart_hang", "done")
    s = samples(m)
    assert s[("titan_rollbacks_total", (("cause", "operator"),))] == 1
    assert s[("titan_rollbacks_total", (("cause", "divergence"),))] == 1
    assert s[("titan_restarts_total", (("cause", "hang"),))] == 1
    assert s[("titan_open_incidents", (("kind", "divergence"),))] == 0
    assert s[("titan_open_incidents", (("kind", "hang"),))] == 1
    assert s[("titan_human_needed", ())] == 0
    m.observe_action("stop_page", "done")
    assert value(m, "titan_human_needed") == 1
    m.set_state("running")
    assert value(m, "titan_human_needed") == 0


def test_policy_mode_and_budget_from_policy_objects():
    import time as _t

    from supervisor.policy import History, Policy, RestartEntry, RollbackEntry

    mode = {"now": "advise"}
    m = Metrics()
    m.bind_mode(lambda: mode["now"])
    assert value(m, "titan_policy_mode", mode="advise") == 1
    assert value(m, "titan_policy_mode", mode="auto") == 0
    mode["now"] = "auto"
    assert value(m, "titan_policy_mode", mode="auto") == 1
    cfg = Policy.Config(max_total_rollbacks=5, max_rollbacks_per_region=3, max_restarts=4)
    now = _t.time()
    h = History(rollbacks=[RollbackEntry(onset_step=100, target_step=90, wall_time=now, lr_scale=1.0, cause="x"),
                           RollbackEntry(onset_step=2000, target_step=1990, wall_time=now + 1, lr_scale=1.0,
                                         cause="x")],
                restarts=[RestartEntry(wall_time=now - 7200, kind="hang", step=5, host=None, rank=None),
                          RestartEntry(wall_time=now - 10, kind="hang", step=9, host=None, rank=None)])
    m.set_policy_budget(cfg, h, now)
    assert value(m, "titan_policy_budget_remaining", budget="rollbacks_run") == 3
    assert value(m, "titan_policy_budget_remaining", budget="rollbacks_region") == 2
    assert value(m, "titan_policy_budget_remaining", budget="restarts_window") == 3


def test_checkpoint_save_duration_and_interval_in_seconds():
    m = Metrics()
    for i, secs in enumerate([1.0, 3.0, 2.0], 1):
        m.observe_step(record(i, float(i), step_seconds=secs))
    m.set_checkpoint_interval(100)
    m.set_checkpoint(3, saved_at=3.0, save_seconds=4.5)
    s = samples(m)
    assert s[("titan_checkpoint_interval_seconds", ())] == 200.0  # 100 steps x median 2 s
    assert s[("titan_checkpoint_save_seconds", ())] == 4.5
    assert s[("titan_checkpoint_save_duration_seconds_count", ())] == 1
    assert s[("titan_step_duration_seconds_count", ())] == 3
