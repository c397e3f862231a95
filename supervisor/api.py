"""The daemon's HTTP surface: telemetry ingest, heartbeats, /metrics, health.

Bad input never changes anything: a body that does not parse or does not match the wire
protocol (supervisor/protocol.py) is answered 400 with the field that is wrong, before any
record reaches the journal or the detectors.

Hostile input (README "Security"): every body is read through `supervisor.wire.read_body`
(capped while it streams: 413), parsed by `supervisor.wire.loads` (finite numbers, valid
Unicode) and validated with wall times near the daemon's clock (`protocol.wire_context`); every
route class has a rate limit (`supervisor.ratelimit`, 429 before the body is read); the trainer
routes need the per-run trainer token; a heartbeat naming a rank or pid that is not one of the
running generation's is refused (403) and counted. A journal or disk fault while answering is a
503 naming it, counted, and reported by `/readyz` (`supervisor.health`).

Hot path: ``POST /v1/nodes/report`` (the node agents', thousands a second) is dispatched to its
endpoint by a middleware inside the counting and rate-limiting ones, past FastAPI's router and
exception layers; the endpoint and its answers are the registered route's own.
"""

from __future__ import annotations

import sqlite3
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from supervisor.auth import TokenStore
from supervisor.browser_guard import guard
from supervisor.health import fault_kind
from supervisor.protocol import Heartbeat, TelemetryBatch, wire_context
from supervisor.ratelimit import RateLimiter, route_class
from supervisor.wire import WireError, loads, read_body

MAX_BODY = 8 * 1024 * 1024


def _bad_request(msg: str, errors=None) -> JSONResponse:
    return JSONResponse({"error": msg, "details": errors or []}, status_code=400)


def _errors(e: ValidationError | RequestValidationError) -> list[dict]:
    out = []
    for err in e.errors():
        out.append({"field": ".".join(str(x) for x in err.get("loc", ())), "problem": err.get("msg", "")})
    return out


async def _parse(request: Request, model, sup):
    try:
        # NaN/Infinity literals are part of the protocol (a NaN loss is data, not an error);
        # 1e400 is not (it is no finite number, and inf/nan are spelled as literals).
        obj = loads(await read_body(request, MAX_BODY), allow_nan=True)
    except WireError as e:
        if e.status == 413:
            sup.health.metrics_only("body_too_large")
        raise _Reject(JSONResponse({"error": e.message, "details": []}, status_code=e.status)) from None
    server = sup.settings.server
    ctx = wire_context(time.time(), future_s=server.clock_skew_s, past_s=server.max_record_age_s)
    try:
        return model.model_validate(obj, context=ctx)
    except ValidationError as e:
        raise _Reject(_bad_request(f"body is not a valid {model.__name__}", _errors(e))) from None


