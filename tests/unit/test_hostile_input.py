"""Regression tests for issue 10, "Hostile and careless input": one test per finding, named after it.

Everything is real: a real Supervisor with its SQLite journal, the real FastAPI app (in-process
for most checks, a real uvicorn server on 127.0.0.1 where streaming matters), real processes for
the "kill only what you launched" check and the real `titan-supervisor run` for config errors.
A full disk is made real with SQLite's own page limit (`PRAGMA max_page_count`), which fails a
write exactly as a full disk does (SQLITE_FULL). Nothing is mocked.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.auth import hash_token
from supervisor.daemon import Supervisor
from supervisor.launch.local import Generation, LaunchSpec
from supervisor.oncall import render_audit, render_incident
from supervisor.settings import Settings
from tests.trainer_harness import ROOT, trainer_env


def record(step, **kw):
    r = {"run_id": "t", "generation": 0, "step": step, "loss": 3.0, "grad_norm": 1.0, "lr": 1e-3,
         "lr_scale": 1.0, "tokens_per_s": 1000.0, "step_seconds": 0.1, "wall_time": time.time()}
    r.update(kw)
    return r


def heartbeat(rank, pid, **kw):
    hb = {"run_id": "t", "generation": 0, "rank": rank, "step": 1, "pid": pid, "host": "h",
          "wall_time": time.time()}
    hb.update(kw)
    return hb


def make_sup(tmp_path, **server):
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t", "nproc_per_node": 2},
                      server={"port": 0, **server})
    sup = Supervisor(s)
    sup.generation = 0
    return sup


@pytest.fixture
def sup(tmp_path):
    sup = make_sup(tmp_path)
    yield sup
    sup.journal.close()


@pytest.fixture
def trainer(sup):
    """A client holding the trainer token (what the daemon's own ranks get)."""
    return TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {sup.trainer_token}"})


def errors_metric(client, kind) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'titan_supervisor_errors_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- 1 -------------------------------------------------------------------------------------------

def test_finding_1_forged_heartbeat_cannot_make_the_daemon_kill_a_foreign_process(sup, trainer, tmp_path):
    """A heartbeat names a rank and a pid; the daemon believes the pid only if it is a process of
    the generation it launched. A forged foreign pid, a pid that does not exist, a rank that does
    not exist: each is refused (403), counted, and the foreign process survives a stop."""
    # a stand-in torchrun (real processes): a parent in its own session with one child rank
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                               "print(c.pid, flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        rank0_pid = int(parent.stdout.readline())
        spec = LaunchSpec(0, 2, "tiny", tmp_path, "http://127.0.0.1:1", "t")
        sup.gen = Generation(spec, parent.pid, tmp_path / "g.log", parent)
        sup.journal.record_generation_start(generation=0, run_id="t")
        refused = [trainer.post("/v1/heartbeat", json=heartbeat(1, victim.pid)),  # another process of the user
                   trainer.post("/v1/heartbeat", json=heartbeat(1, 4_000_000)),  # no such process
                   trainer.post("/v1/heartbeat", json=heartbeat(7, rank0_pid))]  # no such rank
        assert [r.status_code for r in refused] == [403, 403, 403], [r.text for r in refused]
        assert "not a trainer process" in refused[0].json()["error"]
        assert "not a rank of this run" in refused[2].json()["error"]
        assert sup.gen.rank_pids == {}  # nothing believed
        assert errors_metric(trainer, "heartbeat_refused") == 3
        assert trainer.post("/v1/heartbeat", json=heartbeat(0, rank0_pid)).status_code == 200
        assert sup.gen.rank_pids == {0: rank0_pid}
        # the same rank cannot be re-pointed at another pid
        assert trainer.post("/v1/heartbeat", json=heartbeat(0, victim.pid)).status_code == 403
        assert sup.gen.poll() == []  # no dead rank invented from a forged pid
        sup.gen.stop(2.0)
        assert not _alive(rank0_pid) or Path(f"/proc/{rank0_pid}/status").read_text().find("zombie") >= 0
        assert victim.poll() is None, "a process outside the run was signalled"
    finally:
        for p in (parent, victim):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


# --- 2 -------------------------------------------------------------------------------------------

def test_finding_2_a_step_past_2_63_never_wedges_journaling(sup, trainer):
    """A step >= 2**63 overflowed SQLite and stayed buffered, failing every later batch. Now the wire
    refuses steps >= 2**53 (400), and a record the journal still refuses is dead-lettered with its
    reason, counted and reported by /readyz, while the pipeline carries on."""
    r = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(2**63)]})
    assert r.status_code == 400 and "records.0.step" in r.text
    # a record that got past validation some other way (a daemon bug, an old spool): model_construct
    from supervisor.protocol import StepRecord

    poisoned = StepRecord.model_construct(**{**record(5), "step": 2**63})
    sup._steps_buffer.append(poisoned)
    r = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(6)]})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    r = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(7)]})
    assert r.status_code == 200
    steps = [x["step"] for x in sup.journal.recent_steps()]
    assert steps == [6, 7]  # the pipeline moved on
    lines = (sup.workdir / "supervisor" / "dead-letter.jsonl").read_text().splitlines()
    assert len(lines) == 1
    dead = json.loads(lines[0])
    assert dead["record"]["step"] == 2**63 and "Overflow" in dead["reason"]
    assert errors_metric(trainer, "dead_letter") == 1
    ready = trainer.get("/readyz")
    assert ready.status_code == 503 and "dead_letter" in ready.json()["problems"]


