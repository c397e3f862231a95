"""The pure and file-level pieces of the warm spare (supervisor/launch/spare.py, training/spare.py):
which spare may serve which start, the launch file both sides agree on, and that a journaled
spare record is only ever killed when its pid is still that spare (real processes, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from supervisor.launch import spare as launch_spare
from supervisor.launch.local import LaunchSpec
from supervisor.launch.spare import SpareRecord, kill_recorded, spare_key, verdict
from training import spare as rank_spare

ROOT = Path(__file__).resolve().parents[2]


def _spec(**kw) -> LaunchSpec:
    base = dict(generation=3, nproc=2, preset="tiny", workdir=Path("/w"), supervisor_url="http://127.0.0.1:1",
                run_id="r", load_step=40, skip_batches=7, lr_scale=0.5, env={"A": "1"}, python="/py")
    return LaunchSpec(**{**base, **kw})


def test_key_is_the_world_and_environment_only():
    a = _spec()
    same = _spec(generation=9, load_step=None, skip_batches=0, lr_scale=1.0, faults="crash@3",
                 extra_args=["--parallelism.tensor_parallel_degree", "2"])
    assert spare_key(a.interpreter(), a.nproc, a.env) == spare_key(same.interpreter(), same.nproc, same.env)
    for other in (_spec(nproc=1), _spec(env={"A": "2"}), _spec(env={"A": "1", "TOKEN": "x"}), _spec(python="/py2")):
        assert spare_key(other.interpreter(), other.nproc, other.env) != spare_key(a.interpreter(), a.nproc, a.env)


def test_verdict():
    assert verdict(None, False, "k") == "no spare"
    assert verdict("k", False, "k") == "the spare died while parked"
    assert verdict("k", True, "j") == "the world or environment changed since the spare started"
    assert verdict("k", True, "k") == "use"


def test_a_spare_is_started_with_the_prefix_and_handed_exactly_the_trainer_argv(tmp_path):
    spec = _spec()
    assert spec.command() == spec.torchrun_prefix() + spec.trainer_argv()
    assert spec.torchrun_prefix()[-2:] == ["-m", "training.run"] and "--nproc-per-node=2" in spec.torchrun_prefix()
    argv = spec.trainer_argv()
    for flag, value in (("--supervision.generation", "3"), ("--checkpoint.load_step", "40"),
                        ("--supervision.skip_batches", "7"), ("--supervision.lr_scale", "0.5")):
        assert argv[argv.index(flag) + 1] == value
    rec = SpareRecord(pid=1, create_time=0.0, folder=str(tmp_path), key="k")
    launch_spare.Spare(rec, proc=None, log_path=tmp_path / "x.log", started_at=0.0).hand_off(argv)
    assert rank_spare.read_launch(tmp_path / rank_spare.LAUNCH_FILE) == argv
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed
    assert launch_spare.LAUNCH_FILE == rank_spare.LAUNCH_FILE and launch_spare.OWNER_ENV == rank_spare.OWNER_ENV


@pytest.mark.parametrize("body", ["not json", "[1]", '{"argv": "--preset tiny"}', '{"argv": [1, 2]}', "{}"])
def test_a_malformed_launch_file_is_an_error_naming_it(tmp_path, body):
    path = tmp_path / rank_spare.LAUNCH_FILE
    path.write_text(body)
    with pytest.raises(ValueError, match="spare launch file"):
        rank_spare.read_launch(path)


def test_a_parked_rank_waits_for_the_launch_file(tmp_path):
    owner = f"{psutil.Process().pid}:{psutil.Process().create_time()!r}"
    got: list = []
    t = threading.Thread(target=lambda: got.append(rank_spare.wait_for_launch(tmp_path, owner, poll_s=0.01)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not got  # still parked
    (tmp_path / rank_spare.LAUNCH_FILE).write_text(json.dumps({"argv": ["--preset", "tiny"]}))
    t.join(5)
    assert got == [["--preset", "tiny"]]


def test_a_parked_rank_gives_up_when_its_owner_is_gone(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(p.pid).create_time()
    p.wait()
    assert rank_spare.wait_for_launch(tmp_path, f"{p.pid}:{created!r}", poll_s=0.01, owner_check_s=0.01) is None
    me = psutil.Process()
    assert rank_spare.owner_alive(f"{me.pid}:{me.create_time()!r}")
    assert not rank_spare.owner_alive(f"{me.pid}:{me.create_time() - 5!r}")  # same pid, other process
    assert not rank_spare.owner_alive("garbage")


def test_a_recorded_spare_is_killed_only_if_the_pid_is_still_that_spare(tmp_path):
    folder = tmp_path / "spare-1"
    cmd = [sys.executable, "-c", "import time; time.sleep(60)", "--spare", str(folder)]
    victim = subprocess.Popen(cmd, start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        ct = psutil.Process(victim.pid).create_time()
        # a reused pid (other start time), another folder, a process that is no spare: untouched
        assert not kill_recorded({"pid": victim.pid, "create_time": ct - 10, "folder": str(folder), "key": "k"})
        assert not kill_recorded({"pid": victim.pid, "create_time": ct, "folder": str(tmp_path / "x"), "key": "k"})
        bct = psutil.Process(bystander.pid).create_time()
        assert not kill_recorded({"pid": bystander.pid, "create_time": bct, "folder": str(folder), "key": "k"})
        assert not kill_recorded({"pid": "x"}) and not kill_recorded(None)
        assert victim.poll() is None and bystander.poll() is None
        assert kill_recorded({"pid": victim.pid, "create_time": ct, "folder": str(folder), "key": "k"})
        assert victim.wait(5) == -9
        assert bystander.poll() is None
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no scheduler autogroups on this kernel")
def test_a_spare_session_yields_the_cpu_while_parked_and_takes_it_back_at_the_hand_off():
    """Measured on bench/goodput.py (preset small, 2 cores): with each spare rank in a session of its
    own at autogroup nice 0, the training steps beside a spare's imports ran at 0.8-1.0 s instead of
    ~0.45 s for ~25 steps; the per-thread nice of the import thread did not help across sessions.
    Run in a child with a session of its own, so pytest's autogroup is not touched."""
    code = ("from training import spare\n"
            "spare.yield_cpu(); print(open('/proc/self/autogroup').read().split()[-1])\n"
            "why = spare.reclaim_cpu(); print(open('/proc/self/autogroup').read().split()[-1], why)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True, timeout=60)
    parked, handed = p.stdout.splitlines()
    assert parked == "19", p.stderr
    if os.geteuid() == 0:  # CAP_SYS_NICE: back to 0
        assert handed == "0 None"
    else:  # without it the generation stays at 19, and the log says why
        assert handed.startswith("19 still at low CPU priority")
    # the launcher's side: the torchrun agent's session, set from outside right after the spawn
    agent = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert launch_spare.yield_cpu(agent.pid)
        assert Path(f"/proc/{agent.pid}/autogroup").read_text().split()[-1] == "19"
    finally:
        agent.kill()
        agent.wait()


def test_spare_folders_are_swept_keeping_only_the_parked_and_the_handed_out_one(tmp_path):
    """A daemon that runs for months makes a spare folder per restart; the gone ones are removed
    (real `sleep` processes stand in for parked torchruns, each in its own session)."""
    spares, logs = tmp_path / "spares", tmp_path / "logs"
    logs.mkdir()
    procs = []

    def popen(cmd, log_path, env):
        procs.append(subprocess.Popen(["sleep", "30"], start_new_session=True))
        return procs[-1]

    ws = launch_spare.WarmSpare(spares, logs, retry_s=0.0, reap_s=5.0)
    other = spares / "not-a-spare"
    other.mkdir(parents=True)
    folders = []
    try:
        for _ in range(3):
            s = ws.ensure(popen, ["torchrun"], "/py", 1, {}, {})
            folders.append(Path(s.record.folder))
            taken, why = ws.take("/py", 1, {})
            assert why == "use" and taken is s
        parked = ws.ensure(popen, ["torchrun"], "/py", 1, {}, {})
        # the first two handed-out spares' folders are gone; the last handed-out one is kept (its
        # generation's ranks read it), and so is the parked one's and anything not ours
        assert [f.is_dir() for f in folders] == [False, False, True]
        assert Path(parked.record.folder).is_dir() and other.is_dir()
        assert ws.discard("test") == "test"
        assert not Path(parked.record.folder).exists()
        assert procs[-1].wait(timeout=5) != 0  # discarded: killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
