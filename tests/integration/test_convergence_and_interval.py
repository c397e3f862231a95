"""Catching the expensive mistakes on live runs: the scaled Adam-ε trap against a reference
curve, and the Young/Daly checkpoint interval applied to a running trainer.

The ε trap, scaled to the tiny CPU model (see the issue): what matters is ε against the
per-coordinate gradient scale √v. In a billion-parameter model √v ~ 1e-5, so ε = 1e-5
dominates; this model's gradients are ~100x larger, so the same trap is ε ~ 1e-3.
"""

from __future__ import annotations

import math
import time

import pytest

from tests.daemon_harness import Daemon, drill_config, free_port
from tests.trainer_harness import run_trainer, spool

pytestmark = [pytest.mark.integration, pytest.mark.drill]

STEPS = 150


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference curve: a healthy run (ε = 1e-8, seed 42), longer than the live runs."""
    dump = tmp_path_factory.mktemp("reference")
    p = run_trainer(dump, 2, ["--training.steps", "200", "--debug.seed", "42"])
    assert p.returncode == 0, p.stderr[-3000:]
    return dump / "telemetry" / "spool.jsonl"


def _supervised(tmp_path, reference, eps: float, seed: int) -> Daemon:
    cfg = drill_config(tmp_path / "run", free_port(), steps=STEPS)
    cfg["training"]["seed"] = seed
    cfg["optimizer"] = {"eps": eps}
    cfg["convergence"] = {"reference_spool": str(reference)}
    # the ε lint would refuse 1e-3 (rightly): the drill says why it runs anyway
    cfg["preflight"] = {"override_reason": "drill: the scaled epsilon trap on the tiny CPU model"}
    d = Daemon(tmp_path, cfg).start()
    try:
        assert d.wait_exit(300) == 0, d.log_tail()
    finally:
        d.cleanup()
    return d


def _findings(d: Daemon, kind: str) -> list[dict]:
    j = d.journal()
    try:
        return [f for f in j.findings(limit=10_000) if f["kind"] == kind]
    finally:
        j.close()


def test_epsilon_trap_raises_slow_convergence_within_150_steps(tmp_path, reference):
    d = _supervised(tmp_path, reference, eps=1e-3, seed=42)
    found = _findings(d, "slow_convergence")
    assert found, "the ε = 1e-3 run was not flagged"
    assert found[0]["step"] <= STEPS
    ev = found[0]["evidence"]
    assert ev["ratio"] > 1.5  # needs well over 50% more tokens than the reference for the same loss
    # the preflight override was journaled with its reason
    j = d.journal()
    try:
        assert "scaled epsilon trap" in j.get_meta("preflight_override")["reason"]
        assert any(f["kind"] == "preflight_error" and f["evidence"]["field"] == "optimizer.eps"
                   for f in j.findings(limit=10_000))
    finally:
        j.close()
    # and the trainer really ran with that ε (the daemon passes its [optimizer] table to every rank)
    started = [e for e in d.events() if e.get("event") == "generation started"]
    assert started and '--supervision.optimizer {"eps": 0.001}' in started[0]["command"]


def test_healthy_run_with_another_seed_raises_nothing(tmp_path, reference):
    d = _supervised(tmp_path, reference, eps=1e-8, seed=7)
    assert _findings(d, "slow_convergence") == []
    assert [f["kind"] for f in _findings(d, "preflight_error")] == []


def test_young_daly_interval_is_applied_to_the_live_trainer(tmp_path):
    cfg = drill_config(tmp_path / "run", free_port(), steps=120)
    # No failures yet: the MTBF prior (0.02 h = 72 s) stands in until the journal has some.
    cfg["checkpoints"] = {"adaptive": True, "mtbf_prior_hours": 0.02, "min_interval_steps": 5,
                          "max_interval_steps": 60}
    d = Daemon(tmp_path, cfg).start()
    try:
        assert d.wait_exit(300) == 0, d.log_tail()
    finally:
        d.cleanup()
    j = d.journal()
    try:
        changes = [a for a in j.actions() if a["kind"] == "set_checkpoint_interval"]
    finally:
        j.close()
    assert changes, "no interval change was made"
    first = sorted(changes, key=lambda a: a["id"])[0]
    inputs, steps = first["params"]["inputs"], first["params"]["steps"]
    # the hand computation: sqrt(2 * C * MTBF) seconds, in whole steps, within the bounds
    by_hand = round(math.sqrt(2 * inputs["save_cost_s"] * inputs["mtbf_s"]) / inputs["step_seconds"])
    assert inputs["mtbf_s"] == pytest.approx(72.0)
    assert steps == min(60, max(5, by_hand)) and steps != 10
    # the trainer obeyed: after the directive, saves fall on multiples of the new interval
    records, events = spool(d.workdir)
    acks = [e for e in events if e["kind"] == "directive_applied" and e["directive"] == "set_checkpoint_interval"]
    assert acks[0]["ok"]
    later = [e for e in acks if e["directive_id"] != acks[0]["directive_id"]]  # resends ack "already applied"
    start, end = acks[0]["step"], (later[0]["step"] if later else 120)
    saved = {e["step"] for e in events if e["kind"] == "checkpoint_saved" and start < e["step"] <= end}
    due = {s for s in range(start + 1, end + 1) if s % steps == 0}
    assert due and due <= saved  # saved where the new interval says
    assert saved - due <= {120}  # and nowhere else (120: the final save)
