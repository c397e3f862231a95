"""What `/readyz` reports besides "started": the daemon's own recent faults.

Why: with the disk full the daemon used to log tracebacks while `/readyz` stayed 200 and no
metric moved. Every fault of the daemon's own machinery (a journal write that failed, a full
disk, a record dead-lettered) is noted here and counted in
``titan_supervisor_errors_total{kind}``; `/readyz` is 503 with the reasons while any fault is
more recent than `Config.window_s`, and recovers by itself once writes succeed again.

Failure model: in memory only (a restarted daemon starts healthy and finds out again).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from typing import Annotated, Callable

from supervisor.config_types import Seconds, doc


def fault_kind(exc: BaseException) -> str:
    """``disk_full`` for ENOSPC / SQLITE_FULL, else ``journal_write``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    if "full" in str(exc).lower():  # sqlite3.OperationalError: database or disk is full
        return "disk_full"
    return "journal_write"


class Health:
    @dataclass
    class Config:
        window_s: Annotated[Seconds, doc("a fault makes /readyz fail for this long after it happened")] = 60.0

    def __init__(self, metrics, log, config: Config | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config or Health.Config()
        self._metrics, self._log, self._clock = metrics, log, clock
        self._faults: dict[str, tuple[float, str]] = {}  # kind -> (last at, reason)

    def fault(self, kind: str, reason: str, n: int = 1) -> None:
        self._metrics.error(kind, n)
        first = kind not in self._faults
        self._faults[kind] = (self._clock(), reason[:500])
        if first:
            self._log.error("supervisor fault", kind=kind, reason=reason[:500])

    def metrics_only(self, kind: str, n: int = 1) -> None:
        """Count refused input or a transient condition that is not a fault of the daemon."""
        self._metrics.error(kind, n)

    def problems(self) -> dict[str, str]:
        now = self._clock()
        live = {k: r for k, (t, r) in self._faults.items() if now - t < self.config.window_s}
        for k in set(self._faults) - set(live):
            del self._faults[k]
        return live


class LoopLagGuard:
    """Tells the reconcile loop when its own sleep overran: the daemon, not a rank, stalled."""

    @dataclass
    class Config:
        max_lag_s: Annotated[Seconds, doc("a reconcile sleep this much longer than asked is a stall")] = 1.0

    def __init__(self, config: Config, poll_s: float) -> None:
        self.config, self._poll_s = config, poll_s

    def stalled(self, slept_s: float) -> float | None:
        """The stall in seconds when a sleep of ``poll_s`` took ``slept_s``, else None."""
        lag = slept_s - self._poll_s
        return lag if lag > self.config.max_lag_s else None