# --- 3 -------------------------------------------------------------------------------------------

def test_finding_3_future_wall_time_and_huge_step_heartbeat_is_refused(sup, trainer):
    """A heartbeat from an hour in the future with a huge step switched hang detection off for the
    generation. Wall times must lie within server.clock_skew_s ahead of the daemon's clock, and
    steps below 2**53; the stall detector never sees such a heartbeat."""
    before = sup.suite.stall.next_deadline()
    for hb in (heartbeat(0, os.getpid(), wall_time=time.time() + 3600),
               heartbeat(0, os.getpid(), step=2**62),
               heartbeat(0, os.getpid(), wall_time=1e308),
               heartbeat(0, os.getpid(), wall_time=time.time() - 10 * 86400)):
        r = trainer.post("/v1/heartbeat", json=hb)
        assert r.status_code == 400, r.text
    assert "ahead of the supervisor's clock" in trainer.post(
        "/v1/heartbeat", json=heartbeat(0, os.getpid(), wall_time=time.time() + 3600)).text
    assert sup.suite.stall.next_deadline() == before
    r = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0,
                                            "records": [record(1, wall_time=time.time() + 3600)]})
    assert r.status_code == 400 and "records.0.wall_time" in r.text


# --- 4 -------------------------------------------------------------------------------------------

