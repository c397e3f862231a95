"""Fuzz suite (issue 10): Hypothesis strategies over the wire protocol against the live app.

Telemetry, heartbeats, Alertmanager webhooks and operator commands, built from strategies that
reach the edges (integers past 2**63, 1e400 spelled in the body, NaN/Infinity literals, lone
surrogates, escape codes and rich markup, times far in the future) and sent to the real app (real
Supervisor, SQLite journal, FastAPI, in-process HTTP). After every request: no 5xx. After each
suite: the journal is readable by `audit` and `incidents` (API and CLI renderers), the daemon's
memory did not grow without bound, and the running "trainer" (a real process tree standing in for
torchrun and its rank) and a foreign process were never signalled nor believed as ranks.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from urllib.parse import quote

import psutil
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.api import build_app
from supervisor.auth import hash_token
from supervisor.daemon import Supervisor
from supervisor.launch.local import Generation, LaunchSpec
from supervisor.oncall import render_audit, render_incident
from supervisor.settings import Settings

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
NOW = time.time()

ints = st.one_of(st.integers(-2, 10), st.integers(-(2**64), 2**64), st.sampled_from([2**53, 2**63, 2**63 - 1, -1]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 5e-324]))
times = st.one_of(st.just(None), st.floats(NOW - 10 * 86400, NOW + 10 * 86400), floats)
hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800", "\udfff", "\x1b[2J\x1b[H", "[link=http://x]y[/link]", "[red]x[/red]", "\r\n",
                     "\u202e", "a" * 3000, "²", "1" * 30]))
SPELLED = {"__1e400__": "1e400", "__m1e400__": "-1e400", "__nan__": "NaN", "__inf__": "Infinity"}
spelled = st.sampled_from(list(SPELLED))


def scalar():
    return st.one_of(ints, floats, hostile_text, st.booleans(), st.none(), spelled)


def encode(obj) -> bytes:
    """JSON with the spelled specials put back raw (1e400 is not a float Python can hold)."""
    text = json.dumps(obj, allow_nan=True)
    for k, v in SPELLED.items():
        text = text.replace(json.dumps(k), v)
    return text.encode("utf-8", "surrogatepass")


def maybe(d: dict, overrides: dict) -> dict:
    out = dict(d)
    for k, v in overrides.items():
        if v is not None:
            out[k] = v
    return out


record = st.fixed_dictionaries({
    "run_id": st.sampled_from(["t", "x"]), "generation": st.sampled_from([0, 1, 2**63]), "step": ints,
    "loss": floats, "grad_norm": floats, "lr": floats, "lr_scale": floats, "tokens_per_s": floats,
    "step_seconds": floats, "wall_time": times}, optional={"skip_reason": hostile_text, "samples_consumed": ints,
                                                            "rank_step_seconds": st.lists(floats, max_size=4),
                                                            "extra": scalar()})
event = st.one_of(
    st.fixed_dictionaries({"kind": st.just("checkpoint_saved"), "step": ints, "seconds": floats, "wall_time": times}),
    st.fixed_dictionaries({"kind": st.just("directive_applied"), "directive_id": hostile_text,
                           "directive": hostile_text, "step": ints, "ok": st.booleans(), "detail": hostile_text,
                           "wall_time": times}),
    st.fixed_dictionaries({"kind": st.just("finished"), "step": ints, "reason": hostile_text, "wall_time": times}))
telemetry = st.fixed_dictionaries({"run_id": st.sampled_from(["t", "x"]), "generation": st.sampled_from([0, 1, -1]),
                                   "records": st.lists(record, max_size=4), "events": st.lists(event, max_size=2)})
heartbeat = st.fixed_dictionaries({"run_id": st.just("t"), "generation": st.sampled_from([0, 1, 2**40]),
                                   "rank": ints, "step": ints, "pid": ints, "host": hostile_text,
                                   "wall_time": times}, optional={"phase": hostile_text})
alert = st.fixed_dictionaries({"status": st.sampled_from(["firing", "resolved", "x"]),
                               "labels": st.dictionaries(st.sampled_from(["alertname", "node", "rank", "instance",
                                                                          "host"]), hostile_text, max_size=4)},
                              optional={"annotations": st.dictionaries(st.sampled_from(["summary", "description"]),
                                                                       hostile_text, max_size=2)})
alerts = st.fixed_dictionaries({"version": st.just("4"), "status": st.sampled_from(["firing", "resolved"]),
                                "alerts": st.lists(alert, max_size=20)})
command_names = st.sampled_from(["lr", "skip-data", "rollback", "pause", "resume", "extend", "decay-now",
                                 "checkpoint-now", "nope\x1b[2J"])
command = st.fixed_dictionaries({}, optional={
    "reason": hostile_text, "scale": st.one_of(floats, spelled, ints), "batches": st.one_of(ints, spelled),
    "to_step": st.one_of(ints, hostile_text), "steps": ints, "dry_run": st.just(True),
    "request_id": hostile_text, "wait_s": st.one_of(floats, spelled)})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    os.environ["TITAN_SUPERVISOR_TOKENS"] = f"op:operator:{hash_token('op')},am:alerts:{hash_token('am')}"
    try:
        s = Settings.load(run={"workdir": str(tmp / "run"), "run_id": "t", "nproc_per_node": 2},
                          server={"port": 0, "rate_limit": {"trainer_per_s": 1e6, "command_per_s": 1e6,
                                                            "alerts_per_s": 1e6, "read_per_s": 1e6}})
        sup = Supervisor(s)
    finally:
        del os.environ["TITAN_SUPERVISOR_TOKENS"]
    sup.generation = 0
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                               "print(c.pid, flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    rank0 = int(parent.stdout.readline())
    sup.gen = Generation(LaunchSpec(0, 2, "tiny", tmp, "http://127.0.0.1:1", "t"), parent.pid, tmp / "g.log", parent)
    sup.journal.record_generation_start(generation=0, run_id="t")
    app = build_app(sup)
    clients = {"trainer": TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False,
                                     headers={"Authorization": f"Bearer {sup.trainer_token}"}),
               "op": TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False, headers={"Authorization": "Bearer op"}),
               "am": TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False, headers={"Authorization": "Bearer am"}),
               "anon": TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)}
    rss0 = psutil.Process().memory_info().rss
    yield {"sup": sup, "c": clients, "rank0": rank0, "parent": parent, "victim": victim, "rss0": rss0}
    for p in (parent, victim):
        p.kill()
        p.wait(timeout=10)
    sup.journal.close()


def _send(client, path, obj):
    r = client.post(path, content=encode(obj), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, r.status_code, r.text[:500])
    return r


@FUZZ
@given(body=telemetry)
def test_fuzz_telemetry(live, body):
    _send(live["c"]["trainer"], "/v1/telemetry", body)


@FUZZ
@given(body=heartbeat, who=st.sampled_from(["trainer", "anon"]))
def test_fuzz_heartbeats(live, body, who):
    _send(live["c"][who], "/v1/heartbeat", body)


@FUZZ
@given(body=alerts, who=st.sampled_from(["am", "anon", "op"]))
def test_fuzz_alerts(live, body, who):
    _send(live["c"][who], "/v1/alerts", body)
    while live["sup"].alerts.pending:
        live["sup"].alerts.process_one()


@FUZZ
@given(name=command_names, body=command, who=st.sampled_from(["op", "anon"]))
def test_fuzz_commands(live, name, body, who):
    _send(live["c"][who], f"/v1/commands/{quote(name, safe='')}", body)  # decoded by the server


def test_after_fuzzing_the_journal_reads_renders_and_nothing_was_signalled(live):
    """The invariants that must hold whatever was sent. Runs after the suites above in file order;
    run alone (``-k``) it still has hostile rows to render: it sends its own first."""
    from rich.console import Console

    sup, op = live["sup"], live["c"]["op"]
    for name in ("rollback", "skip-batches", "pause"):
        _send(op, f"/v1/commands/{name}", {"reason": "\x1b[2J\x1b]0;pwned\x07 3am \u202e", "dry_run": True})
    audit = op.get("/v1/audit", params={"limit": 10000})
    assert audit.status_code == 200
    rows = audit.json()["commands"]
    assert rows, "the command suite journaled nothing"
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=True, color_system=None)
    console.print(render_audit(rows))
    incidents = op.get("/v1/incidents", params={"limit": 1000})
    assert incidents.status_code == 200
    for inc in incidents.json()["incidents"][:20]:
        detail = op.get(f"/v1/incidents/{inc['id']}")
        assert detail.status_code == 200
        console.print(render_incident(detail.json()))
    assert "\x1b[2J" not in buf.getvalue()
    # the trainer's processes and the foreign one are alive, and only a real rank pid was believed
    assert live["parent"].poll() is None and psutil.pid_exists(live["rank0"]) and live["victim"].poll() is None
    assert set(sup.gen.rank_pids.values()) <= {live["rank0"]}
    grown = (psutil.Process().memory_info().rss - live["rss0"]) / 2**20
    assert grown < 300, f"memory grew {grown:.0f} MiB"


@given(st.text(max_size=24))
@settings(max_examples=300, deadline=None)
def test_ascii_int_takes_only_plain_digits_and_never_raises(text):
    """The one integer-from-text check every route, header, CLI flag and fault spec uses."""
    from supervisor.wire import ascii_int

    n = ascii_int(text)
    plain = 0 < len(text) <= 18 and all(c in "0123456789" for c in text)
    assert (n is not None) == plain
    if plain:
        assert n == int(text) and 0 <= n < 2**63
    for odd in ("²", "４２", "1_0", " 1", "+1", "-1", "", "1" * 19, "٣"):
        assert ascii_int(odd) is None
