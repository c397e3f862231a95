"""The torchft Lighthouse: the one process every replica group asks for a quorum each step.

Owned by exactly one `Lighthouse` object: it either runs the ``torchft_lighthouse`` binary (from
the torchft package, next to the daemon's Python) on loopback, or, given ``address``, points at
one somebody else runs and never starts or stops it.

Why the daemon runs it: the Lighthouse decides who is alive (a group that stops heartbeating for
``heartbeat_timeout_ms`` leaves the quorum; the others go on without it), so its timings are the
run's timings for fault tolerance and belong in the one config tree.

Failure model: the Lighthouse holds no durable state (groups re-register on every heartbeat), so
a dead one is simply started again on the same port (`ensure`); while it is down, groups block in
their quorum for at most their quorum timeout. The process runs in its own session and outlives a
daemon crash; `adopt` re-attaches to it by pid only when that pid still runs the lighthouse binary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import psutil

from pydantic import Field

from supervisor.config_types import NonNegativeInt, PositiveInt, Seconds, doc

BINARY = "torchft_lighthouse"


class LighthouseError(RuntimeError):
    pass


@dataclass
class LighthouseConfig:
    """``[fault_tolerance.lighthouse]``: where the Lighthouse is, and its timings when we run it."""

    address: Annotated[str, doc(
        "http://host:port of a Lighthouse someone else runs; empty: the daemon runs its own on 127.0.0.1")] = ""
    port: Annotated[NonNegativeInt, Field(le=65535), doc(
        "port of the Lighthouse the daemon runs (0: a free one, chosen at start)")] = 0
    min_replicas: Annotated[PositiveInt, doc(
        "fewest replica groups that form a quorum (1: a lone surviving group keeps training)")] = 1
    heartbeat_timeout_ms: Annotated[PositiveInt, doc(
        "a group silent this long leaves the quorum: the longest the other groups stall on a dead group")] = 5000
    join_timeout_ms: Annotated[PositiveInt, doc(
        "how long a quorum waits for a heartbeating group that has not asked to join yet (a relaunched "
        "group between its first heartbeat and its first step)")] = 2000
    quorum_tick_ms: Annotated[PositiveInt, doc("how often the Lighthouse re-checks a pending quorum")] = 100
    start_timeout_s: Annotated[Seconds, doc("wait at most this for a started Lighthouse to accept connections")] = 30.0
    binary: Annotated[str, doc(
        "the lighthouse executable; empty: torchft_lighthouse next to this Python, else on PATH")] = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Lighthouse:
    Config = LighthouseConfig

    def __init__(self, config: LighthouseConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = Path(log_path)
        self.pid: int | None = None
        self.port: int | None = None
        self.starts = 0
        self._proc: subprocess.Popen | None = None

    @property
    def external(self) -> bool:
        return bool(self.config.address)

    @property
    def address(self) -> str:
        if self.external:
            return self.config.address
        if self.port is None:
            raise LighthouseError("the Lighthouse has not been started")
        return f"http://127.0.0.1:{self.port}"

    def binary(self) -> str:
        if self.config.binary:
            return self.config.binary
        beside = Path(sys.executable).parent / BINARY
        found = str(beside) if beside.is_file() else shutil.which(BINARY)
        if not found:
            raise LighthouseError(f"{BINARY} not found next to {sys.executable} or on PATH (it ships with torchft)")
        return found

    def command(self, port: int) -> list[str]:
        c = self.config
        return [self.binary(), "--min_replicas", str(c.min_replicas), "--bind", f"127.0.0.1:{port}",
                "--heartbeat_timeout_ms", str(c.heartbeat_timeout_ms), "--join_timeout_ms", str(c.join_timeout_ms),
                "--quorum_tick_ms", str(c.quorum_tick_ms)]

    def start(self) -> str:
        """Start ours (idempotent while it runs) and wait until it accepts connections; the address."""
        if self.external or self.alive():
            return self.address
        port = self.port or self.config.port or _free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid, self.port = self._proc.pid, port
        self.starts += 1
        self._state_path.write_text(json.dumps({"pid": self.pid, "port": port}))
        deadline = time.monotonic() + self.config.start_timeout_s
        while not _listening(port):
            if self._proc.poll() is not None:
                raise LighthouseError(f"the Lighthouse exited with {self._proc.returncode} at start (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise LighthouseError(f"the Lighthouse did not listen on 127.0.0.1:{port} within "
                                      f"{self.config.start_timeout_s:g} s (log: {self.log_path})")
            time.sleep(0.05)
        return self.address

    def alive(self) -> bool:
        if self.external:
            return True
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return self._is_lighthouse(self.pid)

    def ensure(self) -> bool:
        """Start it again if it died (same port: the groups keep their address). True if restarted."""
        if self.external or self.alive():
            return False
        self.start()
        return True

    @property
    def _state_path(self) -> Path:
        return self.log_path.with_suffix(".json")

    def readopt(self) -> bool:
        """After a daemon restart: re-attach to the Lighthouse the last daemon started (its pid and
        port are kept next to its log). If it is gone, the next `start` uses the same port, so the
        groups still running and a relaunched group never talk to two different Lighthouses."""
        if self.external or self.alive():
            return self.alive()
        try:
            state = json.loads(self._state_path.read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.port = port
        return self.adopt(pid, port)

    def adopt(self, pid: int, port: int) -> bool:
        """Re-attach to a Lighthouse an earlier daemon started, if ``pid`` still runs the binary."""
        if self.external or not self._is_lighthouse(pid):
            return False
        self.pid, self.port, self._proc = pid, port, None
        return True

    def stop(self, grace_s: float = 2.0) -> None:
        if self.external or self.pid is None:
            return
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.pid, self._proc = None, None

    @staticmethod
    def _is_lighthouse(pid: int) -> bool:
        try:
            p = psutil.Process(pid)
            # The binary is a Python entry-point script: [python, .../torchft_lighthouse, ...].
            return p.status() != psutil.STATUS_ZOMBIE and any(BINARY in part for part in p.cmdline()[:2])
        except psutil.Error:
            return False
