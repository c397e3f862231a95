"""Warm spare generations for the local launcher: a restart served by ranks whose imports are done.

Why: most of a cold restart here is torchrun's start-up and rendezvous plus `import torch` and
torchtitan in every rank (README, "Goodput"). `WarmSpare` keeps at most one spare: a
``torchrun --standalone ... -m training.run --spare DIR`` (its own fresh rendezvous endpoint)
whose ranks park after their imports (`training/spare.py`). A start that matches it writes the
generation's trainer argv to ``DIR/launch.json`` (write then rename: all ranks read the same
complete file) and the spare *becomes* the generation; a new spare is started later, once the
new generation trains (the daemon's reconcile loop asks, so the spare's start-up never competes
with a restart's).

Crash-only (a spare is disposable; any doubt kills it):
- It is used only when its `spare_key` equals the new spec's: same interpreter, ranks per node
  and environment (the trainer token included). A different world (a reshard, a layout that
  changes ranks) or environment kills it and the start is cold. Everything else about the run
  (load step, skips, LR scale, layout flags, settings) travels in the launch file, read only at
  the hand-off, so it can never be stale.
- A spare that died while parked is reaped and the start is cold; a new spare is not started
  again before `retry_s` has passed (no spawn loop).
- Only our own processes are signalled: the spare's torchrun is our child (its session leader),
  and a record left by an earlier daemon (`SpareRecord`, journaled) is killed only when its pid
  still names a process with the recorded start time and a ``--spare <its folder>`` command line.
  A restarted daemon never adopts a spare (its ranks hold the old daemon's trainer token); the
  ranks also exit by themselves once their owner daemon is gone.
- Folders do not pile up: a discarded spare's folder goes with it, and starting a spare sweeps
  every other ``spare-*`` folder but the one handed out last (`WarmSpare.sweep`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import shutil

import psutil

SPARE_FLAG = "--spare"
LAUNCH_FILE = "launch.json"  # training/spare.py reads it (the daemon never imports training/)
OWNER_ENV = "TITAN_SPARE_OWNER"
SPARE_AUTOGROUP_NICE = 19


def yield_cpu(pid: int) -> bool:
    """Give a just-started spare's session the lowest CPU share while it imports and parks.

    Why the autogroup and not the process's nice: Linux (``sched_autogroup_enabled``, the default
    on desktop and most server kernels) first shares the CPU fairly between sessions, and a spare
    runs in its own session, so a nice-19 thread in it still took half of a 2-core machine from
    the training generation: the steps beside a parked spare's imports ran at 0.8-1.0 s instead
    of 0.41-0.48 s, for ~25 steps (bench/goodput.py, preset small). This is the torchrun agent's
    session (it imports torch too); torchrun puts each rank in a session of its own, which the rank
    lowers itself and raises back at its hand-off (``training.spare.yield_cpu`` / ``reclaim_cpu``);
    the agent's stays at 19. False where there is no autogroup file."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(SPARE_AUTOGROUP_NICE))
        return True
    except OSError:
        return False


def spare_key(python: str, nproc: int, env: dict[str, str]) -> str:
    """What a spare is fixed to at its start (everything else comes in its launch file)."""
    body = json.dumps([python, int(nproc), sorted(env.items())], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def verdict(spare_key_: str | None, spare_alive: bool, wanted_key: str) -> str:
    """``"use"``, or why a spare cannot serve a start with ``wanted_key`` (pure)."""
    if spare_key_ is None:
        return "no spare"
    if not spare_alive:
        return "the spare died while parked"
    if spare_key_ != wanted_key:
        return "the world or environment changed since the spare started"
    return "use"


@dataclass
class SpareRecord:
    """What the journal keeps of a parked spare, so a restarted daemon can kill it safely."""

    pid: int
    create_time: float
    folder: str
    key: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Spare:
    record: SpareRecord
    proc: subprocess.Popen
    log_path: Path
    started_at: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand_off(self, argv: list[str]) -> None:
        folder = Path(self.record.folder)
        tmp = folder / (LAUNCH_FILE + ".tmp")
        tmp.write_text(json.dumps({"argv": argv}))
        os.replace(tmp, folder / LAUNCH_FILE)

    def kill(self, reap_s: float) -> None:
        if self.proc.poll() is None:
            _kill_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=reap_s)
        except subprocess.TimeoutExpired:
            pass


