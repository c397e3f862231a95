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
