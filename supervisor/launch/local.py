"""Start, watch and stop one generation of trainer ranks on this machine.

A generation is one fresh ``torchrun --standalone`` in its own session (process group), with
its own rendezvous port: torchrun's in-place restarts share a rendezvous store across
restarts and were unreliable on gloo (see shared/notes), so every restart is a new torchrun.

Failure model and guarantees:
- The trainer survives a daemon crash: it runs in its own session, so a SIGKILL of the daemon
  does not reach it, and the daemon re-adopts it by pid from the journal (``adopt``).
- ``poll`` reports each rank's exit once: from torchrun's own exit code when we are its parent,
  and from the rank pids (known from heartbeats or /proc) disappearing otherwise. A SIGKILLed
  rank is seen within one poll interval.
- ``stop`` is idempotent: SIGTERM to the whole process group, SIGKILL after a grace period
  (a SIGSTOPped rank cannot handle SIGTERM; SIGKILL still reaches it).
- Nothing here decides anything: it reports facts to the daemon.
- Only our own processes are ever signalled: a rank pid is accepted (`Generation.owns`) only if
  it descends from this generation's torchrun and started after it, and its start time is kept,
  so a pid reused by another process after the rank died is never killed (`stop`).
- A rank exit carries the rank's own last lines (`exit_lines`), not only the log's tail: the
  evidence of how it died (an OutOfMemoryError) is found however much the other ranks and
  torchrun wrote after it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import psutil

from supervisor.config_types import PositiveInt, Seconds, doc
from supervisor.detect.findings import by_writer
from supervisor.launch import stacks
from supervisor.launch.spare import Spare, SpareRecord, WarmSpare
from supervisor.launch.torchrun_report import root_cause


@dataclass
class LauncherConfig:
    """The launcher's timings and log windows (settings: ``[launch.local]``)."""

    log_tail_lines: Annotated[PositiveInt, doc(
        "log lines attached to a rank exit (the dead-rank and hardware detectors read them)")] = 60
    log_tail_bytes: Annotated[PositiveInt, doc("bytes read from the end of the generation log for a tail")] = 64 * 1024
    log_scan_lines: Annotated[PositiveInt, doc(
        "log lines searched for torchrun's root cause and per-pid exit codes")] = 300
    rank_scan_bytes: Annotated[PositiveInt, doc(
        "bytes read from the end of the generation log for a dead rank's own lines (`[rankN]: `, the tag "
        "torch.distributed's excepthook puts on every line of an uncaught exception): its error is found "
        "there even when the other ranks' tracebacks and torchrun's report pushed it out of the tail")] = 1024 * 1024
    rank_lines: Annotated[PositiveInt, doc(
        "a dead rank's own last lines attached to its exit, ahead of the tail (the OOM and hardware "
        "detectors read them)")] = 60
    exitcode_wait_s: Annotated[Seconds, doc(
        "after a rank's process is gone, wait at most this for torchrun to log a failure (it does ~0.4 s "
        "after a crash) or for rank 0's `finished` event: upstream torchtitan's rank 0 sleeps 2 s after the "
        "last step before it returns, while the other ranks exit at once")] = 3.0
    finish_exit_wait_s: Annotated[Seconds, doc(
        "after the trainer said it finished, wait at most this for torchrun's own exit code")] = 30.0
    stop_poll_s: Annotated[Seconds, doc("how often stop() checks whether the ranks are gone")] = 0.05
    reap_timeout_s: Annotated[Seconds, doc("wait for torchrun to be reaped after SIGKILL")] = 5.0
    stack_dump_timeout_s: Annotated[Seconds, doc(
        "py-spy dump timeout per rank; all ranks are dumped at once, so this bounds the whole dump")] = 5.0
    spare_retry_s: Annotated[Seconds, doc(
        "a warm spare that died while parked is not replaced before this many seconds (no spawn loop; "
        "`[launch] warm_spare`)")] = 30.0