class _Server:
    """The real app on a real uvicorn server on 127.0.0.1 (a thread of this process)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _send_chunked_until_answered(port: int, path: str, token: str, total: int) -> tuple[int, bytes]:
    """Stream a chunked body of up to ``total`` bytes, stopping as soon as the server answers."""
    import select

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
              "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"100000\r\n" + b" " * 2**20 + b"\r\n"
    sent = 0
    try:
        while sent < total:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except (socket.timeout, BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading: it has answered
            sent += 2**20
        s.settimeout(10)
        return sent, s.recv(4096)
    finally:
        s.close()


def test_finding_4_huge_bodies_are_refused_while_streaming_and_alerts_are_queued(sup):
    """A 1 GiB POST was read whole before the 400 (RSS +1.7 GB). Now a declared length over the cap
    is refused before any byte is read and a chunked body is cut off at the cap: the daemon's RSS
    stays flat. 1,000 alerts in one call were journaled and acted on inside the request, and the
    receiver was open without a token: now it needs a token (role alerts), answers 202 at once,
    and de-duplicates and caps what it queues."""
    with _Server(build_app(sup)) as srv:
        rss0 = _rss_mib()
        # declared 1 GiB: answered without reading it
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        c.putrequest("POST", "/v1/heartbeat")
        c.putheader("Authorization", f"Bearer {sup.trainer_token}")
        c.putheader("Content-Type", "application/json")
        c.putheader("Content-Length", str(2**30))
        c.endheaders()
        c.send(b"{" * 65536)
        r = c.getresponse()
        assert r.status == 413 and b"limit" in r.read()
        c.close()
        # chunked, 1 GiB offered in 1 MiB chunks: the 413 comes back long before the end of it
        sent, answer = _send_chunked_until_answered(srv.port, "/v1/telemetry", sup.trainer_token, 2**30)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 2**29, f"{sent} bytes were taken before the answer"
        assert _rss_mib() - rss0 < 200, "memory grew with the body"
        assert errors_metric(TestClient(build_app(sup), base_url="http://127.0.0.1"), "body_too_large") >= 1
    # alerts: no token configured -> refused like a command (was open: 6 requests made 6,002 findings)
    client = TestClient(build_app(sup), base_url="http://127.0.0.1")
    payload = {"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": f"GpuXid{i}", "node": f"n{i % 50}"}} for i in range(1000)]}
    assert client.post("/v1/alerts", json=payload).status_code == 401
    assert sup.journal.findings() == []


def test_finding_4_alert_storm_is_capped_and_processed_off_the_request_path(tmp_path, monkeypatch):
    """With an alerts token: 1,000 alerts in one call are answered 202 with nothing journaled inside
    the request; at most `per_minute` are queued (the rest dropped and counted), duplicates are
    dropped, and the queued ones become findings only when the daemon's task drains the queue."""
    monkeypatch.setenv("TITAN_SUPERVISOR_TOKENS", f"am:alerts:{hash_token('am-secret')}")
    sup = make_sup(tmp_path)
    try:
        client = TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": "Bearer am-secret"})
        payload = {"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": f"GpuXid{i}", "node": f"n{i % 50}"}} for i in range(1000)]}
        t0 = time.perf_counter()
        r = client.post("/v1/alerts", json=payload)
        took = time.perf_counter() - t0
        assert r.status_code == 202, r.text
        body = r.json()
        cap = sup.settings.server.alerts.per_minute
        assert len(body["queued"]) == cap and body["dropped"] == 1000 - cap
        assert sup.journal.findings() == []  # nothing acted on inside the request
        assert took < 2.0
        again = client.post("/v1/alerts", json={**payload, "alerts": payload["alerts"][:1]}).json()
        assert again["ignored"][0]["why"] == "duplicate"
        assert errors_metric(client, "alert_dropped") == 1000 - cap
        while sup.alerts.pending:
            sup.alerts.process_one()
        assert 0 < len(sup.journal.findings(limit=10_000)) <= cap
        # the alerts role can post alerts and nothing else
        assert client.get("/v1/status").status_code == 403
    finally:
        sup.journal.close()


# --- 5 -------------------------------------------------------------------------------------------

def _render(renderable) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=True, color_system=None, highlight=False).print(renderable)
    return buf.getvalue()


