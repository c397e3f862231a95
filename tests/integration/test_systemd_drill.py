"""Drill: the daemon is SIGKILLed while the ranks train and started again the way systemd would
with deploy/systemd/titan-supervisor.service; the run goes on with 0 lost steps and the same
generation, re-adopted.

What is emulated, and how: systemd cannot run as PID 1 here. The unit says `KillMode=process`,
`Restart=on-failure`, `RestartSec=`; so on the daemon's crash systemd signals nothing else (the
ranks in the unit's cgroup are left alone) and starts `ExecStart` again after RestartSec. The
test does exactly that: SIGKILL of the daemon's main PID only, a wait of RestartSec read from
the unit, and a new `titan-supervisor run` with the same config. systemd's notify socket is a
real unix datagram socket the test reads (NOTIFY_SOCKET, WATCHDOG_USEC as systemd sets them).
Real: the daemon, torchtitan on 2 CPU ranks, the journal, the spool.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid

import psutil
import pytest

from tests.daemon_harness import Daemon, drill_config, free_port
from tests.systemd_units import UNITS, seconds, service
from tests.trainer_harness import spool

pytestmark = [pytest.mark.integration, pytest.mark.drill]

DAEMON_UNIT = next(u for u in UNITS if u.name == "titan-supervisor.service")
STEPS = 80


class NotifySocket:
    """systemd's side of NOTIFY_SOCKET: records (monotonic time, fields) of every datagram."""

    def __init__(self) -> None:
        name = f"titan-drill-{uuid.uuid4().hex}"
        self.address = "@" + name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            self.messages.append((time.monotonic(), dict(l.split("=", 1) for l in data.decode().split("\n"))))

    def since(self, t: float) -> list[dict]:
        return [m for at, m in self.messages if at >= t]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_daemon_sigkilled_under_killmode_process_is_restarted_and_readopts(tmp_path, monkeypatch):
    assert service(DAEMON_UNIT, "KillMode") == "process"  # what this emulation is faithful to
    assert service(DAEMON_UNIT, "Restart") == "on-failure"
    restart_sec = seconds(service(DAEMON_UNIT, "RestartSec"))
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)  # the daemon's environment, as systemd sets it
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    d = Daemon(tmp_path, drill_config(tmp_path / "run", free_port(), steps=STEPS,
                                      faults="slow@1:rank=0:seconds=0.15"))
    try:
        t_start = time.monotonic()
        d.start()
        st = d.wait_for(lambda s: s if s.get("step", 0) >= 20 and len(s.get("trainer_pids", {})) == 2 else None,
                        180, "step 20")
        gen, ranks = st["generation"], {int(p) for p in st["trainer_pids"].values()}
        first = notify.since(t_start)
        i = next(i for i, m in enumerate(first) if m.get("READY") == "1")
        assert first[i]["MAINPID"] == str(d.proc.pid)
        assert all(set(m) == {"EXTEND_TIMEOUT_USEC", "STATUS"} for m in first[:i])  # only "still starting"
        assert any(m.get("WATCHDOG") == "1" for m in first)

        # systemd, KillMode=process: the main PID is killed; nothing else in the cgroup is signalled
        d.kill(signal.SIGKILL)
        t_killed = time.monotonic()
        time.sleep(restart_sec)  # RestartSec
        assert all(psutil.pid_exists(p) for p in ranks)  # the ranks trained on without a daemon
        d.start()  # Restart=on-failure: ExecStart again, same config
        assert d.wait_exit(300) == 0, d.log_tail()
    finally:
        notify.close()
        d.cleanup()

    second = notify.since(t_killed)
    ready = [m for m in second if m.get("READY") == "1"]
    assert len(ready) == 1 and ready[0]["MAINPID"] == str(d.proc.pid)
    # READY only after the running generation was re-adopted: it names the same generation
    assert ready[0]["STATUS"].startswith(f"running, generation {gen}, step ")
    steps_in_status = [int(m["STATUS"].rsplit("step ", 1)[1].split(",")[0]) for m in second
                       if "STATUS" in m and "step " in m["STATUS"]]
    assert steps_in_status == sorted(steps_in_status) and steps_in_status[-1] == STEPS
    pings = [at for at, m in notify.messages if at >= t_killed and m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 3 and max(gaps) < 1.6, gaps  # every WATCHDOG_USEC/2 = 1 s while healthy
    assert second[-1].get("STOPPING") == "1"

    adopted = [e for e in d.events() if e.get("event") == "adopted generation"]
    assert [e["generation"] for e in adopted] == [gen]
    j = d.journal()
    try:
        gens = j.generations()
        journaled = {r["step"] for r in j.recent_steps(limit=100_000)}
    finally:
        j.close()
    assert [g["id"] for g in gens] == [gen]  # re-adopted, never restarted
    assert set(range(1, STEPS + 1)) <= journaled  # 0 lost steps, including those while it was down
    records = spool(d.workdir)[0]
    assert sorted(r["step"] for r in records) == list(range(1, STEPS + 1))  # trained once each, no rewind
