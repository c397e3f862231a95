"""sd_notify over a real unix datagram socket standing in for systemd's NOTIFY_SOCKET.

Emulated: systemd itself (it cannot run as PID 1 here). The socket, the datagrams, the asyncio
tasks and the clock are real; the supervisor object given to the bridge is a plain namespace
with the four attributes the bridge reads (state, generation, step, action) and the reconcile
loop's tick time, so a wedged loop can be produced on demand.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from types import SimpleNamespace

import pytest

from supervisor.service import SystemdBridge
from supervisor.systemd import Notifier, Watchdog, watchdog_interval


class FakeSystemd:
    """A bound AF_UNIX datagram socket that records (monotonic time, fields) per datagram."""

    def __init__(self, address: str, bind_to) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict]] = []

    def drain(self) -> list[dict]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return [m for _, m in self.messages]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd_path(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = FakeSystemd(path, path)
    yield s
    s.close()


@pytest.fixture
def systemd_abstract():
    name = f"titan-test-{uuid.uuid4().hex}"
    s = FakeSystemd("@" + name, b"\0" + name.encode())
    yield s
    s.close()


def test_notifier_sends_to_a_path_socket(systemd_path):
    n = Notifier(systemd_path.address)
    assert n.ready("running, generation 0, step 3")
    assert n.extend_timeout(1.5, "slow")
    assert n.watchdog() and n.stopping("bye")
    msgs = systemd_path.drain()
    assert msgs[0] == {"READY": "1", "STATUS": "running, generation 0, step 3", "MAINPID": str(os.getpid())}
    assert msgs[1] == {"EXTEND_TIMEOUT_USEC": "1500000", "STATUS": "slow"}
    assert msgs[2:] == [{"WATCHDOG": "1"}, {"STOPPING": "1", "STATUS": "bye"}]
    assert n.sent == 4 and n.dropped == 0


def test_notifier_sends_to_an_abstract_socket(systemd_abstract):
    n = Notifier(systemd_abstract.address)
    assert n.status("line one\nline two")  # a newline would start a bogus field
    assert systemd_abstract.drain() == [{"STATUS": "line one line two"}]


def test_without_notify_socket_everything_is_a_noop():
    env: dict = {}
    n = Notifier.from_environ(env)
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False and n.sent == 0


def test_notify_socket_is_taken_out_of_the_environment(systemd_path):
    env = {"NOTIFY_SOCKET": systemd_path.address, "OTHER": "1"}
    n = Notifier.from_environ(env)
    assert n.enabled and env == {"OTHER": "1"}  # trainer ranks launched later do not inherit it


def test_a_relative_notify_socket_is_refused_clearly():
    with pytest.raises(ValueError, match="NOTIFY_SOCKET must be an absolute path or start with '@'"):
        Notifier("run/notify")


def test_a_vanished_socket_drops_the_message_and_counts_it(tmp_path):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.watchdog() is False
    assert n.dropped == 1 and n.sent == 0


def test_watchdog_interval_is_half_of_watchdog_usec_and_for_this_pid_only():
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.5 and env == {}
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_watchdog_health_is_the_age_of_the_last_tick():
    w = Watchdog(Watchdog.Config(tick_interval_s=0.1, stale_ticks=50, min_stale_s=5.0), started_at=100.0)
    assert w.stale_after_s == 5.0
    assert w.healthy(None, 104.9) and not w.healthy(None, 105.1)  # no tick yet: counted from start
    assert w.healthy(200.0, 204.0) and not w.healthy(200.0, 205.5)
    assert Watchdog(Watchdog.Config(tick_interval_s=1.0, stale_ticks=20), 0.0).stale_after_s == 20.0


def _fake_sup():
    return SimpleNamespace(state="running", generation=2, last_step=40, action=None, last_reconcile_at=None,
                           log=SimpleNamespace(error=lambda *a, **k: None))


def _pings(fake: FakeSystemd, start: float, end: float) -> list[float]:
    return [t for t, m in fake.messages if m.get("WATCHDOG") == "1" and start <= t < end]


def test_bridge_sequence_watchdog_cadence_and_a_wedged_loop(systemd_path):
    sup = _fake_sup()
    env = {"NOTIFY_SOCKET": systemd_path.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    cfg = SystemdBridge.Config(tick_interval_s=0.05, status_every_s=0.05, stale_ticks=4, min_stale_s=0.3)

    async def scenario():
        bridge = SystemdBridge(sup, cfg, environ=env)
        assert bridge.ping_every_s == 0.1
        ticking = True

        async def reconcile_loop():  # what Supervisor.reconcile_forever does to the tick time
            while True:
                if ticking:
                    sup.last_reconcile_at = time.monotonic()
                await asyncio.sleep(0.05)

        async def systemd_reads():  # the kernel queues only ~10 datagrams: read as systemd does
            while True:
                systemd_path.drain()
                await asyncio.sleep(0.01)

        loop_task = asyncio.create_task(reconcile_loop())
        reader = asyncio.create_task(systemd_reads())
        bridge.ready()
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        sup.last_step = 41
        await asyncio.sleep(0.2)
        ticking = False  # the loop wedges here
        t_wedge = time.monotonic()
        await asyncio.sleep(1.5)
        ticking = True  # and recovers
        t_back = time.monotonic()
        await asyncio.sleep(0.5)
        systemd_path.drain()
        bridge.notifier.stopping("stopping: " + bridge.describe())
        bridge.close()
        loop_task.cancel()
        reader.cancel()
        assert bridge.notifier.dropped == 0
        return t0, t_wedge, t_back

    t0, t_wedge, t_back = asyncio.run(scenario())
    msgs = systemd_path.drain()
    assert msgs[0]["READY"] == "1" and msgs[0]["STATUS"] == "running, generation 2, step 40"
    assert {"STATUS": "running, generation 2, step 41"} in msgs
    assert msgs[-1] == {"STOPPING": "1", "STATUS": "stopping: running, generation 2, step 41"}
    # cadence: WATCHDOG_USEC/2 = 0.1 s while the loop ticks
    healthy = _pings(systemd_path, t0, t_wedge)
    gaps = [b - a for a, b in zip(healthy, healthy[1:])]
    assert len(healthy) >= 9 and all(0.07 < g < 0.2 for g in gaps), gaps
    # wedged: pings stop once the last tick is older than 0.3 s (+ one ping interval), and stay stopped
    wedged = _pings(systemd_path, t_wedge + 0.3 + 0.15, t_back)
    assert wedged == []
    # recovered: pings resume
    assert len(_pings(systemd_path, t_back + 0.15, t_back + 0.5)) >= 2


def test_bridge_extends_the_timeout_while_an_action_finishes_at_shutdown(systemd_path):
    sup = _fake_sup()
    sup.action = SimpleNamespace(kind="rollback", id=7)
    cfg = SystemdBridge.Config(extend_s=0.3, action_grace_s=5.0)

    async def scenario():
        bridge = SystemdBridge(sup, cfg, environ={"NOTIFY_SOCKET": systemd_path.address})
        assert bridge.describe() == "running, generation 2, step 40, action rollback #7"

        async def finish_action():
            await asyncio.sleep(0.5)
            sup.action = None

        asyncio.create_task(finish_action())
        t = time.monotonic()
        await bridge.let_action_finish()
        return time.monotonic() - t

    waited = asyncio.run(scenario())
    assert 0.45 < waited < 2.0
    extends = [m for m in systemd_path.drain() if "EXTEND_TIMEOUT_USEC" in m]
    assert len(extends) >= 3 and extends[0]["EXTEND_TIMEOUT_USEC"] == "300000"
    assert extends[0]["STATUS"] == "stopping: waiting for the action in flight"


def test_bridge_does_not_wait_past_the_grace(systemd_path):
    sup = _fake_sup()
    sup.action = SimpleNamespace(kind="restart", id=3)  # never finishes

    async def scenario():
        bridge = SystemdBridge(sup, SystemdBridge.Config(extend_s=0.3, action_grace_s=0.4),
                               environ={"NOTIFY_SOCKET": systemd_path.address})
        t = time.monotonic()
        await bridge.let_action_finish()
        return time.monotonic() - t

    assert 0.35 < asyncio.run(scenario()) < 1.5
