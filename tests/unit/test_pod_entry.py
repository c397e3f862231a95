"""The trainer pod's first process (supervisor/launch/pod_entry.py), run for real around a stand-in
for torchrun: its output passes through, its exit status is the pod's, a SIGTERM reaches it, and a
failure leaves a termination message that still names the SIGKILLed rank when tracebacks fill the
log's tail (what cut the report off in the Kubernetes drill, CI 2026-12-02)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from supervisor.launch.torchrun_report import MESSAGE_BYTES, root_cause, termination_message

ROOT = Path(__file__).resolve().parents[2]
# torchrun's report as CI printed it: the SIGKILLed rank 1 among the failures, the collateral
# rank 0 (its collective broke) named root cause with its whole traceback
FRAMES = "".join(f'    File "/venv/torch/_ops.py", line {i}, in __call__\n      return self._op(*args)\n'
                 for i in range(60))
LOG = ("[titan] step: 35 loss: 5.91\n"
       + "".join(f'[rank0]:   File "torch/_ops.py", line {i}, in __call__\n' for i in range(40))
       + "[rank0]: RuntimeError: Connection reset by peer\n"
       + "E1202 11:45:23.862000 12190 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 12197) of binary: py\n"
       + "=" * 60 + "\ntraining.run FAILED\n" + "-" * 60 + "\nFailures:\n[1]:\n  time      : 2026-12-02_11:45:23\n"
       + "  host      : pod\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 12198)  (SIGKILL)\n"
       + "  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 12198\n" + "-" * 60
       + "\nRoot Cause (first observed failure):\n[0]:\n  time      : 2026-12-02_11:45:23\n  host      : pod\n"
       + "  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 12197)\n  error_file: /tmp/x/error.json\n"
       + "  traceback : Traceback (most recent call last):\n" + FRAMES
       + "  RuntimeError: Connection reset by peer\n" + "=" * 60 + "\n")


def test_the_message_keeps_every_failure_where_the_logs_tail_lost_the_report():
    assert root_cause(LOG[-2048:]) is None  # what the kubelet's log fallback kept: no report header
    msg = termination_message(LOG)
    assert len(msg.encode()) <= MESSAGE_BYTES
    assert root_cause(msg) == (1, -9)
    assert "[rank0]: RuntimeError: Connection reset by peer" in msg  # the ranks' own last lines
    assert "_ops.py\", line 59" not in msg  # the report's traceback is left out


def test_a_huge_log_without_a_report_is_cut_to_the_limit_from_its_end():
    text = "".join(f"[rank{i % 3}]: line {i} " + "x" * 500 + "\n" for i in range(400))
    msg = termination_message(text)
    assert len(msg.encode()) <= MESSAGE_BYTES and "line 399" in msg and root_cause(msg) is None


def _entry(tmp_path, script: str, **env):
    out = tmp_path / "termination-log"
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.launch.pod_entry", "--", sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "TITAN_TERMINATION_LOG": str(out), **env})
    return proc, out


def test_a_failing_torchrun_leaves_the_message_and_its_exit_status(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    proc, out = _entry(tmp_path, f"import sys; sys.stdout.write(open({str(tmp_path / 'log.txt')!r}).read()); sys.exit(1)")
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stdout.decode() == LOG  # the pod's log is torchrun's output, byte for byte
    assert root_cause(out.read_text()) == (1, -9)


def test_a_clean_exit_writes_no_message_and_a_signal_death_is_128_plus_it(tmp_path):
    proc, out = _entry(tmp_path, "print('done')")
    assert proc.communicate(timeout=60)[0] == b"done\n" and proc.returncode == 0
    assert not out.exists()
    proc, out = _entry(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
    assert out.exists()  # a failure: whatever was printed (nothing) is the message


def test_sigterm_to_the_first_process_reaches_torchrun(tmp_path):
    """The kubelet signals only the container's first process; torchrun must hear it to stop its ranks."""
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('torchrun: SIGTERM', flush=True), sys.exit(143)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc, out = _entry(tmp_path, script)
    assert proc.stdout.readline() == b"ready\n"
    os.kill(proc.pid, signal.SIGTERM)
    t0 = time.time()
    rest, _ = proc.communicate(timeout=30)
    assert b"torchrun: SIGTERM" in rest and proc.returncode == 143 and time.time() - t0 < 20
