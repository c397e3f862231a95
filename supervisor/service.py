"""Run the daemon: HTTP server + supervisor + reconcile loop in one asyncio process.

Start order matters: the server binds first (so the supervisor knows its own URL to hand to
the trainer), then the supervisor adopts or launches, then the reconcile loop runs until the
run finishes (exit 0), or SIGTERM/SIGINT arrives (exit 0; training keeps running and a
restarted daemon re-adopts it: crash-only).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from supervisor import log
from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.settings import Settings


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # we handle signals ourselves
        pass


async def serve(settings: Settings, *, on_ready=None, exit_when_finished: bool = True) -> Supervisor:
    logging.getLogger("uvicorn.access").disabled = True
    sup = Supervisor(settings)
    app = build_app(sup)
    tls = {"ssl_certfile": str(settings.server.tls_cert_file), "ssl_keyfile": str(settings.server.tls_key_file)} \
        if settings.server.tls_cert_file else {}
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_level="warning",
                            lifespan="off", access_log=False, timeout_keep_alive=30, **tls)
    server = _Server(config)
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        if server_task.done():
            server_task.result()  # raises the bind error
            raise RuntimeError("HTTP server exited before it started")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    host = settings.server.host if settings.server.host != "0.0.0.0" else "127.0.0.1"
    sup.url = f"{'https' if tls else 'http'}://{host}:{port}"
    sup.log.info("listening", url=sup.url, workdir=str(sup.workdir))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sup.start()
    if on_ready is not None:
        on_ready(sup)
    reconcile = asyncio.create_task(sup.reconcile_forever())
    waits = [asyncio.create_task(stop.wait())]
    if exit_when_finished:
        waits.append(asyncio.create_task(sup.finished.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    sup.log.info("daemon exiting", state=sup.state, step=sup.last_step)
    reconcile.cancel()
    for w in waits:
        w.cancel()
    server.should_exit = True  # stop answering before the journal closes
    await server_task
    await sup.stop()
    return sup


def run(settings: Settings) -> int:
    log.configure(settings.log_level)
    sup = asyncio.run(serve(settings))
    return 1 if sup.state == "failed" else 0