def test_finding_5_audit_survives_1e400_surrogates_escape_codes_and_odd_alert_ranks(tmp_path, monkeypatch):
    """1e400 was stored as inf and broke GET /v1/audit for good; a lone surrogate was a 500 with no
    audit row; escape codes and rich markup in a reason were rendered live by `audit`; an alert
    rank of "²" or 30 digits was a 500 after an incident had opened."""
    monkeypatch.setenv("TITAN_SUPERVISOR_TOKENS",
                       f"op:operator:{hash_token('op-secret')},am:alerts:{hash_token('am-secret')}")
    sup = make_sup(tmp_path)
    try:
        anon = TestClient(build_app(sup), base_url="http://127.0.0.1", raise_server_exceptions=False)
        op = TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": "Bearer op-secret"}, raise_server_exceptions=False)
        hostile = "\x1b[2J\x1b[1;1H[link=http://evil]click[/link] [red]FAKE LOG LINE[/red]\r"
        attempts = [
            anon.post("/v1/commands/lr", content=b'{"reason": "x", "scale": 1e400}',
                      headers={"Content-Type": "application/json"}),  # refused 401, still audited
            op.post("/v1/commands/lr", content=b'{"reason": "x", "scale": 1e400}',
                    headers={"Content-Type": "application/json"}),
            op.post("/v1/commands/lr", content=b'{"reason": "\\ud800", "scale": 1.0}',
                    headers={"Content-Type": "application/json"}),
            op.post("/v1/commands/lr", json={"reason": hostile, "scale": 0.5}),
        ]
        assert [a.status_code for a in attempts][:2] == [401, 400]
        assert all(a.status_code < 500 for a in attempts), [a.text for a in attempts]
        audit = op.get("/v1/audit")
        assert audit.status_code == 200
        rows = audit.json()["commands"]
        assert len(rows) == len(attempts)  # every attempt is one row
        assert all("Infinity" not in json.dumps(r) for r in rows)
        text = _render(render_audit(rows))
        assert "\x1b[2J" not in text and "\r" not in text.replace("\r\n", "\n")
        assert "[link=http://evil]" in text and "\\x1b[2J" in text  # shown as the text it is
        # alerts with odd ranks: ignored and listed, no 500, no finding
        am = TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": "Bearer am-secret"}, raise_server_exceptions=False)
        for rank in ("²", "1" * 30, "-1", "65536"):
            r = am.post("/v1/alerts", json={"version": "4", "status": "firing", "alerts": [
                {"status": "firing", "labels": {"alertname": hostile, "node": "n1", "rank": rank}}]})
            assert r.status_code == 202 and r.json()["ignored"][0]["why"].startswith("rank label"), r.text
        r = am.post("/v1/alerts", json={"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": hostile, "node": "n1", "rank": "1"}}]})
        assert r.status_code == 202
        while sup.alerts.pending:
            sup.alerts.process_one()
        inc = sup.journal.incidents(limit=1)
        if inc:
            detail = op.get(f"/v1/incidents/{inc[0]['id']}").json()
            out = _render(render_incident(detail))
            assert "\x1b[2J" not in out
    finally:
        sup.journal.close()


# --- 6 -------------------------------------------------------------------------------------------

