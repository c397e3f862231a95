"""sd_notify for `Type=notify` units, without libsystemd or a new dependency.

systemd hands the service a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace) and, with ``WatchdogSec=``, the interval in ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``). The daemon tells it READY=1 once it can serve, STATUS=... lines, STOPPING=1,
EXTEND_TIMEOUT_USEC=... while a slow start or stop is still making progress, and WATCHDOG=1 to
prove it is alive.

Failure model:
- Not under systemd (no ``NOTIFY_SOCKET``): every call is a no-op that returns False.
- The socket is gone or refuses (systemd restarting, a full queue): the message is dropped and
  counted; the daemon never fails or blocks because systemd is not listening. A datagram send
  on a unix socket does not block for long, and it is non-blocking here.
- ``NOTIFY_SOCKET``/``WATCHDOG_*`` are removed from the environment when read (what
  ``sd_notify(unset_environment=1)`` does), so trainer ranks the daemon launches do not inherit
  them and cannot speak for the service.
- The watchdog decision (``Watchdog.healthy``) is pure: the caller passes the clock.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET`` (no-op when it is unset)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        if self.address is not None and not self.address.startswith(("/", "@")):
            raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with '@', got {self.address!r}")
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: dict | None = None) -> "Notifier":
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        a = self.address
        if a.startswith("@"):  # abstract namespace: a leading NUL byte, no file
            return b"\0" + a[1:].encode()
        return a

    def notify(self, **fields) -> bool:
        """Send one datagram of ``KEY=value`` lines; True if it was sent."""
        if not self.enabled:
            return False
        msg = "\n".join(f"{k}={_clean(v)}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self._target())
        except OSError:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        fields = {"EXTEND_TIMEOUT_USEC": int(seconds * 1_000_000)}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _clean(v) -> str:
    """One line per field: a newline in a STATUS would start a bogus field."""
    return str(v).replace("\n", " ")


def watchdog_interval(environ: dict | None = None) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when the watchdog is off or
    meant for another process (``WATCHDOG_PID``). Removes both variables from the environment."""
    env = os.environ if environ is None else environ
    usec, pid = env.pop("WATCHDOG_USEC", None), env.pop("WATCHDOG_PID", None)
    if not usec:
        return None
    try:
        usec_i = int(usec)
    except ValueError:
        return None
    if usec_i <= 0 or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return usec_i / 2 / 1_000_000


class Watchdog:
    """Decides whether to ping: only while the reconcile loop keeps ticking."""

    @dataclass(frozen=True)
    class Config:
        tick_interval_s: float = 0.1  # the reconcile loop's poll interval
        stale_ticks: int = 50         # a loop this many intervals late counts as wedged
        min_stale_s: float = 5.0      # ...but never less than this (GC pauses, a slow journal write)

    def __init__(self, config: "Watchdog.Config", started_at: float) -> None:
        self.config = config
        self.started_at = started_at

    @property
    def stale_after_s(self) -> float:
        c = self.config
        return max(c.min_stale_s, c.stale_ticks * c.tick_interval_s)

    def healthy(self, last_tick_at: float | None, now: float) -> bool:
        """True if the loop ticked within ``stale_after_s`` (counting from our start until the
        first tick)."""
        ref = self.started_at if last_tick_at is None else last_tick_at
        return now - ref <= self.stale_after_s