class _Reject(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _hot_route(router, path: str):
    """The APIRoute serving ``POST path`` in ``router``."""
    return next(r for r in router.routes if getattr(r, "path", None) == path and "POST" in r.methods)


def build_app(sup) -> FastAPI:
    from supervisor.control import build_router
    from supervisor.node_api import NODE_COMMAND_SPECS, REPORT_PATH, node_routes

    app = FastAPI(title="titan-supervisor", version="1", description="Supervisor daemon for torchtitan runs.")
    # /v1 reads, commands, alerts (supervisor/control.py); node agents (supervisor/node_api.py)
    router = build_router(sup, extra_specs=NODE_COMMAND_SPECS, extra_routes=node_routes)
    report = _hot_route(router, REPORT_PATH)

    async def fault_response(request: Request, exc: Exception) -> JSONResponse:
        kind = fault_kind(exc)
        sup.health.fault(kind, f"{request.url.path}: {type(exc).__name__}: {exc}")
        return JSONResponse({"error": f"the supervisor could not record this ({kind}): {exc}", "details": []},
                            status_code=503)

    def _node_reports(inner):
        # The node agents' report (2,048 a second at 16,384 ranks) goes straight to its endpoint: the
        # same function the router would call, with the same fault answer, inside the counting and
        # rate-limiting middlewares; FastAPI's routing and exception layers cost as much as the
        # report itself (bench/ingest.py). Everything else, this path's other methods included,
        # takes the router. The route stays registered (OpenAPI, and it is the code that runs).
        async def dispatch(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == REPORT_PATH and scope["method"] == "POST":
                scope["route"] = report  # what the router sets: the metrics label
                request = Request(scope, receive)
                try:
                    response = await report.endpoint(request)
                except (sqlite3.Error, OSError) as e:
                    response = await fault_response(request, e)
                return await response(scope, receive, send)
            await inner(scope, receive, send)
        return dispatch

    sup.metrics.add_asgi_middleware(app, _node_reports)  # first added: innermost of ours
    # what only a browser would send is refused before any route (supervisor/browser_guard.py)
    sup.metrics.add_asgi_middleware(app, guard(open_mode=not TokenStore.from_settings(sup.settings).configured))
    sup.metrics.instrument(app)  # request counts and latency by route (supervisor/metrics.py)
    limiter = RateLimiter(sup.settings.server.rate_limit)

    def _rate_limit(inner):
        # A plain ASGI middleware (see `Metrics.instrument` for why not ``@app.middleware``).
        async def limit(scope, receive, send):
            if scope["type"] == "http":
                cls = route_class(scope["method"], scope["path"])
                if not limiter.allow(cls):
                    sup.health.metrics_only("rate_limited")
                    refusal = JSONResponse({"error": f"too many {cls} requests (limit {limiter.rate(cls):g}/s)",
                                            "details": []}, status_code=429, headers={"Retry-After": "1"})
                    return await refusal(scope, receive, send)
            await inner(scope, receive, send)
        return limit

    sup.metrics.add_asgi_middleware(app, _rate_limit)

    app.add_exception_handler(sqlite3.Error, fault_response)
    app.add_exception_handler(OSError, fault_response)

    @app.exception_handler(_Reject)
    async def _reject(request: Request, exc: _Reject):
        return exc.response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _bad_request("invalid request", _errors(exc))

    def _trainer_allowed(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return sup.trainer_allowed(token.strip() if scheme.lower() == "bearer" else None)

    def _trainer_refused() -> JSONResponse:
        return JSONResponse({"error": "trainer token missing or wrong", "details": []}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/telemetry", tags=["trainer"], summary="Step records and events from rank 0; replies with directives")
    async def telemetry(request: Request):
        if not _trainer_allowed(request):
            return _trainer_refused()
        batch = await _parse(request, TelemetryBatch, sup)
        reply = sup.ingest(batch)
        return JSONResponse(reply.model_dump(mode="json", exclude_none=True))

    @app.post("/v1/heartbeat", tags=["trainer"], summary="Liveness of one rank")
    async def heartbeat(request: Request):
        if not _trainer_allowed(request):
            return _trainer_refused()
        if sup.settings.launch.backend == "agents":  # one path: a dead agent must silence its ranks
            return JSONResponse({"error": "under launch.backend = agents a rank's heartbeats go to its node's "
                                          "agent (TITAN_SUPERVISOR_RELAY_URL), which sends them in its report; "
                                          "this route takes none", "details": []}, status_code=409)
        hb = await _parse(request, Heartbeat, sup)
        why = sup.heartbeat(hb)
        if why is not None:
            return JSONResponse({"error": f"heartbeat refused: {why}", "details": []}, status_code=403)
        return {"ok": True}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics():
        return Response(sup.metrics.render(), media_type=sup.metrics.content_type)

    @app.get("/healthz", tags=["ops"], summary="The daemon process is alive")
    async def healthz():
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], summary="The daemon has started (journal open, run adopted or launched)")
    async def readyz():
        if sup.state == "starting" and sup.gen is None and sup.action is None:
            return JSONResponse({"ready": False, "state": sup.state}, status_code=503)
        problems = sup.health.problems()
        if problems:
            return JSONResponse({"ready": False, "state": sup.state, "problems": problems}, status_code=503)
        return {"ready": True, "state": sup.state}

    app.include_router(router)
    return app