@dataclass
class LaunchSpec:
    generation: int
    nproc: int
    preset: str
    workdir: Path
    supervisor_url: str
    run_id: str
    load_step: int | None = None
    skip_batches: int = 0
    lr_scale: float = 1.0
    lr_ramp_steps: int = 0
    steps: int | None = None
    checkpoint_interval: int | None = None
    faults: str = ""
    optimizer_json: str = ""
    extra_args: list[str] = field(default_factory=list)
    python: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        return self.torchrun_prefix() + self.trainer_argv()

    def interpreter(self) -> str:
        return self.python or _default_python()

    def torchrun_prefix(self) -> list[str]:
        """torchrun and the module it runs: what a warm spare is started with (supervisor/launch/spare.py)."""
        return [self.interpreter(), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                "-m", "training.run"]

    def trainer_argv(self) -> list[str]:
        """The trainer's own flags: everything a warm spare learns only at its hand-off."""
        cmd = ["--preset", self.preset, "--dump_folder", str(self.workdir),
               "--supervision.url", self.supervisor_url, "--supervision.run_id", self.run_id,
               "--supervision.generation", str(self.generation),
               "--supervision.skip_batches", str(self.skip_batches),
               "--supervision.lr_scale", repr(float(self.lr_scale)),
               "--supervision.lr_ramp_steps", str(self.lr_ramp_steps)]
        if self.load_step is not None:
            cmd += ["--checkpoint.load_step", str(self.load_step)]
        if self.steps is not None:
            cmd += ["--training.steps", str(self.steps)]
        if self.checkpoint_interval is not None:
            cmd += ["--checkpoint.interval", str(self.checkpoint_interval)]
        if self.faults:
            cmd += ["--supervision.faults", self.faults]
        if self.optimizer_json:
            cmd += ["--supervision.optimizer", self.optimizer_json]
        return cmd + list(self.extra_args)


def _default_python() -> str:
    import sys

    return sys.executable


@dataclass
class RankExit:
    rank: int | None
    exitcode: int
    pid: int | None
    log_tail: list[str]
    wall_time: float
    host: str | None = None  # the node it ran on, where the launcher knows it (kubernetes)
    oom_killed: bool = False  # the kernel/kubelet says it was OOM-killed (kubernetes: OOMKilled)


# torchrun's failure report: "exitcode  : -9 (pid: 1234)" and "failed (exitcode: -9) local_rank: 1 (pid: 1234)"
_EXIT_BY_PID = (re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)"),
                re.compile(r"exitcode:\s*(-?\d+)\)\s*local_rank:\s*\d+\s*\(pid:\s*(\d+)\)"))


