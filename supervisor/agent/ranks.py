"""One generation's ranks on this node: the node's torchrun, started, watched and stopped by its agent.

The process handling is the local launcher's (`supervisor.launch.local.Generation`): torchrun
in its own session, rank exits read from torchrun's failure report, SIGTERM then SIGKILL to the
process group, py-spy or faulthandler stack dumps. What this adds is what only the node can
know: which pid is which rank (the ``RANK`` torchrun put in each child's environment, read from
/proc), each rank's process state (``stopped`` for a SIGSTOPped rank), and a reading of each
exit (ok, crash, signal, oom, hardware) for `titan-supervisor nodes`.

Failure model: a rank pid is only ever learned from our own torchrun's children, so the agent
signals nothing but its own process tree. Exits of a run the daemon told us to stop are not
reported (they are the daemon's doing, not findings).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil

from supervisor.launch.local import Generation, LauncherConfig, LaunchSpec, RankExit
from supervisor.agent.health import KERNEL_PATTERNS
from supervisor.wire import ascii_int

_OOM = re.compile(r"out of memory|OutOfMemoryError|oom-kill|Killed process", re.IGNORECASE)
_HARDWARE = re.compile("|".join(f"(?:{rx})" for _, rx in KERNEL_PATTERNS), re.IGNORECASE)
ROOT = str(Path(__file__).resolve().parents[2])
_STACK_START = re.compile(r"^(Thread 0x[0-9a-f]+|Current thread 0x[0-9a-f]+|Stack \(most recent call first\))")


def classify(exitcode: int, log_tail: list[str]) -> tuple[str, str | None]:
    """(classification, signal name) of one rank exit."""
    sig = None
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
    text = "\n".join(log_tail[-60:])
    if exitcode == 0:
        return "ok", sig
    if _OOM.search(text):
        return "oom", sig
    if _HARDWARE.search(text):
        return "hardware", sig
    return ("signal" if sig else "crash"), sig


class NodeRun:
    """The node's part of one generation."""

    def __init__(self, order, logs_dir: Path, *, python: str = "", config: LauncherConfig | None = None,
                 relay_env: dict[str, str] | None = None) -> None:
        self.order = order
        self.relay_env = dict(relay_env or {})  # the heartbeat relay's url and this generation's secret
        self.generation = order.generation
        self.config = config or LauncherConfig()
        self.logs_dir = Path(logs_dir)
        self.python = python
        self.stopping = False
        self.stopped = False
        self.gen: Generation | None = None
        self.proc: subprocess.Popen | None = None
        self.failed: str | None = None

    def start(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"generation-{self.generation}.log"
        argv = list(self.order.argv)
        if self.python:
            argv[0] = self.python
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
        env.update(self.order.env)
        env.update(self.relay_env)  # the agent's own, after the daemon's: ranks beat to their agent
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        spec = LaunchSpec(generation=self.generation, nproc=0, preset="", workdir=self.logs_dir, supervisor_url="",
                          run_id="")
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        start_new_session=True)
        except OSError as e:
            self.failed = f"could not start {argv[0]}: {e}"
            return
        self.proc = proc
        self.gen = Generation(spec, proc.pid, log_path, proc, self.config)
        self._save_state(log_path)

    def _save_state(self, log_path: Path) -> None:
        """What a restarted agent needs to adopt this run (written atomically)."""
        state = {"order": self.order.model_dump(mode="json"), "torchrun_pid": self.gen.pid,
                 "create_time": psutil.Process(self.gen.pid).create_time(), "log": str(log_path),
                 "relay_env": self.relay_env}
        tmp = self.logs_dir / "current.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the relay secret
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state))
        os.replace(tmp, self.logs_dir / "current.json")

    @classmethod
    def adopt(cls, logs_dir: Path, *, config: LauncherConfig | None = None) -> "NodeRun | None":
        """The run a previous agent process started, if its torchrun still runs (same pid, same start time)."""
        from supervisor.protocol import NodeOrder

        try:
            state = json.loads((Path(logs_dir) / "current.json").read_text())
            order = NodeOrder.model_validate(state["order"])
            proc = psutil.Process(int(state["torchrun_pid"]))
            if proc.create_time() != state["create_time"] or proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None
        run = cls(order, logs_dir, config=config, relay_env=state.get("relay_env") or {})
        spec = LaunchSpec(generation=order.generation, nproc=0, preset="", workdir=Path(logs_dir), supervisor_url="",
                          run_id="")
        run.gen = Generation(spec, proc.pid, Path(state["log"]), None, run.config)
        return run

    # -- what the report says -----------------------------------------------------------------------
    @property
    def torchrun_pid(self) -> int | None:
        return self.gen.pid if self.gen is not None else None

    def state(self) -> tuple[str, int | None]:
        """(running | exited | stopped | failed, torchrun's exit code)."""
        if self.failed is not None:
            return "failed", 127
        if self.proc is not None:
            code = self.proc.poll()
        else:  # adopted: not our child, so no exit status
            code = None if self.gen is not None and self.gen.alive() else 0
        if code is None and not self.stopped:
            return "running", None
        if self.stopping or self.stopped:
            return "stopped", code
        return "exited", code

    def rank_pid(self, rank: int) -> int | None:
        """The pid of ``rank`` on this node: the one already learned, else the child of our torchrun
        whose environment says ``RANK=rank`` (read-only: called from the relay's threads; the agent's
        own loop records it in `discover`)."""
        gen = self.gen
        if gen is None:
            return None
        known = gen.rank_pids.get(rank)
        if known is not None:
            return known
        try:
            children = psutil.Process(gen.pid).children(recursive=False)
        except psutil.Error:
            return None
        for child in children:
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                continue
        return None

    def discover(self) -> None:
        """Learn which child of torchrun is which rank (``RANK`` in its environment)."""
        if self.gen is None:
            return
        try:
            children = psutil.Process(self.gen.pid).children(recursive=False)
        except psutil.Error:
            return
        for child in children:
            if child.pid in self.gen.rank_pids.values():
                continue
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            n = ascii_int(rank, max_digits=6)
            if n is not None:
                self.gen.note_rank_pid(n, child.pid)

    def ranks(self) -> list[dict]:
        out = []
        for rank, pid in sorted((self.gen.rank_pids if self.gen else {}).items()):
            try:
                st = psutil.Process(pid).status()
            except psutil.Error:
                continue
            out.append({"rank": rank, "pid": pid, "state": st})
        return out

    def poll(self) -> list[dict]:
        """New rank exits as `NodeRankExit` dicts (none for a run we were told to stop)."""
        if self.gen is None:
            return []
        self.discover()
        # A rank that ended without torchrun logging a failure finished normally: under several
        # nodes torchrun then waits at its exit barrier for the other nodes, so its own exit code
        # (or, within `finish_exit_wait_s`, 0) is the rank's. A crash or a signal is logged by
        # torchrun within a second and read from the log first.
        self.gen.exit_expected = True
        exits: list[RankExit] = self.gen.poll()
        if self.stopping or self.stopped:
            return []
        out = []
        for ex in exits:
            kind, sig = classify(ex.exitcode, ex.log_tail)
            out.append({"rank": ex.rank, "exitcode": max(-255, min(255, ex.exitcode)), "pid": ex.pid,
                        "signal": sig, "classification": kind, "log_tail": [x[:2000] for x in ex.log_tail[-60:]],
                        "wall_time": ex.wall_time})
        return out

    def stop(self, grace_s: float) -> None:
        """SIGTERM the node's torchrun group, SIGKILL after ``grace_s`` (blocking; run it in a thread)."""
        self.stopping = True
        if self.gen is not None:
            self.gen.stop(grace_s)
        self.stopped = True

    def dump_stacks(self) -> str:
        if self.gen is None:
            return "(no ranks running)"
        self.discover()
        text = self.gen.dump_stacks()
        if "faulthandler dump sent" in text:
            time.sleep(0.5)  # let faulthandler write
            tail = self.gen.log_tail(200)
            first = next((i for i, line in enumerate(tail) if _STACK_START.search(line)), None)
            text += "\n" + ("\n".join(tail[first:]) if first is not None else "(no faulthandler output yet: a "
                                                                                 "stopped rank writes it when resumed)")
        return text