def test_finding_6_trainer_token_stored_only_as_a_hash_and_files_private(sup):
    """The trainer token was journaled in plain text and journal.sqlite* were 0644."""
    token = sup.trainer_token
    assert token
    sup.journal.set_meta("probe", 1)  # make sure the WAL holds recent pages too
    sv = sup.workdir / "supervisor"
    blobs = b"".join(p.read_bytes() for p in sv.iterdir() if p.name.startswith("journal.sqlite"))
    assert token.encode() not in blobs
    assert hash_token(token) in sup.journal.get_meta("trainer_token_sha256")
    for p in sv.iterdir():
        if p.name.startswith("journal.sqlite"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(sv.stat().st_mode) == 0o700


def test_finding_6_a_restarted_daemon_admits_old_ranks_and_drops_a_legacy_plaintext_token(tmp_path):
    sup = make_sup(tmp_path)
    old = sup.trainer_token
    sup.journal.set_meta("trainer_token", "legacy-plaintext-token")  # what older versions stored
    sup.journal.close()
    sup2 = make_sup(tmp_path)
    try:
        assert sup2.trainer_token != old
        assert sup2.trainer_allowed(old) and sup2.trainer_allowed("legacy-plaintext-token")
        assert not sup2.trainer_allowed("guess") and not sup2.trainer_allowed(None)
        assert sup2.journal.get_meta("trainer_token") is None
    finally:
        sup2.journal.close()


# --- 7 -------------------------------------------------------------------------------------------

def _run_cli(tmp_path, toml: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "run", str(cfg)], env=trainer_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_finding_7_careless_operator_gets_a_config_error_exit_2_and_nothing_created(tmp_path):
    """Port in use, unwritable workdir, unknown preset, nan/negative/inf durations: each is
    `config error: <field>: <why>`, exit 2, no traceback, no folder created."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    w = tmp_path / "w"
    cases = [
        (f'[run]\nworkdir = "{w}"\n[server]\nport = {busy.getsockname()[1]}\n', "server.port", "already in use"),
        (f'[run]\nworkdir = "{blocker / "sub"}"\n', "run.workdir", "not a directory"),
        (f'[run]\nworkdir = "{w}"\npreset = "nope"\n', "run.preset", "unknown preset"),
        (f'[run]\nworkdir = "{w}"\n[detect.stall]\nheartbeat_timeout = nan\n', "detect.stall.heartbeat_timeout", ""),
        (f'[run]\nworkdir = "{w}"\n[detect.stall]\nheartbeat_timeout = -1\n', "detect.stall.heartbeat_timeout", ""),
        (f'[run]\nworkdir = "{w}"\n[launch]\nstop_grace_s = inf\n', "launch.stop_grace_s", ""),
    ]
    try:
        for toml, field, why in cases:
            p = _run_cli(tmp_path, toml)
            assert p.returncode == 2, (field, p.returncode, p.stderr[-2000:])
            assert p.stderr.startswith("config error:") and field in p.stderr and why in p.stderr, p.stderr
            assert "Traceback" not in p.stderr
            assert not w.exists(), f"{field}: the run folder was created"
    finally:
        busy.close()


def test_finding_7_disk_full_fails_readyz_and_shows_in_metrics(sup, trainer):
    """With the disk full the daemon logged tracebacks while /readyz stayed 200 and no metric moved.
    SQLite's page limit makes the journal's next write fail with SQLITE_FULL, as a full disk does."""
    assert trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(1)]}).status_code == 200
    sup.status.set("running")
    assert trainer.get("/readyz").status_code == 200
    conn = sup.journal._conn  # noqa: SLF001 - the test fills the "disk"
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = [record(i, skip_reason="x" * 1500) for i in range(2, 400)]
    r = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": big})
    assert r.status_code in (200, 503)
    ready = trainer.get("/readyz")
    assert ready.status_code == 503 and "disk_full" in ready.json()["problems"], ready.text
    assert errors_metric(trainer, "disk_full") >= 1
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(500)]}).status_code == 200


def test_finding_4_the_daemons_own_stall_is_not_blamed_on_the_ranks(sup):
    """A starved loop made a healthy trainer look hung. When the reconcile loop's own sleep overran
    (the daemon stalled), hang deadlines are deferred by the stall before any tick can fire."""
    from supervisor.protocol import StepRecord

    now = time.time()
    sup.suite.reset_generation(0, now - 60, resume_step=None, world_size=2)
    sup.suite.observe_record(StepRecord.model_validate(record(1, wall_time=now - 30)))
    assert any(f.kind == "hang" for f in sup.suite.tick(now)), "precondition: the deadline has passed"
    sup.suite.reset_generation(0, now - 60, resume_step=None, world_size=2)
    sup.suite.observe_record(StepRecord.model_validate(record(1, wall_time=now - 30)))
    sup._check_own_stall(sup.settings.launch.poll_interval_s + 0.2)  # a normal tick: nothing deferred
    assert errors_metric(TestClient(build_app(sup), base_url="http://127.0.0.1"), "loop_stall") == 0
    sup._check_own_stall(30.0)  # the loop itself did not run for ~30 s
    assert [f.kind for f in sup.suite.tick(now + 1) if f.kind == "hang"] == []
    assert errors_metric(TestClient(build_app(sup), base_url="http://127.0.0.1"), "loop_stall") == 1


# --- browsers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,headers,open_mode,status", [
    ("POST", {b"content-type": b"application/json", b"host": b"127.0.0.1:8642"}, True, None),
    ("POST", {b"content-type": b"application/json; charset=utf-8", b"host": b"localhost:1"}, True, None),
    ("POST", {b"content-type": b"application/merge-patch+json", b"host": b"[::1]:8642"}, True, None),
    ("POST", {b"host": b"127.0.0.1"}, True, None),  # no body, no type (an ack)
    ("POST", {b"content-length": b"12", b"host": b"127.0.0.1"}, True, 415),  # a body and no type
    ("POST", {b"content-type": b"text/plain;charset=UTF-8", b"host": b"127.0.0.1"}, True, 415),
    ("POST", {b"content-type": b"application/x-www-form-urlencoded", b"host": b"127.0.0.1"}, False, 415),
    ("POST", {b"content-type": b"application/json", b"origin": b"null", b"host": b"127.0.0.1"}, False, 403),
    ("POST", {b"content-type": b"application/json", b"host": b"attacker.example:8642"}, True, 403),
    ("GET", {b"host": b"attacker.example:8642"}, True, 403),  # DNS rebinding reads the status
    ("GET", {b"host": b"10.0.0.5:8642"}, False, None),  # with tokens: a scrape by address
    ("GET", {b"host": b"127.0.0.1", b"origin": b"http://x"}, True, None),  # reads change nothing
])
def test_what_only_a_browser_sends_is_refused(method, headers, open_mode, status):
    from supervisor.browser_guard import refusal

    got = refusal(method, headers, open_mode=open_mode)
    assert (got and got[0]) == status, got


def test_a_web_page_cannot_drive_an_unauthenticated_loopback_daemon(tmp_path):
    """With no tokens and `allow_unauthenticated_loopback = true`, a page in a browser on the same
    machine could switch the policy off with a text/plain form post, and a DNS-rebinding page could
    read the status; the alerts webhook was open too. Now each is refused and changes nothing, and
    the local CLI's own request (JSON, to 127.0.0.1, no Origin) still works."""
    sup = make_sup(tmp_path, allow_unauthenticated_loopback=True)
    try:
        c = TestClient(build_app(sup), base_url="http://127.0.0.1", raise_server_exceptions=False)
        body = json.dumps({"mode": "off", "reason": "x"}).encode()
        form = c.post("/v1/policy", content=body, headers={"Content-Type": "text/plain;charset=UTF-8",
                                                            "Origin": "http://attacker.example"})
        assert form.status_code == 403 and "browser" in form.json()["error"]
        plain = c.post("/v1/policy", content=body, headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        rebound = TestClient(build_app(sup), base_url="http://attacker.example:8642", raise_server_exceptions=False)
        assert rebound.post("/v1/policy", json={"mode": "off", "reason": "x"}).status_code == 403
        assert rebound.get("/v1/status").status_code == 403
        alert = {"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "GpuXid",
                                                                                             "node": "gpu-017"}}]}
        assert c.post("/v1/alerts", json=alert).status_code == 401 and sup.alerts.pending == 0
        assert sup.journal.commands() == [] or all(not row["accepted"] for row in sup.journal.commands())
        assert c.get("/v1/status").json()["mode"] == "auto"
        ok = c.post("/v1/policy", json={"mode": "off", "reason": "x"})
        assert ok.status_code == 200 and sup.journal.commands()[-1]["actor"] == "local"
    finally:
        sup.journal.close()


