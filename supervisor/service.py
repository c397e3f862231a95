"""Run the daemon: HTTP server + supervisor + reconcile loop in one asyncio process.

Start order matters: the server binds first (so the supervisor knows its own URL to hand to
the trainer), then the supervisor adopts or launches, then the reconcile loop runs until the
run finishes (exit 0), or SIGTERM/SIGINT arrives (exit 0; training keeps running and a
restarted daemon re-adopts it: crash-only).

Under systemd (`Type=notify`, deploy/systemd/titan-supervisor.service) the daemon says READY=1
only after the journal is open, the API is bound and the running generation is re-adopted (or
launched); STATUS= lines with the state and step; EXTEND_TIMEOUT_USEC= while a slow start or a
heavy action it waits for at shutdown is still running; STOPPING=1; and WATCHDOG=1 every
WATCHDOG_USEC/2 only while the reconcile loop keeps ticking (`Supervisor.last_reconcile_at`),
so a wedged loop gets the daemon killed and restarted by systemd (the ranks survive that).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn

from supervisor import log
from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.settings import ConfigError, Settings
from supervisor.systemd import Notifier, Watchdog, watchdog_interval


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # we handle signals ourselves
        pass


async def serve(settings: Settings, *, on_ready=None, exit_when_finished: bool = True) -> Supervisor:
    logging.getLogger("uvicorn.access").disabled = True
    settings.check_startup()  # workdir writable, port free: a config error before anything is created
    sup = Supervisor(settings)
    app = build_app(sup)
    tls = {"ssl_certfile": str(settings.server.tls_cert_file), "ssl_keyfile": str(settings.server.tls_key_file)} \
        if settings.server.tls_cert_file else {}
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_level="warning",
                            lifespan="off", access_log=False, timeout_keep_alive=30, **tls)
    server = _Server(config)
    bridge = SystemdBridge(sup, SystemdBridge.Config(tick_interval_s=settings.launch.poll_interval_s))
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        if server_task.done():
            # lost a race for the port after check_startup (uvicorn exits instead of raising)
            sup.journal.close()
            raise ConfigError(f"server.port: {settings.server.host}:{settings.server.port} could not be bound")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    host = settings.server.host if settings.server.host != "0.0.0.0" else "127.0.0.1"
    sup.url = f"{'https' if tls else 'http'}://{host}:{port}"
    sup.log.info("listening", url=sup.url, workdir=str(sup.workdir))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with bridge.extending("starting: re-adopting or launching the trainer"):
        await sup.start()
    if on_ready is not None:
        on_ready(sup)
    reconcile = asyncio.create_task(sup.reconcile_forever())
    bridge.ready()
    waits = [asyncio.create_task(stop.wait())]
    if exit_when_finished:
        waits.append(asyncio.create_task(sup.finished.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    sup.log.info("daemon exiting", state=sup.state, step=sup.last_step)
    bridge.notifier.stopping(f"stopping: {bridge.describe()}")
    await bridge.let_action_finish()
    reconcile.cancel()
    bridge.close()
    for w in waits:
        w.cancel()
    server.should_exit = True  # stop answering before the journal closes
    await server_task
    await sup.stop()
    return sup


class SystemdBridge:
    """Tells systemd how the daemon is doing (a no-op outside systemd)."""

    @dataclass(frozen=True)
    class Config:
        tick_interval_s: float = 0.1     # the reconcile loop's poll interval (watchdog staleness unit)
        status_every_s: float = 1.0      # STATUS= is sent when it changed, checked this often
        extend_s: float = 30.0           # each EXTEND_TIMEOUT_USEC= buys this much
        action_grace_s: float = 60.0     # at shutdown, wait this long for a heavy action to finish
        stale_ticks: int = 50            # watchdog: the loop is wedged this many ticks late...
        min_stale_s: float = 5.0         # ...and at least this many seconds late

    def __init__(self, sup: Supervisor, config: "SystemdBridge.Config", environ: dict | None = None) -> None:
        self.sup = sup
        self.config = config
        self.notifier = Notifier.from_environ(environ)
        self.ping_every_s = watchdog_interval(environ)
        self.watchdog = Watchdog(Watchdog.Config(tick_interval_s=config.tick_interval_s, stale_ticks=config.stale_ticks,
                                                 min_stale_s=config.min_stale_s), time.monotonic())
        self._tasks: list[asyncio.Task] = []
        self._last_status = ""

    def describe(self) -> str:
        s = self.sup
        text = f"{s.state}, generation {s.generation}, step {s.last_step}"
        a = s.action
        return text + (f", action {a.kind} #{a.id}" if a is not None else "")

    @asynccontextmanager
    async def extending(self, status: str):
        """Keep pushing systemd's start/stop timeout out while the body runs."""
        if not self.notifier.enabled:
            yield
            return

        async def tick():
            while True:
                self.notifier.extend_timeout(self.config.extend_s, status)
                await asyncio.sleep(self.config.extend_s / 3)

        t = asyncio.create_task(tick())
        try:
            yield
        finally:
            t.cancel()

    def ready(self) -> None:
        """READY=1 and the STATUS/WATCHDOG tasks; called once start() has adopted or launched."""
        self._last_status = self.describe()
        self.notifier.ready(self._last_status)
        if not self.notifier.enabled:
            return
        self._tasks.append(asyncio.create_task(self._status_loop()))
        if self.ping_every_s is not None:
            self._tasks.append(asyncio.create_task(self._watchdog_loop()))

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_every_s)
            text = self.describe()
            if text != self._last_status:
                self._last_status = text
                self.notifier.status(text)

    async def _watchdog_loop(self) -> None:
        warned = False
        while True:
            last = getattr(self.sup, "last_reconcile_at", None)
            if self.watchdog.healthy(last, time.monotonic()):
                self.notifier.watchdog()
                warned = False
            elif not warned:
                warned = True
                self.sup.log.error("reconcile loop wedged: watchdog pings stopped",
                                   stale_after_s=self.watchdog.stale_after_s)
            await asyncio.sleep(self.ping_every_s)

    async def let_action_finish(self) -> None:
        """At shutdown, give a heavy action in flight up to ``action_grace_s`` to finish (a
        restarted daemon would resume it anyway: this only makes a planned stop tidier)."""
        deadline = time.monotonic() + self.config.action_grace_s
        if self.sup.action is None:
            return
        async with self.extending("stopping: waiting for the action in flight"):
            while self.sup.action is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.notifier.close()


def run(settings: Settings) -> int:
    log.configure(settings.log_level)
    sup = asyncio.run(serve(settings))
    return 1 if sup.state == "failed" else 0