def _kill_tree(pid: int) -> None:
    """SIGKILL a spare's torchrun (verified ours by the caller) and its ranks. torchrun starts each
    rank in a session of its own, so the group signal alone would miss them: the ranks are its
    children that started after it, taken while it still runs."""
    try:
        root = psutil.Process(pid)
        ranks = [c for c in root.children(recursive=True) if c.create_time() >= root.create_time()]
    except psutil.Error:
        ranks = []
    try:
        os.killpg(pid, signal.SIGKILL)  # torchrun leads its own session
    except (ProcessLookupError, PermissionError):
        pass
    for r in ranks:
        try:
            r.kill()  # psutil checks the pid still names that process (its start time)
        except psutil.Error:
            pass


def rss_bytes(pid: int) -> tuple[int, int]:
    """(RSS, USS) summed over a process and its descendants (the parked spare's memory cost)."""
    rss = uss = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
        except psutil.Error:
            pass
    return rss, uss


def kill_recorded(record: dict | None) -> bool:
    """Kill a spare an earlier daemon process journaled, only if that pid is still that spare."""
    if not record:
        return False
    try:
        r = SpareRecord(**record)
        p = psutil.Process(int(r.pid))
        if abs(p.create_time() - float(r.create_time)) >= 0.01:
            return False  # the pid was reused
        cmd = p.cmdline()
        if SPARE_FLAG not in cmd or r.folder not in cmd:
            return False
        _kill_tree(r.pid)
        return True
    except (TypeError, ValueError, psutil.Error, ProcessLookupError, PermissionError):
        return False


class WarmSpare:
    """At most one parked spare generation; `take` hands it out, `ensure` starts one."""

    def __init__(self, spares_dir: Path, logs_dir: Path, *, retry_s: float, reap_s: float) -> None:
        self.spares_dir, self.logs_dir = Path(spares_dir), Path(logs_dir)
        self.retry_s, self.reap_s = retry_s, reap_s
        self.spare: Spare | None = None
        self._failed_at = -1e18
        self._in_use: str | None = None  # the folder of the spare handed out last (its ranks read it)
        self._owner = f"{os.getpid()}:{psutil.Process().create_time()!r}"

    def ensure(self, popen, prefix: list[str], python: str, nproc: int, env: dict[str, str],
               extra_env: dict[str, str]) -> Spare | None:
        """Start a spare unless one is parked (or one died within `retry_s`). The new one, or None.
        ``popen(cmd, log_path, env)`` starts a process in its own session."""
        if self.spare is not None:
            if self.spare.alive():
                return None
            self.discard("the spare died while parked")
        if time.monotonic() - self._failed_at < self.retry_s:
            return None
        self.sweep()
        name = f"spare-{time.time_ns()}"
        folder = self.spares_dir / name
        folder.mkdir(parents=True, exist_ok=False)
        log_path = self.logs_dir / f"{name}.log"
        proc = popen([*prefix, SPARE_FLAG, str(folder)], log_path, {**extra_env, OWNER_ENV: self._owner})
        yield_cpu(proc.pid)
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = time.time()
        record = SpareRecord(proc.pid, created, str(folder), spare_key(python, nproc, env))
        self.spare = Spare(record, proc, log_path, time.time())
        return self.spare

    def take(self, python: str, nproc: int, env: dict[str, str]) -> tuple[Spare | None, str]:
        """The parked spare for a start with this key (removed from the slot), or None and why."""
        s = self.spare
        why = verdict(s.record.key if s else None, s.alive() if s else False, spare_key(python, nproc, env))
        if why == "use":
            self.spare, self._in_use = None, s.record.folder
            return s, why
        if s is not None:
            self.discard(why)
        return None, why

    def discard(self, reason: str) -> str | None:
        """Kill and forget the spare (if any); a death while parked delays the next one."""
        s, self.spare = self.spare, None
        if s is None:
            return None
        if not s.alive():
            self._failed_at = time.monotonic()
        s.kill(self.reap_s)
        shutil.rmtree(s.record.folder, ignore_errors=True)
        return reason

    def sweep(self) -> list[str]:
        """Remove the folders of spares that are gone (discarded, or handed out before the last
        one), so a daemon that runs for months and restarts often keeps at most two: the parked
        spare's and the one the running generation was handed. Only ``spare-*`` folders in
        `spares_dir` (this class's own names) are touched. The removed paths."""
        keep = {self._in_use, None if self.spare is None else self.spare.record.folder}
        gone = []
        for d in sorted(self.spares_dir.glob("spare-*")) if self.spares_dir.is_dir() else []:
            if d.is_dir() and not d.is_symlink() and str(d) not in keep:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(str(d))
        return gone
