"""Drill (issue 10): a hostile local client attacks a live supervised run for up to 60 s.

Everything is real: the daemon (`titan-supervisor run`) as a subprocess, real torchtitan on 2 CPU
ranks, real HTTP on 127.0.0.1. The attacker has what a local process of the same user has: it
reads the trainer token from a rank's /proc/PID/environ, so the daemon's other defences (rank pid
verification, ranges, clock window, caps, rate limits) are what is tested, not just the token.

It sends, in a loop: forged heartbeats (a foreign pid, a pid that does not exist, a rank that does
not exist, a future wall time, a huge step), a 1 GiB body (declared and chunked), 10,000 alerts
(ten webhooks of 1,000), and operator commands with 1e400, a lone surrogate and terminal escape
codes. Then: the run finishes all its steps in one generation (0 restarts), the foreign process
was never signalled, every command attempt is one audit row and renders without escape codes,
and the daemon's RSS stayed under RSS_BOUND_MIB.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
import urllib.error
import urllib.request

import psutil
import pytest

from supervisor.auth import add_token
from supervisor.journal import Journal
from supervisor.oncall import render_audit
from tests.daemon_harness import AuthedDaemon, drill_config, free_port

pytestmark = [pytest.mark.integration, pytest.mark.drill]

RSS_BOUND_MIB = 300  # the daemon idles at ~90 MiB; a 1 GiB body read whole took it to 1.8 GB
ATTACK_S = 60.0
STEPS = 300
CLOSED = -1  # connection refused: the daemon stopped listening (the run finished); the attack ends
HOSTILE = "\x1b[2J\x1b[1;1H[link=http://evil]click[/link] fake log line\r"


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 10.0) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return CLOSED
        return 0
    except OSError:
        return 0


def steal_trainer_token(workdir) -> tuple[str, list[int]]:
    """What a same-user process can do: read the token from a rank's environment."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "training.run" in cmd and str(workdir) in cmd and "torch.distributed.run" not in cmd:
                env = p.environ()
                if "TITAN_SUPERVISOR_TRAINER_TOKEN" in env:
                    return env["TITAN_SUPERVISOR_TRAINER_TOKEN"], [p.pid]
        except psutil.Error:
            continue
    return "", []


def big_chunked_body(port: int, token: str) -> int:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionRefusedError:  # the run finished and the daemon stopped listening
        return 0
    s.sendall(f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk, sent = b"100000\r\n" + b"{" * 2**20 + b"\r\n", 0
    try:
        import select

        while sent < 2**30 and not select.select([s], [], [], 0)[0]:
            s.sendall(chunk)
            sent += 2**20
    except OSError:
        pass
    finally:
        s.close()
    return sent


class Attacker:
    def __init__(self, d: AuthedDaemon, token: str, operator: str, am: str, victim_pid: int) -> None:
        self.d, self.token, self.operator, self.am, self.victim = d, token, operator, am, victim_pid
        self.codes: dict[str, list[int]] = {}
        self.commands_sent = 0
        self.big_bodies = 0

    def note(self, what: str, code: int) -> None:
        self.codes.setdefault(what, []).append(code)

    def closed(self) -> bool:
        return any(c == CLOSED for codes in self.codes.values() for c in codes[-50:])

    def heartbeats(self, n: int) -> None:
        now = time.time()
        auth = {"Authorization": f"Bearer {self.token}"}
        gen = (self.d.status() or {}).get("generation", 0) or 0
        forged = [dict(rank=0, pid=self.victim, step=1, wall_time=now),
                  dict(rank=1, pid=4_000_000, step=1, wall_time=now),
                  dict(rank=9, pid=self.victim, step=1, wall_time=now),
                  dict(rank=1, pid=self.victim, step=2**62, wall_time=now),
                  dict(rank=1, pid=self.victim, step=10**9, wall_time=now + 3600)]
        for i in range(n):
            hb = {"run_id": "drill", "generation": gen, "host": "h", **forged[i % len(forged)]}
            self.note("heartbeat", post(self.d.url + "/v1/heartbeat", json.dumps(hb).encode(), auth))

    def alerts(self) -> None:
        payload = {"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": f"Xid{i}{HOSTILE}", "node": f"n{i % 100}",
                                            "rank": ["²", "1" * 30, "0"][i % 3]}} for i in range(1000)]}
        self.note("alerts", post(self.d.url + "/v1/alerts", json.dumps(payload).encode(),
                                 {"Authorization": f"Bearer {self.am}"}))

    def commands(self) -> None:
        op = {"Authorization": f"Bearer {self.operator}"}
        for body, headers in ((b'{"reason": "x", "scale": 1e400}', op),
                              (b'{"reason": "x", "scale": 1e400}', {}),  # refused 401, still audited
                              (b'{"reason": "\\ud800", "scale": 1.0, "dry_run": true}', op),
                              (json.dumps({"reason": HOSTILE, "scale": 1.0, "dry_run": True}).encode(), op)):
            self.note("command", post(self.d.url + "/v1/commands/lr", body, headers))
            self.commands_sent += 1

    def huge(self) -> None:
        self.note("declared_1gib", post(self.d.url + "/v1/heartbeat", b"{" * 1024,
                                        {"Content-Length": str(2**30), "Authorization": f"Bearer {self.token}"}))
        big_chunked_body(self.d.port, self.token)
        self.big_bodies += 1


