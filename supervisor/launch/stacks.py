"""Stack dumps of every rank of a hung generation, stopped ones included, bounded in time.

Why: the rank that matters in a hang is the one that stopped (SIGSTOP, a debugger, a stuck
kernel call); a signal-based dump (faulthandler on SIGUSR1) never runs in a stopped process,
so only its healthy peers used to dump. `py-spy dump` reads the interpreter's memory from
outside. Plain `py-spy dump` suspends the target with ptrace and fails on a process that is
already stopped ("Failed to suspend process"); `--nonblocking` reads without suspending, and
a stopped process cannot change under it, so a stopped rank is dumped with `--nonblocking`
(and any rank whose suspended dump failed is retried that way).

Failure model: every rank is dumped concurrently, each bounded by `timeout_s`, so a hang of
N ranks costs about one timeout at worst, never N. A missing py-spy, a py-spy that fails or
times out, or a pid that is gone gives one line saying so for that rank; the caller falls
back to faulthandler for those. Nothing here signals or kills a process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil


def pyspy_path() -> str | None:
    """py-spy next to this interpreter (a venv's bin/, where pip puts it), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def is_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def dump_one(pyspy: str, pid: int, timeout_s: float) -> tuple[bool, str]:
    """(ok, text): py-spy's dump of `pid`, or why there is none."""
    stopped = is_stopped(pid)
    tries = [["--nonblocking"]] if stopped else [[], ["--nonblocking"]]
    why = ""
    for extra in tries:
        try:
            r = subprocess.run([pyspy, "dump", *extra, "--pid", str(pid)], capture_output=True,
                               text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"py-spy failed: {e}"
        if r.returncode == 0 and r.stdout.strip():
            state = "stopped, " if stopped else ""
            return True, f"({state}py-spy{' ' + extra[0] if extra else ''})\n{r.stdout}"
        why = (r.stderr or r.stdout).strip().splitlines()[:3]
        why = f"py-spy exit {r.returncode}: {' / '.join(why)}"
    return False, why


def dump_ranks(rank_pids: dict[int, int], timeout_s: float) -> dict[int, tuple[bool, str]]:
    """Every rank's dump at once: {rank: (ok, text)}; (False, reason) where py-spy gave none."""
    pyspy = pyspy_path()
    if pyspy is None:
        return {rank: (False, "py-spy not installed") for rank in rank_pids}
    if not rank_pids:
        return {}
    with ThreadPoolExecutor(max_workers=len(rank_pids)) as pool:
        futs = {rank: pool.submit(dump_one, pyspy, pid, timeout_s) for rank, pid in rank_pids.items()}
        return {rank: f.result() for rank, f in futs.items()}