class Generation:
    """One running (or adopted) torchrun process group."""

    def __init__(self, spec: LaunchSpec, pid: int, log_path: Path, proc: subprocess.Popen | None,
                 config: LauncherConfig | None = None) -> None:
        self.config = config or LauncherConfig()
        self.spec = spec
        self.pid = pid
        self.log_path = log_path
        self._proc = proc
        self.rank_pids: dict[int, int] = {}
        self._started: dict[int, float | None] = {}  # rank pid -> its start time when noted
        self._reported: set[int] = set()
        self._dead_since: dict[int, float] = {}
        self.exited: int | None = None
        self.started_at = time.time()
        self.exit_expected = False  # the trainer said it finished: rank exits are normal
        self.spare = "off"  # "used": a warm spare became this generation; else why it started cold
        self.stopping = False  # the daemon is stopping it: rank exits are not findings

    @property
    def generation(self) -> int:
        return self.spec.generation

    def note_rank_pid(self, rank: int, pid: int) -> None:
        if rank not in self.rank_pids:
            self.rank_pids[rank] = pid
            self._started[pid] = _create_time(pid)

    def owns(self, pid: int) -> bool:
        """``pid`` is a live descendant of this generation's torchrun that started after it."""
        try:
            root = psutil.Process(self.pid)
            proc = psutil.Process(pid)
            return (proc.create_time() >= root.create_time()
                    and any(p.pid == self.pid for p in proc.parents()))
        except psutil.Error:
            return False

    def _same_process(self, pid: int) -> bool:
        """``pid`` still names the process noted for a rank (not a reused pid)."""
        started = self._started.get(pid)
        return started is not None and _create_time(pid) == started

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            p = psutil.Process(self.pid)
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def log_tail(self, n: int | None = None, nbytes: int | None = None) -> list[str]:
        n = self.config.log_tail_lines if n is None else n
        nbytes = self.config.log_tail_bytes if nbytes is None else nbytes
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - nbytes))
                return f.read().decode(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def exit_lines(self, rank: int | None) -> list[str]:
        """The lines a rank exit carries: the rank's own last lines, its peers', then the log's tail.

        The generation log interleaves every rank and torchrun. A rank that dies of an uncaught
        exception writes its traceback before it exits, but by the time the exit is seen the other
        ranks' tracebacks (a peer's death breaks their collectives) and torchrun's report can fill
        the whole tail window, so the tail alone lost the error (an injected OOM was classified
        `dead_rank`). torch.distributed's excepthook tags each line ``[rankN]: ``, so each rank's
        own lines are picked out of a much wider window; they do not depend on timing. The peers'
        lines come too: which rank's exit is seen first is a race (a collateral exit can be), and
        the detectors attribute a tagged line to the rank that wrote it (`findings.tagged_rank`).
        """
        tail = self.log_tail()
        if rank is None:
            return tail
        tagged, _ = by_writer(self.log_tail(sys.maxsize, self.config.rank_scan_bytes), self.config.rank_lines,
                              first=rank)
        return tagged + tail

    def poll(self) -> list[RankExit]:
        """New rank exits since the last poll (each reported once), the root cause first.

        Exits are held, for at most ``exitcode_wait_s`` after the first death, until torchrun's
        failure report (which names the root cause, ~0.4 s after a crash) is in the log: before
        it, a peer that died of the broken collective could be reported first, because its exit
        line can precede the report and it sorts first by rank (a collateral rank 0 was named for
        rank 1's OOM, and for rank 1's SIGKILL, in loaded CI runs)."""
        out: list[RankExit] = []
        now = time.time()
        dead = [r for r, pid in self.rank_pids.items() if r not in self._reported and not _pid_alive(pid)]
        for rank in dead:
            self._dead_since.setdefault(rank, now)
        # the log is read only when there is a death to explain, once per poll (not every tick)
        report = self._scan_text() if dead else ""
        cause = root_cause(report)
        root = cause[0] if cause else None
        if (dead and root is None and not self.exit_expected and self.alive()
                and now - min(self._dead_since[r] for r in dead) < self.config.exitcode_wait_s):
            dead = []
        # The root cause first, then the rank seen dead first (torchrun SIGTERMs the others).
        for rank in sorted(dead, key=lambda r: (r != root, self._dead_since[r], r)):
            pid = self.rank_pids[rank]
            first = self._dead_since[rank]
            # torchrun logs the exit code ~0.4 s after the death: wait for it, briefly.
            code = self._exitcode_from_log(rank, report)
            if code is None and self.exit_expected:
                if self.alive() and now - first < self.config.finish_exit_wait_s:
                    continue  # a normal exit: torchrun's own exit code will tell
                code = self._proc.returncode if self._proc is not None and self._proc.returncode is not None else 0
            elif code is None and now - first < self.config.exitcode_wait_s and self.alive():
                continue
            self._reported.add(rank)
            out.append(RankExit(rank, code if code is not None else -9, pid, self.exit_lines(rank), now))
        if self.exited is None and not self.alive():
            code = self._proc.returncode if self._proc is not None else None
            if code is None:  # adopted: not our child, so no exit status; the trainer told us
                code = 0 if self.exit_expected else 1
            self.exited = code
            if self.exited != 0 and not out and len(self._reported) < max(1, len(self.rank_pids)):
                rank = next((r for r in sorted(self.rank_pids) if r not in self._reported), None)
                logged = self._exitcode_from_log(rank, self._scan_text()) if rank is not None else None
                out.append(RankExit(rank, logged if logged is not None else self.exited, None,
                                   self.exit_lines(rank), now))
                if rank is not None:
                    self._reported.add(rank)
        return out

    def _scan_text(self) -> str:
        """The log's last ``log_scan_lines``: where torchrun's exit lines and report are."""
        return "\n".join(self.log_tail(self.config.log_scan_lines))

    def _exitcode_from_log(self, rank: int | None, text: str) -> int | None:
        """The exit code torchrun reported for this rank's pid in ``text`` (the log's last
        ``log_scan_lines``), if it has yet."""
        pid = self.rank_pids.get(rank) if rank is not None else None
        for pattern in _EXIT_BY_PID:
            for m in pattern.finditer(text):
                if pid is None or int(m.group(2)) == pid:
                    return int(m.group(1))
        return None

    def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``. Idempotent.

        The grace is for the ranks (a checkpoint being written, the spool flushed): once every
        known rank is gone, torchrun holds nothing worth waiting for, and its own shutdown took
        ~2 s of every restart (measured, bench/warm_spare.py), so it is killed at once. Until every
        rank's pid is known torchrun is waited for too: it is what stops the ranks we cannot name
        (they run in sessions of their own, out of reach of the group signal)."""
        pids = set(self.rank_pids.values())
        if len(self.rank_pids) < self.spec.nproc:
            pids.add(self.pid)
        _signal_group(self.pid, signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(self.config.stop_poll_s)
        _signal_group(self.pid, signal.SIGKILL)
        for p in set(self.rank_pids.values()):
            if not self._same_process(p):
                continue  # gone, or the pid now belongs to another process
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=self.config.reap_timeout_s)
            except subprocess.TimeoutExpired:
                pass

    def dump_stacks(self) -> str:
        """Stack dumps of every rank, at once and stopped ones included (supervisor/launch/stacks.py);
        a rank py-spy could not dump gets faulthandler via SIGUSR1 into the log."""
        pids = dict(sorted(self.rank_pids.items()))
        dumps = stacks.dump_ranks(pids, self.config.stack_dump_timeout_s)
        out = []
        for rank, pid in pids.items():
            ok, text = dumps[rank]
            if ok:
                out.append(f"--- rank {rank} pid {pid} {text}")
                continue
            out.append(f"--- rank {rank} pid {pid}: {text}")
            if not self._same_process(pid):
                out.append(f"--- rank {rank} pid {pid}: gone")
                continue
            try:
                os.kill(pid, signal.SIGUSR1)
                out.append(f"--- rank {rank} pid {pid}: faulthandler dump sent to {self.log_path}")
            except ProcessLookupError:
                out.append(f"--- rank {rank} pid {pid}: gone")
        return "\n".join(out)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalLauncher:
    """The daemon's node agent for a single machine; with ``spares_dir`` it keeps a warm spare
    generation (supervisor/launch/spare.py) and serves matching starts from it."""

    Config = LauncherConfig

    def __init__(self, logs_dir: Path, config: LauncherConfig | None = None, *,
                 spares_dir: Path | None = None) -> None:
        self.logs_dir = Path(logs_dir)
        self.config = config or LauncherConfig()
        self.spares = None if spares_dir is None else WarmSpare(
            spares_dir, self.logs_dir, retry_s=self.config.spare_retry_s, reap_s=self.config.reap_timeout_s)

    def start(self, spec: LaunchSpec) -> Generation:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        why = "off"
        if self.spares is not None:
            spare, why = self.spares.take(spec.interpreter(), spec.nproc, spec.env)
            if spare is not None:
                return self._from_spare(spec, spare)
        log_path = self.logs_dir / f"generation-{spec.generation}.log"
        proc = self._popen(spec.command(), log_path, spec.env)
        gen = Generation(spec, proc.pid, log_path, proc, self.config)
        gen.spare = why
        return gen

    def _popen(self, cmd: list[str], log_path: Path, extra_env: dict[str, str]) -> subprocess.Popen:
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1",
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
        env.update(extra_env)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        with open(log_path, "ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                    start_new_session=True)

    def _from_spare(self, spec: LaunchSpec, spare: Spare) -> Generation:
        """The spare becomes generation ``spec.generation``: its ranks read this argv and go on."""
        spare.hand_off(spec.trainer_argv())
        log_path = self.logs_dir / f"generation-{spec.generation}.log"
        if log_path.exists():
            log_path = spare.log_path  # never overwrite an older log
        else:
            os.replace(spare.log_path, log_path)  # torchrun keeps writing to the same open file
        gen = Generation(spec, spare.pid, log_path, spare.proc, self.config)
        gen.spare = "used"
        return gen

    def ensure_spare(self, spec: LaunchSpec) -> SpareRecord | None:
        """Start a spare for generations like ``spec`` if none is parked; its record when started."""
        if self.spares is None:
            return None
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        s = self.spares.ensure(self._popen, spec.torchrun_prefix(), spec.interpreter(), spec.nproc, spec.env,
                               spec.env)
        return None if s is None else s.record

    def discard_spare(self, reason: str) -> str | None:
        return None if self.spares is None else self.spares.discard(reason)

    def spare_record(self) -> SpareRecord | None:
        s = None if self.spares is None else self.spares.spare
        return None if s is None else s.record

    def adopt(self, spec: LaunchSpec, pid: int, rank_pids: dict[int, int]) -> Generation | None:
        """Re-attach to a generation started by a previous daemon process, if it still runs."""
        if not _pid_alive(pid):
            return None
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return None
        if "training.run" not in cmdline:
            return None  # pid reused by something else
        gen = Generation(spec, pid, self.logs_dir / f"generation-{spec.generation}.log", None, self.config)
        for r, p in rank_pids.items():
            gen.note_rank_pid(int(r), int(p))
        return gen