def test_hostile_local_client_cannot_kill_stall_or_corrupt_a_live_run(tmp_path):
    tokens = tmp_path / "tokens.jsonl"
    operator = add_token(tokens, "oncall", "operator")
    am = add_token(tokens, "alertmanager", "alerts")
    cfg = drill_config(tmp_path / "run", free_port(), steps=STEPS)
    cfg["server"]["token_file"] = str(tokens)
    d = AuthedDaemon(tmp_path, cfg)
    d.token = operator
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    rss_max = [0.0]
    stop = threading.Event()

    def watch_rss():
        p = psutil.Process(d.proc.pid)
        while not stop.is_set():
            try:
                rss_max[0] = max(rss_max[0], p.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.2)

    try:
        d.start()
        d.wait_for(lambda st: st.get("state") == "running" and st.get("step", 0) >= 1, 180, "training to start")
        token, _ = steal_trainer_token(d.workdir)
        assert token, "the ranks did not get a trainer token"
        threading.Thread(target=watch_rss, daemon=True).start()
        a = Attacker(d, token, operator, am, victim.pid)
        t0, rounds = time.time(), 0
        while time.time() - t0 < ATTACK_S and d.proc.poll() is None and not a.closed():
            a.heartbeats(50)
            if rounds < 10:
                a.alerts()  # 10 x 1,000 = 10,000 alerts
            if rounds % 5 == 0:
                a.commands()
            if rounds % 10 == 0:
                a.huge()
            rounds += 1
        attacked_s = time.time() - t0
        assert d.wait_exit(240) == 0, d.log_tail()
        stop.set()
        assert victim.poll() is None, "a process outside the run was signalled"
        # 0 = no answer within the client's 10 s, or a reset (seen in CI, 2026-12-02, in a window
        # where two other drills also lost timing races): not an acceptance, and rare. CLOSED: the
        # run finished and the daemon stopped listening during the last round (its process lives on
        # a while, so the loop's poll() did not see it yet)
        hb = a.codes["heartbeat"]
        assert set(hb) <= {0, CLOSED, 400, 403, 429}, Counter(hb)
        assert hb.count(0) <= max(5, len(hb) // 100), Counter(hb)
        assert set(a.codes["alerts"]) <= {CLOSED, 202, 429}, Counter(a.codes["alerts"])
        # 409: the run's trainer had exited (its last step) and the daemon not yet: a dry run needs a
        # running trainer (CI, 2026-12-02); every answer but a rate limit is audited
        cmd = a.codes["command"]
        assert set(cmd) <= {0, CLOSED, 200, 400, 401, 409, 429}, Counter(cmd)
        assert cmd.count(0) <= max(2, len(cmd) // 100), Counter(cmd)
        assert set(a.codes["declared_1gib"]) <= {CLOSED, 413}, Counter(a.codes["declared_1gib"])
        with Journal.open(d.workdir / "supervisor" / "journal.sqlite", readonly=True) as j:
            gens = j.generations()
            steps = j.recent_steps(limit=100_000)
            audit = j.commands(limit=100_000)
        assert len(gens) == 1, f"{len(gens) - 1} restart(s): {gens}"
        assert max(s["step"] for s in steps) == STEPS
        answered = sum(1 for c in cmd if c not in (0, CLOSED, 429))
        # an unanswered one (0) may or may not have reached the daemon before the client gave up
        assert answered <= len(audit) <= answered + cmd.count(0), (len(audit), Counter(cmd))
        buf = io.StringIO()
        from rich.console import Console

        Console(file=buf, width=200, force_terminal=True, color_system=None).print(render_audit(audit))
        assert "\x1b[2J" not in buf.getvalue() and "\\x1b[2J" in buf.getvalue()
        assert rss_max[0] < RSS_BOUND_MIB, f"daemon RSS reached {rss_max[0]:.0f} MiB"
        print(f"attacked {attacked_s:.0f} s, {rounds} rounds, {len(a.codes['heartbeat'])} forged heartbeats, "
              f"{len(a.codes['alerts']) * 1000} alerts, {a.commands_sent} commands, {a.big_bodies} x 1 GiB; "
              f"daemon RSS max {rss_max[0]:.0f} MiB")
    finally:
        stop.set()
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if str(d.workdir) in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        victim.kill()
        victim.wait(timeout=10)
