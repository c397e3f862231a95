"""The launcher's reading of torchrun's failure report (a real report's format, dead pids)."""

from pathlib import Path

from supervisor.launch.local import Generation, LaunchSpec

REPORT = """\
E1129 03:56:17.200000 9313 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 999991) of binary: python
Failures:
[1]:
  time      : 2026-11-29_03:56:17
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 999990)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 999990
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_03:56:17
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 999991)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 999991
"""


def test_both_ranks_seen_dead_in_one_poll_report_the_root_cause_first(tmp_path):
    log = tmp_path / "generation-0.log"
    log.write_text(REPORT)
    gen = Generation(LaunchSpec(0, 2, "tiny", Path(tmp_path), "http://x", "r"), 999989, log, None)
    gen.note_rank_pid(0, 999990)
    gen.note_rank_pid(1, 999991)
    exits = gen.poll()
    assert [(e.rank, e.exitcode) for e in exits] == [(1, -9), (0, -15)]
    assert gen.poll() == []  # each exit is reported once


def test_a_dead_ranks_own_error_is_found_after_the_other_ranks_buried_it(tmp_path):
    """The OOM drill's log layout (seen live): rank 1's OutOfMemoryError traceback, then rank 0's
    long traceback (its collective broke when rank 1 died) and torchrun's report, more than a tail
    window, before torchrun logs rank 1's exit code. The exit must still carry the OOM line, so the
    dead-rank detector calls it `oom`, not `dead_rank`."""
    from supervisor.detect.dead_rank import DeadRankDetector
    from supervisor.detect.findings import OOM

    oom = ("[rank1]: torch.OutOfMemoryError: CPU out of memory (injected): DefaultCPUAllocator: "
           "can't allocate memory: you tried to allocate 68719476736 bytes.")
    rank1 = [f"[rank1]:   File \"training/faults.py\", line {i}, in _allocate_gib" for i in range(20)] + [oom]
    rank0 = [f"[rank0]:   File \"torch/_ops.py\", line {i}, in __call__" for i in range(150)]
    rank0.append("[rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:3998.")
    report = ["W1201 14:26:15.770000 29463 api.py:1028] Sending process 999990 closing signal SIGTERM",
              "E1201 14:26:15.935000 29463 api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 999991) of binary: py"]
    log = tmp_path / "generation-0.log"
    log.write_text("\n".join(["[titan] step: 14 loss: 6.38918"] * 50 + rank1 + rank0 + report) + "\n")
    gen = Generation(LaunchSpec(0, 2, "tiny", Path(tmp_path), "http://x", "r"), 999989, log, None)
    gen.note_rank_pid(0, 999990)
    gen.note_rank_pid(1, 999991)
    assert not any("OutOfMemoryError" in line for line in gen.log_tail())  # buried: the tail alone misses it
    exits = {e.rank: e for e in gen.poll()}
    assert exits[1].exitcode == 1
    assert oom in exits[1].log_tail
    assert exits[0].log_tail[0].startswith("[rank0]")  # rank 0's exit carries its own lines first...
    assert oom in exits[0].log_tail  # ...and its peers': which exit is seen first is a race
    found = DeadRankDetector().observe_exit(1, exits[1].exitcode, 0.0, 14, log_lines=exits[1].log_tail)
    assert [f.kind for f in found] == [OOM]
    assert "OutOfMemoryError" in found[0].evidence["oom_log_line"]


def test_exits_wait_for_torchrun_s_report_and_an_oom_is_named_by_the_rank_that_wrote_it(tmp_path):
    """CI, 2026-12-02: rank 1 raised an OutOfMemoryError, rank 0's collective broke, and torchrun's
    "failed ... local_rank: 0" line was in the log before its report. Rank 0 was reported first and
    the OOM was called `dead_rank` of rank 0. Now no exit is reported while torchrun (alive) has
    not written its report, and the OOM is attributed by the tag of the line that shows it."""
    import os

    from supervisor.detect.dead_rank import DeadRankDetector
    from supervisor.detect.findings import OOM

    oom = "[rank1]: torch.OutOfMemoryError: CPU out of memory (injected)"
    rank0 = [f"[rank0]:   File \"torch/_ops.py\", line {i}, in __call__" for i in range(100)]
    rank0.append("[rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:3998.")
    log = tmp_path / "generation-0.log"
    log.write_text("\n".join([oom] + rank0 + [
        "E1202 06:01:02.000000 1 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 4000) of binary: py"]) + "\n")
    # torchrun's pid is this test process: alive, so the launcher waits for its report
    gen = Generation(LaunchSpec(0, 2, "tiny", Path(tmp_path), "http://x", "r"), os.getpid(), log, None)
    gen.note_rank_pid(0, 4000)
    gen.note_rank_pid(1, 4001)
    assert gen.poll() == []  # both dead, rank 0's exit code known, no report yet: held
    with log.open("a") as f:
        f.write(_report([(1, 1)], (0, 1)))  # torchrun's tie-break names the collateral rank 0
    exits = gen.poll()
    assert [(e.rank, e.exitcode) for e in exits] == [(0, 1), (1, 1)]
    (f,) = DeadRankDetector().observe_exit(0, 1, 0.0, 12, log_lines=exits[0].log_tail)
    assert (f.kind, f.rank, f.evidence["exited_rank"]) == (OOM, 1, 0)
    assert f.evidence["oom_log_line"] == oom


