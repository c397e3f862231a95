"""The daemon's HTTP surface: telemetry ingest, heartbeats, /metrics, health.

Bad input never changes anything: a body that does not parse or does not match the wire
protocol (supervisor/protocol.py) is answered 400 with the field that is wrong, before any
record reaches the journal or the detectors.
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from supervisor.protocol import Heartbeat, TelemetryBatch

MAX_BODY = 8 * 1024 * 1024


def _bad_request(msg: str, errors=None) -> JSONResponse:
    return JSONResponse({"error": msg, "details": errors or []}, status_code=400)


def _errors(e: ValidationError | RequestValidationError) -> list[dict]:
    out = []
    for err in e.errors():
        out.append({"field": ".".join(str(x) for x in err.get("loc", ())), "problem": err.get("msg", "")})
    return out


async def _parse(request: Request, model):
    body = await request.body()
    if len(body) > MAX_BODY:
        raise _Reject(_bad_request(f"body is {len(body)} bytes; the limit is {MAX_BODY}"))
    try:
        # NaN/Infinity literals are part of the protocol (a NaN loss is data, not an error)
        obj = json.loads(body)
    except ValueError as e:
        raise _Reject(_bad_request(f"body is not JSON: {e}")) from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _Reject(_bad_request(f"body is not a valid {model.__name__}", _errors(e))) from None


class _Reject(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def build_app(sup) -> FastAPI:
    app = FastAPI(title="titan-supervisor", version="1", description="Supervisor daemon for torchtitan runs.")
    sup.metrics.instrument(app)  # request counts and latency by route (supervisor/metrics.py)

    @app.exception_handler(_Reject)
    async def _reject(request: Request, exc: _Reject):
        return exc.response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _bad_request("invalid request", _errors(exc))

    def _trainer_allowed(request: Request) -> bool:
        token = getattr(sup, "trainer_token", None)
        if not token:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    def _trainer_refused() -> JSONResponse:
        return JSONResponse({"error": "trainer token missing or wrong", "details": []}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/telemetry", tags=["trainer"], summary="Step records and events from rank 0; replies with directives")
    async def telemetry(request: Request):
        if not _trainer_allowed(request):
            return _trainer_refused()
        batch = await _parse(request, TelemetryBatch)
        reply = sup.ingest(batch)
        return JSONResponse(reply.model_dump(mode="json", exclude_none=True))

    @app.post("/v1/heartbeat", tags=["trainer"], summary="Liveness of one rank")
    async def heartbeat(request: Request):
        if not _trainer_allowed(request):
            return _trainer_refused()
        hb = await _parse(request, Heartbeat)
        sup.heartbeat(hb)
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
        return {"ready": True, "state": sup.state}

    from supervisor.control import build_router

    app.include_router(build_router(sup))  # /v1 reads, commands, alerts (supervisor/control.py)
    return app
