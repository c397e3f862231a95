"""The daemon's two HTTP middlewares (plain ASGI since bench/ingest.py showed Starlette's
``@app.middleware`` costing more than the daemon's own work per heartbeat): the per-class rate
limit answers 429 before the route runs, and every request is counted by route template and code.

Real Supervisor, journal and FastAPI app (tests/control_fixtures); no trainer is needed here.
"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.settings import Settings
from tests.control_fixtures import make_tokens


def _sup(tmp_path, trainer_per_s: float) -> Supervisor:
    tokens = make_tokens(tmp_path)
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t"},
                      server={"port": 0, "token_file": str(tokens["file"]),
                              "rate_limit": {"trainer_per_s": trainer_per_s, "burst_s": 1.0}})
    return Supervisor(s)


def _hb(sup, rank=0):
    return {"run_id": "t", "generation": 0, "rank": rank, "step": 1, "pid": 4242, "host": "h",
            "wall_time": time.time()}


def test_a_flood_past_the_limit_is_429_before_the_route_and_counted(tmp_path):
    sup = _sup(tmp_path, trainer_per_s=5)
    try:
        with TestClient(build_app(sup), base_url="http://127.0.0.1") as c:
            auth = {"Authorization": f"Bearer {sup.trainer_token}"} if sup.trainer_token else {}
            codes = [c.post("/v1/heartbeat", json=_hb(sup), headers=auth).status_code for _ in range(12)]
            assert 429 in codes and codes.index(429) >= 4, codes  # the bucket holds ~5 first
            r = c.post("/v1/heartbeat", json=_hb(sup), headers=auth)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "too many trainer requests (limit 5/s)" in r.json()["error"]
            assert c.get("/healthz").status_code == 200  # another class: its own bucket
            text = c.get("/metrics").text
    finally:
        sup.journal.close()
    assert 'titan_supervisor_errors_total{kind="rate_limited"}' in text
    n429 = sum(1 for x in codes if x == 429) + 1
    assert f'titan_supervisor_errors_total{{kind="rate_limited"}} {float(n429)}' in text


def test_every_request_is_counted_by_route_template_and_status(tmp_path):
    sup = _sup(tmp_path, trainer_per_s=1000)
    try:
        with TestClient(build_app(sup), base_url="http://127.0.0.1") as c:
            assert c.post("/v1/heartbeat", content=b"{not json", headers={"Content-Type": "application/json"}
                          ).status_code in (400, 401)
            code = c.post("/v1/heartbeat", content=b"{not json").status_code
            assert c.get("/healthz").status_code == 200
            assert c.get("/no/such/route").status_code == 404
            text = c.get("/metrics").text
    finally:
        sup.journal.close()
    assert f'route="/v1/heartbeat"' in text and f'code="{code}"' in text
    assert 'titan_http_requests_total{code="200",route="/healthz"} 1.0' in text
    assert 'titan_http_requests_total{code="404",route="unmatched"} 1.0' in text
