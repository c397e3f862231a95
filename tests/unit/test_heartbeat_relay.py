"""The node agent's heartbeat relay (supervisor/agent/relay.py): real HTTP over a real unix socket,
real processes. Ranks beat to their agent, which sends each rank's latest beat in its next report.

No daemon runs here (the daemon's side of relayed heartbeats is tests/unit/test_node_ingest.py;
the two node-agent drills in tests/integration/test_node_agents.py run it end to end).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from supervisor.agent.ranks import NodeRun
from supervisor.agent.relay import ENV_TOKEN, MAX_BODY, HeartbeatRelay
from supervisor.protocol import NodeOrder


class UnixConn(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def send(relay: HeartbeatRelay, body, token: str | None = None) -> tuple[int, dict]:
    conn = UnixConn(relay.path)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/v1/heartbeat", body=data, headers=headers)
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return out


def beat(rank=0, pid=None, **kw):
    hb = {"run_id": "t", "generation": 0, "rank": rank, "step": 5, "pid": pid or os.getpid(),
          "host": "whatever-the-rank-thinks", "wall_time": time.time(), "phase": "train_step"}
    hb.update(kw)
    return hb


@pytest.fixture
def relay(tmp_path):
    pids = {0: os.getpid(), 1: os.getppid()}
    woken = []
    r = HeartbeatRelay(run_id="t", node="node-a", rank_pid=pids.get, on_change=lambda: woken.append(1),
                       path=HeartbeatRelay.socket_path(tmp_path)).start()
    env = r.open(0)
    r.woken = woken
    yield r, env[ENV_TOKEN]
    r.close()


def test_only_the_agents_user_can_reach_the_socket(relay, tmp_path):
    r, _ = relay
    assert stat.S_IMODE(os.stat(Path(r.path).parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(r.path).st_mode) == 0o600


def test_a_long_agent_dir_gets_a_private_short_socket_dir(tmp_path):
    """Too long for a socket: a 0700 directory of this user in /tmp, the same for the same agent dir
    (a restarted agent binds the socket its adopted ranks know), another for another agent dir."""
    p = HeartbeatRelay.socket_path(tmp_path / ("x" * 120))
    try:
        assert len(str(p)) <= 100 and stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700
        assert os.stat(p.parent).st_uid == os.getuid()
        assert HeartbeatRelay.socket_path(tmp_path / ("x" * 120)) == p
        assert HeartbeatRelay.socket_path(tmp_path / ("y" * 120)).parent != p.parent
    finally:
        for d in {p.parent, HeartbeatRelay.socket_path(tmp_path / ("y" * 120)).parent}:
            d.rmdir()  # the test's own empty directories


def test_a_heartbeat_is_kept_once_per_rank_with_the_agents_node_name(relay):
    r, tok = relay
    assert send(r, beat(0, step=5), tok) == (200, {"ok": True})
    assert send(r, beat(0, step=6), tok)[0] == 200
    assert send(r, beat(1, pid=os.getppid()), tok)[0] == 200
    got = r.take()
    assert [(b["rank"], b["step"], b["host"]) for b in got] == [(0, 6, "node-a"), (1, 5, "node-a")]
    assert r.take() == []  # each beat is sent once: a silent rank stays silent at the daemon
    # a report that failed puts its beats back, unless the rank beat again meanwhile
    assert send(r, beat(0, step=7), tok)[0] == 200
    r.put_back(got)
    assert [(b["rank"], b["step"]) for b in r.take()] == [(0, 7), (1, 5)]


@pytest.mark.parametrize("token", [None, "", "wrong", "x" * 43])
def test_a_wrong_or_missing_secret_is_refused_and_keeps_nothing(relay, token):
    r, _ = relay
    status, body = send(r, beat(0), token)
    assert status == 401 and "relay token missing or wrong" in body["error"]
    assert r.take() == [] and r.refused == 1


def test_a_new_generation_refuses_the_old_generations_secret(relay):
    r, old = relay
    new = r.open(1)[ENV_TOKEN]
    assert new != old
    assert send(r, beat(0, generation=1), old)[0] == 401
    assert send(r, beat(0, generation=0), new)[0] == 409  # the old generation's beat, with the new secret
    assert send(r, beat(0, generation=1), new)[0] == 200
    assert [b["generation"] for b in r.take()] == [1]


@pytest.mark.parametrize("body,status,why", [
    (b"x" * (MAX_BODY + 1), 413, f"the limit is {MAX_BODY}"),
    (b"{not json", 400, "JSON"),
    (json.dumps(beat(0)).replace('"step": 5', '"step": 1e400').encode(), 400, ""),
    ({**beat(0), "pid": 0}, 400, "body is not a valid Heartbeat: pid"),
    ({**beat(0), "rank": "0; rm -rf /"}, 400, "body is not a valid Heartbeat: rank"),
    ({**beat(0), "directive": "stop"}, 400, "directive"),
    (beat(0, wall_time=time.time() + 86400), 400, "wall_time"),
    (beat(0, run_id="other"), 409, "not generation 0 of 'other'"),
    (beat(0, generation=3), 409, "runs generation 0"),
    (beat(5), 403, "rank 5 with pid"),  # a rank this node does not run
    (beat(0, pid=os.getppid()), 403, "not a rank this node's agent started"),  # rank 0's pid is another
])
def test_a_hostile_heartbeat_is_refused_with_a_specific_error_and_keeps_nothing(relay, body, status, why):
    r, tok = relay
    got_status, got = send(r, body, tok)
    assert got_status == status, got
    assert why in got["error"], got
    assert r.take() == [] and r.woken == []


def test_the_relay_holds_at_most_one_beat_per_rank_of_its_node(relay):
    r, tok = relay
    for i in range(50):
        send(r, beat(i % 2, pid=os.getpid() if i % 2 == 0 else os.getppid(), step=i), tok)
        send(r, beat(2 + i, step=i), tok)  # ranks this node does not run: refused
    got = r.take()
    assert [(b["rank"], b["step"]) for b in got] == [(0, 48), (1, 49)]
    assert r.refused == 50


def test_a_phase_change_asks_the_agent_for_an_early_report(relay):
    r, tok = relay
    send(r, beat(0, phase="train_step"), tok)
    assert len(r.woken) == 1  # a rank's first beat
    send(r, beat(0, phase="train_step"), tok)
    assert len(r.woken) == 1  # same phase: the regular report is soon enough
    time.sleep(0.3)
    send(r, beat(0, phase="checkpoint"), tok)
    assert len(r.woken) == 2


SCRIPT = """
import os, subprocess, sys, time
env = dict(os.environ, RANK="3")
child = subprocess.Popen([sys.executable, "-c", '''
import os, time
from training.telemetry import TelemetryClient, TelemetryConfig
c = TelemetryClient(TelemetryConfig(url="http://127.0.0.1:9", run_id="t", generation=0, rank=3, heartbeat_s=0.2))
time.sleep(60)
'''], env=env)
child.wait()
"""


def test_a_real_ranks_telemetry_client_beats_to_its_agent_through_the_environment(tmp_path):
    """A real process tree started by the agent's `NodeRun` (a torchrun stand-in and one rank): the
    rank's `TelemetryClient` finds the relay's socket and secret in its environment, and the relay
    knows the rank's pid from /proc (RANK=3 in its environment, a child of our 'torchrun')."""
    runs: list[NodeRun] = []  # the agent wires its current run the same way (Agent._rank_pid)
    r = HeartbeatRelay(run_id="t", node="node-a", rank_pid=lambda rank: runs[0].rank_pid(rank) if runs else None,
                       path=HeartbeatRelay.socket_path(tmp_path)).start()
    env = r.open(0)
    run = NodeRun(NodeOrder(generation=0, argv=[sys.executable, "-c", SCRIPT]), tmp_path / "logs", relay_env=env)
    runs.append(run)
    run.start()
    try:
        deadline = time.time() + 60
        got = []
        while time.time() < deadline and not got:
            time.sleep(0.2)
            got = r.take()
        assert got, (tmp_path / "logs" / "generation-0.log").read_text()[-2000:]
        run.discover()
        assert got[0]["rank"] == 3 and got[0]["pid"] == run.gen.rank_pids[3] and got[0]["host"] == "node-a"
        state = json.loads((tmp_path / "logs" / "current.json").read_text())
        assert state["relay_env"] == env  # a restarted agent hands the adopted ranks' socket and secret on
        assert stat.S_IMODE(os.stat(tmp_path / "logs" / "current.json").st_mode) == 0o600
        # the agent dies: the rank's beats go nowhere (dropped and counted there), training goes on
        r.close()
        r.take()  # a beat that came in before the close
        time.sleep(0.6)
        assert run.state()[0] == "running" and r.take() == []
    finally:
        run.stop(2.0)