def test_held_exits_are_reported_when_torchrun_writes_no_report(tmp_path):
    """The wait for the report is bounded: a rank's death is never lost to a silent torchrun."""
    import os

    log = tmp_path / "generation-0.log"
    log.write_text("[titan] step: 3 loss: 7.1\n")
    gen = Generation(LaunchSpec(0, 2, "tiny", Path(tmp_path), "http://x", "r"), os.getpid(), log, None)
    gen.config.exitcode_wait_s = 0.2
    gen.note_rank_pid(1, 4001)
    assert gen.poll() == []
    import time

    time.sleep(0.25)
    assert [(e.rank, e.exitcode) for e in gen.poll()] == [(1, -9)]


def _report(failures: list[tuple[int, int]], root: tuple[int, int]) -> str:
    def entry(i, rank, code):
        return (f"[{i}]:\n  time      : 2026-12-01_17:02:11\n  host      : localhost\n"
                f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: {4000 + rank})\n"
                f"  error_file: <N/A>\n")
    body = "".join(entry(i + 1, r, c) for i, (r, c) in enumerate(failures)) or "  <NO_OTHER_FAILURES>\n"
    return ("train.py FAILED\n----\nFailures:\n" + body + "----\nRoot Cause (first observed failure):\n"
            + entry(0, *root) + "====\n")


def test_a_sigkilled_rank_is_the_cause_when_torchrun_names_its_peer_first():
    """CI, 2026-12-01: rank 1 SIGKILLed, rank 0's collective broke and it exited 1 in the same
    second; torchrun's tie-break named rank 0. The signal death is the cause, the peer's exception
    the symptom."""
    from supervisor.launch.torchrun_report import root_cause

    assert root_cause(_report([(1, -9)], (0, 1))) == (1, -9)
    assert root_cause(_report([(0, 1)], (1, -9))) == (1, -9)  # torchrun right: unchanged
    # a rank stopped by SIGTERM (torchrun, the daemon) is never the cause over an exception
    assert root_cause(_report([(0, -15)], (1, 1))) == (1, 1)
    assert root_cause(_report([], (1, 1))) == (1, 1)
    assert root_cause("[titan] step: 3 loss: 7.1\n") is None
    # the last report counts (an agent's log can hold one per attempt)
    assert root_cause(_report([], (0, 1)) + _report([(0, 1)], (1, -6))) == (1, -6)


def test_both_ranks_dead_in_one_poll_the_sigkilled_one_first_whatever_torchrun_named(tmp_path):
    log = tmp_path / "generation-0.log"
    log.write_text(_report([(1, -9)], (0, 1)))
    gen = Generation(LaunchSpec(0, 2, "tiny", Path(tmp_path), "http://x", "r"), 999989, log, None)
    gen.note_rank_pid(0, 4000)
    gen.note_rank_pid(1, 4001)
    assert [(e.rank, e.exitcode) for e in gen.poll()] == [(1, -9), (0, 1)]


FAKE_TORCHRUN = """
import signal, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
def term(*_):
    rank.terminate()  # torchrun forwards SIGTERM to its ranks...
    rank.wait()
    time.sleep(30)  # ...then takes its time to shut itself down
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print(rank.pid, flush=True)  # after the handler: the test's SIGTERM may follow at once
time.sleep(60)
"""


def test_stop_waits_for_the_ranks_not_for_torchrun_s_own_shutdown(tmp_path):
    """Real processes: a stand-in torchrun whose ranks stop on SIGTERM but which itself lingers.
    Once every rank is gone the generation's torchrun is SIGKILLed, not waited for (the grace is
    for the ranks); before, every restart waited out its shutdown (~2 s, bench/warm_spare.py)."""
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    rank_pid = int(proc.stdout.readline())
    gen = Generation(LaunchSpec(0, 1, "tiny", Path(tmp_path), "http://x", "r"), proc.pid, tmp_path / "g.log", proc)
    gen.note_rank_pid(0, rank_pid)
    gen.stop(60.0)
    assert proc.returncode == -9  # killed once its rank was gone, not after its own 30 s shutdown
    assert not psutil.pid_exists(rank_pid) or psutil.Process(rank_pid).status() == psutil.STATUS_ZOMBIE