@pytest.mark.parametrize("patch,field", [
    ({"step": True}, "records.0.step"), ({"step": "35"}, "records.0.step"), ({"step": 36.0}, "records.0.step"),
    ({"update_skipped": "yes"}, "records.0.update_skipped"), ({"wall_time": "1796000000"}, "records.0.wall_time"),
    ({"run_id": "OTHER-RUN"}, "records"), ({"generation": 99}, "records"),
])
def test_telemetry_types_are_not_coerced_and_records_are_the_batchs(trainer, sup, patch, field):
    """pydantic converted `true` to step 1 and "35" to step 35, and took a record of another run
    inside this run's batch; each is a 400 naming the field now, and nothing is journaled."""
    rec = {"run_id": "t", "generation": 0, "step": 5, "loss": 3.0, "grad_norm": 1.0, "lr": 1e-3, "lr_scale": 1.0,
           "tokens_per_s": 1.0, "step_seconds": 0.1, "wall_time": time.time(), **patch}
    r = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [rec]})
    assert r.status_code == 400, r.text
    assert any(d["field"].startswith(field) for d in r.json()["details"]), r.json()
    assert sup.journal.recent_steps(10) == []
    good = trainer.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [{**rec, **{
        "step": 5, "update_skipped": False, "wall_time": time.time(), "run_id": "t", "generation": 0}}]})
    assert good.status_code == 200 and len(sup.journal.recent_steps(10)) == 1  # the same record, well-typed