def _wait_beats(agent, timeout=60.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = agent.report()
        if body["heartbeats"]:
            return body
        time.sleep(0.2)
    raise AssertionError("no heartbeat reached the agent")


def test_an_agent_reports_its_ranks_beats_keeps_them_while_the_daemon_is_away_and_a_restarted_agent_adopts_them(
        tmp_path):
    """The real `Agent` (no daemon: its url is a closed port, as when the daemon is down): a generation
    it starts beats to its relay through the environment; a report carries the beats with the rank
    listed; a report that does not get through puts them back; a second agent process (the first one
    gone) adopts the running ranks and takes their beats on the same socket with the same secret."""
    from supervisor.agent.main import Agent, AgentConfig

    cfg = AgentConfig(daemon_url="http://127.0.0.1:9", run_id="t", agent_id="node-a", node="node-a",
                      workdir=tmp_path, kernel_log="none", request_timeout_s=1.0)
    logs: list[str] = []
    agent = Agent(cfg, log=lambda msg, **kw: logs.append(msg))
    agent.apply({"generation": 0, "argv": [sys.executable, "-c", SCRIPT], "node_rank": 0, "nnodes": 1})
    try:
        body = _wait_beats(agent)
        assert [b["rank"] for b in body["heartbeats"]] == [3] and body["heartbeats"][0]["host"] == "node-a"
        assert {(r["rank"], r["pid"]) for r in body["ranks"]} >= {(3, body["heartbeats"][0]["pid"])}
        rank_pid = body["heartbeats"][0]["pid"]
        os.kill(rank_pid, signal.SIGSTOP)  # no new beat from here on: what the report holds is the old one
        try:
            time.sleep(0.5)
            agent.report()  # drains a beat sent before the stop
            agent.relay.put_back(body["heartbeats"])  # a beat waiting for the next report
            agent.tick()  # the daemon is away: the report fails and the beat is put back
            assert "daemon unreachable" in logs, logs
            assert agent.report()["heartbeats"] == body["heartbeats"]
            assert agent.report()["heartbeats"] == []  # sent once: a stopped rank is silent
        finally:
            os.kill(rank_pid, signal.SIGCONT)
        # the agent process goes away (its ranks keep running: crash-only); the next one adopts them
        agent.relay.close()
        again = Agent(cfg, log=lambda msg, **kw: logs.append(msg))
        try:
            assert again.run is not None and again.run.generation == 0 and again.relay.path == agent.relay.path
            body = _wait_beats(again)
            assert [b["rank"] for b in body["heartbeats"]] == [3]
        finally:
            again.relay.close()
    finally:
        agent.run.stop(2.0)


def test_beats_the_relay_does_not_take_ride_on_the_next_record_as_a_running_total(tmp_path, monkeypatch):
    """The agent is gone (its socket does not exist): the rank's beats are dropped and counted, and
    the count reaches the daemon on the next step record (`titan_telemetry_dropped_heartbeats_total`)."""
    from training.telemetry import TelemetryClient, TelemetryConfig

    monkeypatch.setenv("TITAN_SUPERVISOR_RELAY_SOCKET", str(tmp_path / "gone.sock"))
    monkeypatch.setenv("TITAN_SUPERVISOR_RELAY_TOKEN", "x" * 32)
    c = TelemetryClient(TelemetryConfig(url="http://127.0.0.1:9", run_id="t", generation=0, rank=0,
                                        heartbeat_s=0.05))
    try:
        deadline = time.time() + 20
        while c.heartbeats_dropped < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert c.heartbeats_dropped >= 2
        rec = {"step": 1}
        c.record(rec)
        assert rec["dropped_heartbeats"] >= 2 and rec["dropped_records"] == c.dropped
    finally:
        c.close(0.5)


@pytest.mark.parametrize("declared", [b"\xb2", b"1_0", b"-1", b"9" * 40])
def test_a_content_length_that_is_no_ascii_number_is_a_411(relay, declared):
    relay, _ = relay
    """`str.isdigit()` is true for a superscript two, which int() then refused: the request was
    dropped with a traceback and no answer (found by an adversarial review)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(relay.path)
    try:
        s.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: " + declared + b"\r\n\r\n{}")
        answer = s.recv(4096)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.0 411") or answer.startswith(b"HTTP/1.1 411"), answer[:200]
    assert relay.take() == []
