"""torchft mode's supervisor side without training: the Lighthouse's life cycle (the real
``torchft_lighthouse`` binary), the replica groups' launch specs, and group-level restart and
exclusion with real processes (``/bin/false`` stands in for a trainer that dies at once, so the
bookkeeping is exercised without torch)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from supervisor.launch.local import LaunchSpec
from supervisor.launch.torchft import FaultToleranceConfig, GroupExcluded, TorchftLauncher, group_spec
from supervisor.lighthouse import Lighthouse, LighthouseConfig, LighthouseError
from supervisor.settings import ConfigError, Settings


def _spec(tmp_path: Path, **kw) -> LaunchSpec:
    return LaunchSpec(generation=3, nproc=2, preset="tiny", workdir=tmp_path / "run",
                      supervisor_url="http://127.0.0.1:9", run_id="r", **kw)


def test_group_spec_gives_each_group_its_folder_flags_and_lighthouse(tmp_path):
    cfg = FaultToleranceConfig(mode="torchft", groups=3, process_group_timeout_ms=7000)
    specs = [group_spec(_spec(tmp_path), g, cfg, "http://127.0.0.1:1234") for g in range(3)]
    assert [s.workdir for s in specs] == [tmp_path / "run", tmp_path / "run" / "replica-1", tmp_path / "run" / "replica-2"]
    # every group heartbeats the daemon (the trainer posts step records from global rank 0 only)
    assert {s.supervisor_url for s in specs} == {"http://127.0.0.1:9"}
    for g, s in enumerate(specs):
        cmd = s.command()
        assert cmd[cmd.index("--fault_tolerance.replica_id") + 1] == str(g)
        assert cmd[cmd.index("--fault_tolerance.group_size") + 1] == "3"
        assert cmd[cmd.index("--fault_tolerance.process_group_timeout_ms") + 1] == "7000"
        assert "--fault_tolerance.enable" in cmd
        assert cmd[cmd.index("--supervision.fault_state") + 1] == str(tmp_path / "run" / "faults")  # one history
        assert s.env["TORCHFT_LIGHTHOUSE"] == "http://127.0.0.1:1234"
        assert s.generation == 3 and s.nproc == 2


def test_lighthouse_starts_listens_restarts_on_the_same_port_and_stops(tmp_path):
    lh = Lighthouse(LighthouseConfig(), tmp_path / "lighthouse.log")
    with pytest.raises(LighthouseError, match="not been started"):
        lh.address
    addr = lh.start()
    try:
        assert addr.startswith("http://127.0.0.1:") and lh.alive()
        assert lh.start() == addr and lh.starts == 1  # idempotent while it runs
        os.kill(lh.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while lh.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lh.ensure() is True and lh.address == addr and lh.starts == 2
        assert lh.ensure() is False
    finally:
        lh.stop()
    assert not lh.alive()


def test_an_external_lighthouse_is_never_started_or_stopped(tmp_path):
    lh = Lighthouse(LighthouseConfig(address="http://10.0.0.5:29510"), tmp_path / "lh.log")
    assert lh.start() == "http://10.0.0.5:29510" and lh.pid is None and lh.alive()
    lh.stop()
    assert not (tmp_path / "lh.log").exists()


def test_a_missing_lighthouse_binary_is_a_clear_error(tmp_path):
    lh = Lighthouse(LighthouseConfig(binary=str(tmp_path / "nope")), tmp_path / "lh.log")
    with pytest.raises((LighthouseError, FileNotFoundError)):
        lh.start()


def _wait_exits(gen, n: int, timeout: float = 20) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += gen.poll()
        time.sleep(0.05)
    return out


@pytest.mark.skipif(shutil.which("false") is None, reason="needs /bin/false")
def test_a_dead_group_is_relaunched_alone_and_excluded_when_it_keeps_failing(tmp_path):
    cfg = FaultToleranceConfig(mode="torchft", groups=2, exclude_after=3, exclude_window_s=600)
    launcher = TorchftLauncher(cfg, tmp_path / "logs")
    gen = launcher.start(_spec(tmp_path, python=shutil.which("false")))
    try:
        assert gen.world_size == 4 and gen.ranks_of(1) == [2, 3]  # 2 groups x 2 ranks, global numbering
        assert gen.reconfigure_s == 7.0  # the Lighthouse's heartbeat (5 s) + join (2 s) timeouts
        exits = _wait_exits(gen, 2)
        assert sorted(gen.group_of(e.rank) for e in exits) == [0, 1]
        assert gen.exited not in (None, 0)  # every group ended: the generation has exited
        first = gen.groups[1].pid
        for n in (1, 2):
            out = gen.restart_group(1, reason="test")
            assert out["replica_group"] == 1 and out["restarts"] == n and gen.groups[1].pid != first
            assert gen.exited is None  # a relaunched group: the generation runs again
            assert [gen.group_of(e.rank) for e in _wait_exits(gen, 1)] == [1]
        with pytest.raises(GroupExcluded, match="replica group 1 failed 3 times"):
            gen.restart_group(1, reason="test")
        with pytest.raises(GroupExcluded):
            gen.restart_group(1, reason="again")  # stays excluded
        with pytest.raises(ValueError, match="does not exist"):
            gen.restart_group(2, reason="test")
    finally:
        gen.stop(0.5)
        launcher.close()
    assert not launcher.lighthouse.alive()


def test_torchft_mode_needs_the_local_backend(tmp_path):
    with pytest.raises(ConfigError, match="torchft"):
        Settings.load(None, run={"workdir": str(tmp_path)}, fault_tolerance={"mode": "torchft"},
                      launch={"backend": "kubernetes"})
    s = Settings.load(None, run={"workdir": str(tmp_path)}, fault_tolerance={"mode": "torchft", "groups": 2})
    assert s.fault_tolerance.mode == "torchft" and s.fault_tolerance.lighthouse.heartbeat_timeout_ms == 5000
    assert Settings.defaults().fault_tolerance.mode == "off"
    with pytest.raises(ConfigError, match="more than groups"):
        Settings.load(None, run={"workdir": str(tmp_path)}, fault_tolerance={"groups": 2, "min_replica_size": 3})


def test_a_restarted_daemon_readopts_the_lighthouse_or_reuses_its_port(tmp_path):
    first = Lighthouse(LighthouseConfig(), tmp_path / "lighthouse.log")
    addr = first.start()
    try:
        again = Lighthouse(LighthouseConfig(), tmp_path / "lighthouse.log")  # a new daemon process
        assert again.readopt() and again.pid == first.pid and again.address == addr
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while first.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        third = Lighthouse(LighthouseConfig(), tmp_path / "lighthouse.log")
        assert not third.readopt()
        assert third.start() == addr and third.pid != first.pid  # the same port: groups keep their address
        third.stop()
    finally:
        first.stop()


def test_a_start_from_step_c_sets_newer_checkpoints_of_other_groups_aside(tmp_path):
    """A cold rollback to C: group g > 0 must not keep a newer checkpoint (group 0 would heal from it)."""
    from supervisor.launch.torchft import set_aside_newer

    ckpt = tmp_path / "replica-1" / "checkpoint"
    for step in (10, 20, 30):
        (ckpt / f"step-{step}").mkdir(parents=True)
        (ckpt / f"step-{step}" / "shard").write_bytes(b"x" * step)
    moved = set_aside_newer(tmp_path / "replica-1", 20)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-10", "step-20"]
    assert len(moved) == 1 and Path(moved[0]).name.startswith("step-30.rollback-")
    assert (Path(moved[0]) / "shard").read_bytes() == b"x" * 30  # moved, not deleted
    assert set_aside_newer(tmp_path / "replica-1", 20) == []  # idempotent


@pytest.mark.skipif(shutil.which("sleep") is None, reason="needs sleep")
def test_a_dead_lighthouse_is_started_again_on_its_port_while_groups_run(tmp_path):
    launcher = TorchftLauncher(FaultToleranceConfig(mode="torchft", groups=2), tmp_path / "logs")
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 30\n")
    sleeper.chmod(0o755)
    gen = launcher.start(_spec(tmp_path, python=str(sleeper)))
    try:
        addr, pid = launcher.lighthouse.address, launcher.lighthouse.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while gen.lighthouse_restarts == 0 and time.monotonic() < deadline:
            assert gen.poll() == []  # the groups are untouched
            time.sleep(0.05)
        assert gen.lighthouse_restarts == 1 and launcher.lighthouse.address == addr
        assert launcher.lighthouse.pid != pid and launcher.lighthouse.alive()
    finally:
        gen.stop(0.5)
        launcher.close()
