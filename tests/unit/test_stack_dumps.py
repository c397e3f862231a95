"""Stack dumps (supervisor/launch/stacks.py) of real processes with the real py-spy: a running
one, a SIGSTOPped one (the case faulthandler cannot cover), and a pid that is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from supervisor.launch import stacks

PROG = """
import time
def stuck_in_a_collective():
    while True:
        time.sleep(0.05)
print("ready", flush=True)
stuck_in_a_collective()
"""


@pytest.fixture
def procs():
    started = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", PROG], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_py_spy_is_installed_beside_the_interpreter():
    path = stacks.pyspy_path()
    assert path is not None, "py-spy is a dependency (requirements.lock): pip install it"
    assert subprocess.run([path, "--version"], capture_output=True, text=True).stdout.startswith("py-spy")


def test_every_rank_dumps_a_stopped_one_included(procs):
    running, stopped = procs(), procs()
    os.kill(stopped.pid, signal.SIGSTOP)
    time.sleep(0.1)
    assert stacks.is_stopped(stopped.pid) and not stacks.is_stopped(running.pid)
    out = stacks.dump_ranks({0: running.pid, 1: stopped.pid}, timeout_s=10.0)
    assert set(out) == {0, 1}
    for rank in (0, 1):
        ok, text = out[rank]
        assert ok, text
        assert "stuck_in_a_collective" in text, text
    assert out[1][1].startswith("(stopped, py-spy --nonblocking)")
    assert stacks.is_stopped(stopped.pid), "the dump must leave a stopped rank stopped"


def test_a_gone_pid_is_reported_not_raised(procs):
    p = procs()
    p.kill()
    p.wait()
    ok, text = stacks.dump_ranks({3: p.pid}, timeout_s=5.0)[3]
    assert not ok and text.startswith("py-spy exit"), text
