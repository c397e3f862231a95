"""Incident annotations during a real supervised run: the real daemon (`titan-supervisor run`) with
`[grafana]` configured, real torchtitan on 2 CPU ranks, an unrecovered LR spike.

No Grafana server can run on this machine: tests/fake_grafana.py stands in for it, recording
every request and accepting only bodies in the shape of Grafana's `POST /api/annotations`. It
holds the first request for 12 s (a hung Grafana) to prove the daemon never waits for it: the
incident is opened, acted on and resolved in the journal while Grafana still holds the first
annotation, and /healthz answers promptly throughout. Needs no Prometheus/Alertmanager binaries.
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from tests.daemon_harness import Daemon, drill_config, free_port
from tests.fake_grafana import FakeGrafana

pytestmark = [pytest.mark.integration, pytest.mark.drill]

HOLD_S = 12.0


def test_incident_events_are_posted_and_a_hung_grafana_blocks_nothing(tmp_path):
    g = FakeGrafana(first_delay_s=HOLD_S)
    token = tmp_path / "grafana.token"
    token.write_text("glsa_e2e\n")
    cfg = drill_config(tmp_path / "run", free_port(), steps=400,  # the test ends it
                       faults="spike@35:lr=1000:steps=3")
    cfg["grafana"] = {"url": g.url, "token_file": str(token), "dashboard_uid": "titan-run-overview",
                      "timeout_s": 30.0}
    d = Daemon(tmp_path, cfg)
    try:
        d.start()
        deadline = time.time() + 200
        while not g.requests and time.time() < deadline:  # until the first annotation is posted
            time.sleep(0.1)
        assert g.requests, d.log_tail()
        held_since = time.time()
        slowest = 0.0
        while not g.accepted and time.time() < deadline:  # Grafana holds it: the daemon goes on
            t0 = time.perf_counter()
            with urllib.request.urlopen(d.url + "/healthz", timeout=5) as r:
                assert r.status == 200
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.2)
        first_answered = time.time()
        assert first_answered - held_since >= HOLD_S - 2  # it really was held
        assert slowest < 2.0, f"/healthz took {slowest:.2f}s while Grafana hung"
        while not any("event:resolved" in b["tags"] for b in g.accepted) and time.time() < deadline:
            time.sleep(0.1)  # the queued events follow once Grafana answers
        time.sleep(0.5)
        j = d.journal()
        try:
            rollback = next(a for a in j.actions() if a["kind"] == "rollback")
            incident = next(i for i in j.incidents(limit=1000)
                            if any(a["id"] == rollback["id"] for a in j.incident_detail(i["id"])["actions"]))
        finally:
            j.close()
        assert incident["state"] == "closed" and rollback["state"] == "done"
        assert incident["closed_at"] < first_answered, "the incident waited for Grafana"
    finally:
        d.cleanup()
        g.close()
    # every event arrived, in Grafana's shape (problems would have been answered 400), in order
    assert len(g.accepted) == len(g.requests), [r["body"] for r in g.requests]
    kind = f"kind:{incident['kind']}"
    events = [(b["tags"][2], b["tags"][3], *b["tags"][4:]) for b in g.accepted]
    acted = events.index(("event:acted", kind, "action:rollback"))
    assert ("event:opened", kind) in events[:acted] and ("event:resolved", kind) in events[acted:]
    opened = next(b for b in g.accepted if b["tags"][2:4] == ["event:opened", kind])
    assert {b["dashboardUID"] for b in g.accepted} == {"titan-run-overview"}
    assert {r["auth"] for r in g.requests} == {"Bearer glsa_e2e"}
    assert all(b["tags"][:2] == ["titan-supervisor", "run:drill"] for b in g.accepted)
    assert abs(opened["time"] / 1000 - incident["opened_at"]) < 1.0