@pytest.mark.parametrize("hidden", ["\x1b", "\x9b", "\u202e", "\u061c", "\ufeff", "\u2060", "\xad", "\U000e0041",
                                    "\u2028", "\u2029", "\ue000", "\u200b"])
def test_every_hidden_character_is_spelled_out_when_printed(hidden):
    """By Unicode category (controls, format characters, separators, private use), not a range
    list: the Arabic letter mark, BOM, word joiner, soft hyphen and tag characters got through."""
    from supervisor.wire import inert

    out = inert(f"a{hidden}b")
    assert hidden not in out and out.startswith("a\\") and out.endswith("b")
    assert inert("é ü 中文 🙂") == "é ü 中文 🙂"  # visible text stays as it is


def test_an_alert_whose_node_label_is_no_node_name_is_ignored_and_names_why(tmp_path, monkeypatch):
    """An Alertmanager label became an exclude_node target and a page's text as it came: a path
    (`../../apis/...`), markup and a line break. It is ignored now, said why; a node name, an IP
    and an `instance` host:port or [v6]:port still name a node."""
    from supervisor.alert_receiver import node_of

    monkeypatch.setenv("TITAN_SUPERVISOR_TOKENS", f"am:alerts:{hash_token('am-secret')}")
    sup = make_sup(tmp_path)
    try:
        client = TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": "Bearer am-secret"})
        bad = "../../apis/apps/v1/namespaces/default/deployments/x\n<b>**Xid**</b> " + "A" * 3000
        labels = [{"alertname": "GpuEcc", "node": bad}, {"alertname": "GpuEcc", "node": "a..b"},
                  {"alertname": "GpuEcc", "node": "gpu-017.cluster.local"}]
        r = client.post("/v1/alerts", json={"version": "4", "status": "firing",
                                             "alerts": [{"status": "firing", "labels": lb} for lb in labels]})
        body = r.json()
        assert r.status_code == 202 and [q["host"] for q in body["queued"]] == ["gpu-017.cluster.local"]
        assert [i["index"] for i in body["ignored"]] == [0, 1]
        assert all("not a node name" in i["why"] for i in body["ignored"])
        assert sup.alerts.pending == 1
    finally:
        sup.journal.close()
    assert node_of({"instance": "10.0.0.7:9100"}) == "10.0.0.7"
    assert node_of({"instance": "[fd00::7]:9100"}) == "fd00::7"
    assert node_of({"node": "fd00::7"}) == "fd00::7"
