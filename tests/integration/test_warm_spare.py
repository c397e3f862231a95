"""Warm spare drills (`[launch] warm_spare`, supervisor/launch/spare.py, training/spare.py): real
torchrun, real torchtitan ranks, real signals. Nothing is mocked.

1. A SIGKILLed rank's restart is served by the parked spare: the action outcome says so, the
   spare's torchrun *is* generation 1 (same pid, its log renamed), the run reaches its last step,
   and every step generation 1 recomputed has exactly generation 0's loss (an unbroken run's).
2. A spare whose world no longer matches (ranks per node changed: a reshard) is killed and the
   start is cold, with the reason; the daemon never signals anything but its own spare.

CI cost: measured 77 s for (1) and 14 s for (2) at a load average of ~5 on this 2-core machine
(generation 0 is slowed to 1 s per step so that the spare parks before the kill; the kill comes
as soon as it has, so an idle machine pays less: ~35 s and ~8 s expected, not measured).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from supervisor.launch.local import LaunchSpec, LocalLauncher
from tests.daemon_harness import free_port, wait_until
from tests.trainer_harness import spool

pytestmark = [pytest.mark.integration, pytest.mark.drill]

STEPS = 80  # generation 0 (1 s per step) gives the spare ~70 s to park; generation 1 runs at full speed


def _parked(logs: Path) -> Path | None:
    """The spare log whose ranks have all parked (both ranks printed their line)."""
    for log in sorted(logs.glob("spare-*.log")):
        text = log.read_text(errors="replace")
        if "[spare rank0] parked" in text and "[spare rank1] parked" in text:
            return log
    return None


def test_killed_rank_restart_is_served_by_the_warm_spare(make_daemon):
    # generation 0 sleeps 1 s per step on rank 0, so it is still training when the spare parks
    d = make_daemon({"launch": {"warm_spare": True}}, steps=STEPS, faults="slow@1:rank=0:seconds=1.0").start()
    logs = d.workdir / "logs"
    spare_log = wait_until(lambda: _parked(logs), 120, "a parked spare")
    st = d.wait_for(lambda s: s if s.get("trainer_pids", {}).get("1") and s.get("step", 0) >= 12 else None,
                    60, "generation 0 past step 12")
    assert st["step"] < STEPS - 5, "generation 0 finished before the spare parked: slow it more"
    spare_pid = int(d.journal().get_meta("spare")["pid"])
    os.kill(int(st["trainer_pids"]["1"]), signal.SIGKILL)
    assert d.wait_exit(300) == 0, d.log_tail()

    j = d.journal()
    try:
        restart = next(a for a in j.actions() if a["kind"] == "restart")
        assert restart["state"] == "done"
        assert restart["outcome"]["warm_spare"] == "used", restart["outcome"]
        gens = j.generations()
        assert len(gens) == 2
        assert j.get_meta("generation_1")["torchrun_pid"] == spare_pid  # the spare became generation 1
        assert j.get_meta("spare") is None  # discarded at the end of the run, journal says so
    finally:
        j.close()
    gen1_log = logs / "generation-1.log"
    assert not spare_log.exists() and "[spare rank0] launched" in gen1_log.read_text(errors="replace")

    records, _ = spool(d.workdir)
    assert max(r["step"] for r in records) == STEPS
    g0 = {r["step"]: r["loss"] for r in records if r["generation"] == 0}
    g1 = {r["step"]: r["loss"] for r in records if r["generation"] == 1}
    redone = sorted(set(g0) & set(g1))
    assert redone, "generation 1 recomputed no step of generation 0 (no loss to compare)"
    assert {s: g1[s] for s in redone} == {s: g0[s] for s in redone}  # bit-exact resume from the spare
    # a second spare was started behind the first one, and none is left running after the run
    started = [e for e in d.events() if e.get("event") == "warm spare started"]
    assert len(started) >= 2, started
    left = [p for p in psutil.process_iter(["cmdline"]) if "--spare" in " ".join(p.info["cmdline"] or [])
            and str(d.workdir) in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_spare_of_another_world_is_killed_and_the_start_is_cold(tmp_path):
    """A spare started for 1 rank per node cannot serve a 2-rank generation (a reshard grew the
    world): the launcher kills it (its whole process group) and starts cold, saying why."""
    launcher = LocalLauncher(tmp_path / "logs", spares_dir=tmp_path / "spares")
    one = LaunchSpec(generation=0, nproc=1, preset="tiny", workdir=tmp_path / "run",
                     supervisor_url=f"http://127.0.0.1:{free_port()}", run_id="spare", steps=3)
    record = launcher.ensure_spare(one)
    assert record is not None and launcher.ensure_spare(one) is None  # at most one spare
    spare_proc = psutil.Process(record.pid)
    wait_until(lambda: "[spare rank0] parked" in (tmp_path / "logs" / f"{Path(record.folder).name}.log").read_text(),
          120, "the 1-rank spare to park")
    ranks = spare_proc.children(recursive=True)
    assert ranks, "the spare's torchrun has no rank process"
    gen = launcher.start(LaunchSpec(generation=1, nproc=2, preset="tiny", workdir=tmp_path / "run",
                                    supervisor_url=one.supervisor_url, run_id="spare", steps=3))
    try:
        assert gen.spare == "the world or environment changed since the spare started"
        assert gen.pid != record.pid and launcher.spare_record() is None
        gone, alive = psutil.wait_procs([spare_proc, *ranks], timeout=10)
        assert alive == [], alive  # torchrun and its rank, all killed
        assert not (Path(record.folder) / "launch.json").exists()  # it was never handed a launch
    finally:
        gen.stop(0.0)
