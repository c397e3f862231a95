"""The node agents' ingest route and the `nodes` commands, with a real Supervisor, journal, token
file and FastAPI app (no agent or trainer runs: reports are posted by the test, as an agent would).
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.auth import add_token
from supervisor.daemon import Supervisor
from supervisor.settings import Settings


def report(agent="node-a", node=None, **kw):
    r = {"run_id": "t", "agent_id": agent, "node": node or agent, "address": "127.0.0.1", "wall_time": time.time(),
         "generation": -1, "state": "idle"}
    r.update(kw)
    return r


@pytest.fixture
def setup(tmp_path):
    f = tmp_path / "tokens.jsonl"
    tok = {"a": add_token(f, "node-a", "agent"), "b": add_token(f, "node-b", "agent"),
           "op": add_token(f, "alice", "operator"), "viewer": add_token(f, "vic", "viewer")}
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t", "nproc_per_node": 1},
                      server={"port": 0, "token_file": str(f)},
                      launch={"backend": "agents", "agents": {"nodes": ["node-a", "node-b"]}})
    sup = Supervisor(s)
    sup.generation = 0
    yield sup, TestClient(build_app(sup), base_url="http://127.0.0.1"), tok
    sup.journal.close()


def post(client, token, body):
    return client.post("/v1/nodes/report", json=body, headers={"Authorization": f"Bearer {token}"})


def test_an_agent_registers_and_gets_its_order(setup):
    sup, client, tok = setup
    r = post(client, tok["a"], report(ranks=[{"rank": 0, "pid": 4242, "state": "running"}]))
    assert r.status_code == 200, r.text
    assert r.json()["order"] is None and r.json()["excluded"] is False
    v = sup.nodes.get("node-a")
    assert v is not None and v.report.ranks[0].pid == 4242
    assert [row["node"] for row in client.get("/v1/nodes", headers={
        "Authorization": f"Bearer {tok['viewer']}"}).json()["nodes"]] == ["node-a"]


@pytest.mark.parametrize("who,body,status,why", [
    ("b", report("node-a"), 403, "may only report as agent 'node-b'"),
    ("op", report("node-a"), 403, "need role agent"),
    (None, report("node-a"), 401, "agent token"),
    ("a", report("node-a", run_id="other"), 409, "not 'other'"),
    ("a", report("node-a", ranks=[{"rank": 0, "pid": 0}]), 400, "ranks.0.pid"),
    ("a", report("node-a", node="bad node!"), 400, "node"),
    ("a", report("node-a", wall_time=time.time() + 86400), 400, "wall_time"),
])
def test_a_bad_report_is_refused_and_changes_nothing(setup, who, body, status, why):
    sup, client, tok = setup
    r = post(client, tok[who] if who else "", body)
    assert r.status_code == status, r.text
    assert why in r.text
    assert sup.nodes.get("node-a") is None and sup.nodes.reports == 0


def test_kernel_xid_in_a_report_is_a_hardware_finding_naming_the_node(setup):
    sup, client, tok = setup
    line = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."
    r = post(client, tok["b"], report("node-b", health={"kernel": [{"pattern": "xid", "line": line}]}))
    assert r.status_code == 200
    f = sup.journal.findings()
    assert [x["kind"] for x in f] == ["hardware"] and f[0]["evidence"]["host"] == "node-b"


def test_rank_exits_are_queued_per_node_and_bounded(setup):
    sup, client, tok = setup
    cap = sup.nodes.config.max_exits_per_node
    exits = [{"rank": 0, "exitcode": -9, "wall_time": time.time()}] * 200
    for _ in range(cap // 200 + 2):
        assert post(client, tok["a"], report(generation=0, state="running", exits=exits)).status_code == 200
    v = sup.nodes.get("node-a")
    assert len(v.exits) == cap and v.exits_dropped == 200 * (cap // 200 + 2) - cap
    assert len(sup.nodes.take_exits("node-a", 0)) == cap and sup.nodes.take_exits("node-a", 0) == []


def command(client, tok, name, **body):
    return client.post(f"/v1/commands/{name}", json={"reason": "test", **body},
                       headers={"Authorization": f"Bearer {tok['op']}"})


def test_nodes_exclude_and_readmit_are_validated_dry_run_and_audited(setup):
    sup, client, tok = setup
    for agent in ("a", "b"):
        post(client, tok[agent], report(f"node-{agent}"))
    assert command(client, tok, "nodes-exclude", node="node-z").status_code == 400  # unknown node
    assert command(client, tok, "nodes-readmit", node="node-a").status_code == 409  # not excluded
    dry = command(client, tok, "nodes-exclude", node="node-b", dry_run=True)
    assert dry.status_code == 200 and dry.json()["plan"]["nodes_after"] == ["node-a"]
    assert sup.nodes.excluded == set()  # a dry run changes nothing
    r = command(client, tok, "nodes-exclude", node="node-b")
    assert r.status_code == 200, r.text
    assert sup.nodes.excluded == {"node-b"} and sup.journal.get_meta("excluded_nodes") == ["node-b"]
    # the excluded node is told to run nothing, whatever its order was
    assert post(client, tok["b"], report("node-b")).json() == {
        "order": {"generation": -1, "argv": [], "env": {}, "node_rank": None, "nnodes": None,
                  "stop_grace_s": 10.0, "stacks_id": None}, "report_interval_s": 1.0, "excluded": True}
    assert command(client, tok, "nodes-exclude", node="node-a").status_code == 409  # would leave none
    st = client.get("/v1/status", headers={"Authorization": f"Bearer {tok['viewer']}"}).json()
    assert st["nodes"]["excluded"] == ["node-b"]
    assert command(client, tok, "nodes-readmit", node="node-b").status_code == 200
    assert sup.nodes.excluded == set() and sup.journal.get_meta("excluded_nodes") == []
    audit = [(c["command"], c["accepted"]) for c in sup.journal.commands(limit=20)]
    assert ("nodes-exclude", True) in audit and ("nodes-readmit", True) in audit and ("nodes-exclude", False) in audit


def test_nodes_commands_are_refused_without_agents(tmp_path):
    f = tmp_path / "tokens.jsonl"
    op = add_token(f, "alice", "operator")
    sup = Supervisor(Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t"},
                                   server={"port": 0, "token_file": str(f)}))
    try:
        r = TestClient(build_app(sup), base_url="http://127.0.0.1").post("/v1/commands/nodes-exclude", json={"reason": "x", "node": "n1"},
                                            headers={"Authorization": f"Bearer {op}"})
        assert r.status_code == 409 and "launch.backend = local" in r.text
    finally:
        sup.journal.close()


def test_an_agent_token_cannot_speak_for_another_live_node(setup):
    """A stolen agent token binds its agent id, not the node name: reporting kernel errors under a
    live peer's node name (to get that node excluded) is refused and records nothing."""
    sup, client, tok = setup
    assert post(client, tok["a"], report("node-a")).status_code == 200
    assert post(client, tok["b"], report("node-b")).status_code == 200
    line = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."
    r = post(client, tok["b"], report("node-b", node="node-a", health={"kernel": [{"pattern": "xid", "line": line}]}))
    assert r.status_code == 409 and "node-b" in r.text, r.text
    assert sup.journal.findings() == []
    assert sup.nodes.get("node-a").node == "node-a" and sup.nodes.get("node-b").node == "node-b"


def test_a_lost_claim_can_be_taken_over(setup):
    """A replaced machine: once the old agent is silent for lost_after_s its node may be reported
    by another agent (the claim is only held while its agent is live)."""
    sup, client, tok = setup
    assert post(client, tok["a"], report("node-a")).status_code == 200
    sup.nodes.get("node-a").last_seen -= sup.nodes.config.lost_after_s + 1
    assert post(client, tok["b"], report("node-b", node="node-a")).status_code == 200


# --- heartbeats batched in the node's report (issue 13: 2,048 requests/s, not 16,384) -------------

def running_generation(sup, tmp_path):
    """Generation 0 on node-a (rank 0) and node-b (rank 1) as the real `AgentGeneration` sees it:
    a pid is a rank's only if its node's agent reports it (no process runs here)."""
    from supervisor.launch.agents import AgentGeneration, _Member
    from supervisor.launch.local import LaunchSpec

    spec = LaunchSpec(generation=0, nproc=1, preset="tiny", workdir=tmp_path, supervisor_url="", run_id="t")
    gen = AgentGeneration(sup.generations.launcher, spec, [_Member("node-a", "node-a", 0), _Member("node-b", "node-b", 1)])
    sup.generations.current, sup.generations.id = gen, 0
    sup.journal.record_generation_start(generation=0, run_id="t", load_step=0, skip_batches=0, lr_scale=1.0,
                                        layout={"nodes": ["node-a", "node-b"]})
    sup.suite.reset_generation(0, time.time(), world_size=2)
    return gen


def beat(rank, node, pid, step=5, **kw):
    hb = {"run_id": "t", "generation": 0, "rank": rank, "step": step, "pid": pid, "host": node,
          "phase": "train_step", "wall_time": time.time()}
    hb.update(kw)
    return hb


def node_report(agent, rank, pid, heartbeats):
    return report(agent, generation=0, state="running", ranks=[{"rank": rank, "pid": pid, "state": "running"}],
                  heartbeats=heartbeats)


def test_heartbeats_in_a_report_keep_ranks_alive_and_a_silent_one_is_found(setup, tmp_path):
    """The batched route feeds the same detector as /v1/heartbeat: both ranks beat inside their
    nodes' reports; then node-b's report leaves rank 1's heartbeat out (the rank is still listed:
    the process is there, its heartbeat thread is not) and rank 1 alone is found missing."""
    sup, client, tok = setup
    gen = running_generation(sup, tmp_path)
    for agent, rank, pid in (("a", 0, 4100), ("b", 1, 4200)):
        r = post(client, tok[agent], node_report(f"node-{agent}", rank, pid, [beat(rank, f"node-{agent}", pid)]))
        assert r.status_code == 200 and "heartbeats_refused" not in r.json(), r.text
    assert gen.rank_pids == {0: 4100, 1: 4200}  # learned from the heartbeats, checked against the reports
    silent_since = time.time()
    assert post(client, tok["b"], node_report("node-b", 1, 4200, [])).status_code == 200
    later = silent_since + sup.suite.stall.config.heartbeat_timeout + 0.5
    assert post(client, tok["a"], node_report("node-a", 0, 4100, [beat(0, "node-a", 4100, wall_time=later - 0.2)])
                ).status_code == 200
    found = [f for f in sup.suite.tick(later) if f.kind == "missing_heartbeat"]
    assert [(f.rank, f.evidence["host"]) for f in found] == [(1, "node-b")]


def test_a_heartbeat_of_another_node_or_run_refuses_the_report_and_changes_nothing(setup, tmp_path):
    sup, client, tok = setup
    gen = running_generation(sup, tmp_path)
    for hb, why in ((beat(1, "node-b", 4200), "names host 'node-b'"), (beat(0, "node-a", 4100, run_id="x"), "run 'x'")):
        r = post(client, tok["a"], node_report("node-a", 0, 4100, [hb]))
        assert r.status_code == 400 and why in r.text, r.text
    assert sup.nodes.get("node-a") is None and sup.nodes.reports == 0 and gen.rank_pids == {}


def _refused_count(sup) -> float:
    for line in sup.metrics.render().decode().splitlines():
        if line.startswith('titan_supervisor_errors_total{kind="heartbeat_refused"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_heartbeat_with_a_pid_the_node_does_not_run_is_refused_and_counted(setup, tmp_path):
    """A forged pid (one the node's own report does not list) never gets in; the report is taken."""
    sup, client, tok = setup
    gen = running_generation(sup, tmp_path)
    r = post(client, tok["a"], node_report("node-a", 0, 4100, [beat(0, "node-a", 999)]))
    assert r.status_code == 200, r.text
    assert r.json()["heartbeats_refused"] == 1
    assert "rank 0 with pid 999 of generation 0 is not among the ranks this report lists" in r.json()["heartbeat_refusal"]
    assert gen.rank_pids == {} and sup.nodes.get("node-a").report.ranks[0].pid == 4100
    assert _refused_count(sup) == 1


def test_a_relayed_heartbeat_is_checked_against_its_own_node_only(setup, tmp_path, monkeypatch):
    """The stricter check for relayed heartbeats (issue 13): a heartbeat in node X's report is taken
    only for a (rank, pid) that X's own report lists, of X's generation, from a member of the
    running generation; no scan of every node's report (`owns`) happens on this path."""
    sup, client, tok = setup
    gen = running_generation(sup, tmp_path)

    def scan(pid):
        raise AssertionError("a relayed heartbeat must not scan every node's report")

    monkeypatch.setattr(gen, "owns", scan)
    assert post(client, tok["b"], node_report("node-b", 1, 4200, [beat(1, "node-b", 4200)])).json().get(
        "heartbeats_refused") is None
    assert gen.rank_pids == {1: 4200}
    # node-a relays node-b's rank with node-b's (known) pid, listing it in its own report as well:
    # node-a is a member, but the daemon's view of node-a must run it -- refused, rank 1 unchanged
    forged = report("node-a", generation=0, state="running", ranks=[{"rank": 0, "pid": 4100, "state": "running"}],
                    heartbeats=[beat(1, "node-a", 4200)])
    r = post(client, tok["a"], forged)
    assert r.json()["heartbeats_refused"] == 1 and "not among the ranks this report lists" in r.json()["heartbeat_refusal"]
    # a heartbeat of another generation than the report's is refused too
    r = post(client, tok["a"], node_report("node-a", 0, 4100, [beat(0, "node-a", 4100, generation=1)]))
    assert r.json()["heartbeats_refused"] == 1 and "generation 1" in r.json()["heartbeat_refusal"]
    assert gen.rank_pids == {1: 4200}
    # an agent that is not a member of the generation cannot vouch for a rank, even one it lists
    tok_c = add_token(sup.settings.server.token_file, "node-c", "agent")  # the store re-reads its file
    r = post(client, tok_c, node_report("node-c", 0, 4300, [beat(0, "node-c", 4300)]))
    assert r.status_code == 200, r.text
    assert r.json()["heartbeats_refused"] == 1 and "agent node-c does not run rank 0" in r.json()["heartbeat_refusal"]
    assert 0 not in gen.rank_pids and _refused_count(sup) == 3


def test_per_rank_heartbeats_are_refused_under_node_agents(setup, tmp_path):
    """One path only: under the agents backend ranks beat to their agent; a direct heartbeat is a 409
    (else a rank of a dead agent could look alive) and feeds nothing."""
    sup, client, tok = setup
    gen = running_generation(sup, tmp_path)
    auth = {"Authorization": f"Bearer {sup.trainer_token}"} if sup.trainer_token else {}
    r = client.post("/v1/heartbeat", json=beat(0, "node-a", 4100), headers=auth)
    assert r.status_code == 409 and "go to its node's agent" in r.text, r.text
    assert gen.rank_pids == {} and "titan_rank_heartbeat_age_seconds{" not in sup.metrics.render().decode()


def test_the_report_route_keeps_its_metrics_label_and_its_fault_answer(setup, monkeypatch):
    """The report is dispatched past FastAPI's router (supervisor/api.py): it is still counted under
    its route, and a journal or disk fault while taking it is still the 503 naming it."""
    sup, client, tok = setup
    assert post(client, tok["a"], report("node-a")).status_code == 200

    def broken(rep):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sup.nodes, "ingest", broken)
    r = post(client, tok["a"], report("node-a"))
    assert r.status_code == 503 and "No space left on device" in r.text, r.text
    assert sup.health.problems()
    text = sup.metrics.render().decode()
    for code in ("200", "503"):
        assert f'titan_http_requests_total{{code="{code}",route="/v1/nodes/report"}} 1.0' in text


def test_node_reports_have_their_own_rate_limit_bucket(tmp_path):
    """2,048 agents at 1 Hz exceed the trainer's 2,000/s: reports are limited as their own class,
    so a flood of them is refused without taking the trainer's heartbeats with it (and back)."""
    f = tmp_path / "tokens.jsonl"
    tok = add_token(f, "node-a", "agent")
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t", "nproc_per_node": 1},
                      server={"port": 0, "token_file": str(f), "rate_limit": {"agent_per_s": 0.05, "burst_s": 60.0}},
                      launch={"backend": "agents"})
    sup = Supervisor(s)
    try:
        client = TestClient(build_app(sup), base_url="http://127.0.0.1")
        # a bucket of 3 (0.05/s x 60 s) that refills one token in 20 s: no timing in the outcome
        codes = [post(client, tok, report("node-a")).status_code for _ in range(8)]
        assert codes == [200] * 3 + [429] * 5, codes
        assert "too many agent requests (limit 0.05/s)" in post(client, tok, report("node-a")).text
        auth = {"Authorization": f"Bearer {sup.trainer_token}"} if sup.trainer_token else {}
        hb = beat(0, "h", 4242, run_id="t")
        assert client.post("/v1/heartbeat", json=hb, headers=auth).status_code != 429  # the trainer's bucket is full
    finally:
        sup.journal.close()


def test_a_report_interval_too_long_for_the_heartbeat_timeout_is_a_config_error(tmp_path):
    """Relayed heartbeats arrive once per report: an interval near the heartbeat timeout would make
    healthy ranks look silent, so it is refused at load (naming both fields)."""
    run = {"workdir": str(tmp_path / "run"), "run_id": "t"}
    with pytest.raises(Exception, match=r"report_interval_s \(3\) must be at most half of detect.stall.heartbeat_timeout"):
        Settings.load(run=run, launch={"backend": "agents", "agents": {"report_interval_s": 3.0}},
                      detect={"stall": {"heartbeat_timeout": 5.0}})
    Settings.load(run=run, launch={"backend": "agents", "agents": {"report_interval_s": 2.5}},
                  detect={"stall": {"heartbeat_timeout": 5.0}})
    Settings.load(run=run, launch={"backend": "local", "agents": {"report_interval_s": 3.0}},
                  detect={"stall": {"heartbeat_timeout": 5.0}})  # no agents: no relay


def test_a_report_too_large_for_the_daemon_is_fitted_and_its_exits_still_arrive(setup):
    """Two rank exits whose 60 log lines were long non-ASCII text made a 1.27 MB report (JSON's
    \\u escapes): refused (413) at every tick with every exit kept pending, until the node counted
    as lost and the crash evidence never arrived (found by an adversarial review). The agent now
    sends UTF-8 and fits a report to its budget: eight such exits and 200,000 characters of stacks
    arrive, each exit with its newest log lines."""
    from supervisor.agent.main import REPORT_BUDGET, encode_report, fit_report

    sup, client, tok = setup
    tail = [f"line {i} " + "ошибка " * 400 for i in range(60)]
    exits = [{"rank": r, "exitcode": 1, "pid": 100 + r, "signal": None, "classification": "crash",
              "log_tail": [x[:2000] for x in tail], "wall_time": time.time()} for r in range(8)]
    body = report(generation=0, state="running", exits=exits, stacks_id="s1", stacks="Ω" * 200_000)
    assert len(encode_report(body)) > 1024 * 1024
    assert post(client, tok["a"], body).status_code == 413  # as the agent sent it before: refused
    fitted = fit_report(body)
    assert len(encode_report(fitted)) <= REPORT_BUDGET
    assert [e["rank"] for e in fitted["exits"]] == list(range(8))
    assert fitted["exits"][0]["log_tail"][-1].startswith("line 59 ")
    assert fitted["stacks"] and body["stacks"].endswith(fitted["stacks"])  # the newest part kept
    r = client.post("/v1/nodes/report", content=encode_report(fitted),
                    headers={"Authorization": f"Bearer {tok['a']}", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert [ex.rank for _, ex in sup.nodes.get("node-a").exits] == list(range(8))
    small = report(generation=0, state="running", exits=exits[:1])
    small["exits"] = [{**exits[0], "log_tail": ["short"]}]
    assert fit_report(small) is small  # what fits is sent as it is


@pytest.mark.parametrize("address", ["evil.example/..;x", "a..b", "[::1]", "host name", "h\nx", "a@b"])
def test_an_address_that_is_no_host_or_ip_is_refused(setup, address):
    """The address of node rank 0 goes into every node's torchrun argv as the rendezvous host: it
    must be a host name or a bare IP address (found by an adversarial review: anything went in)."""
    sup, client, tok = setup
    r = post(client, tok["a"], report(address=address))
    assert r.status_code == 400 and "address" in r.text
    assert sup.nodes.get("node-a") is None


def test_a_rendezvous_port_is_picked_on_an_ipv6_loopback_too():
    """'::1' raised a socket.gaierror from an IPv4 socket, which escaped the launch."""
    from supervisor.launch.agents import LaunchError, _free_port

    assert 0 < _free_port("127.0.0.1") < 65536
    try:
        assert 0 < _free_port("::1") < 65536
    except LaunchError as e:  # a host without IPv6: still the launch's own error, naming the host
        assert "'::1'" in str(e)
    with pytest.raises(LaunchError, match="no-such-host.invalid"):
        _free_port("no-such-host.invalid")


def test_an_agent_refuses_to_start_with_an_address_the_daemon_would_refuse():
    """Else every report of it is a 400 and the node never joins: a config error at start."""
    from supervisor.agent.main import load_agent_config

    base = {"daemon_url": "http://127.0.0.1:1", "run_id": "t"}
    assert load_agent_config(None, {}, {**base, "address": "fd00::1"}).address == "fd00::1"
    with pytest.raises(ValueError, match="no host name or bare IP address"):
        load_agent_config(None, {}, {**base, "address": "[::1]"})


def test_an_agent_file_with_a_quoted_number_is_refused_by_field(tmp_path):
    """In a file a quoted number is a typo (the environment is text and stays lax)."""
    from supervisor.agent.main import load_agent_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndaemon_url = "http://127.0.0.1:1"\nrun_id = "t"\nreport_interval_s = "2"\n'
                   '[agent.launcher]\nexitcode_wait_s = "3"\n')
    with pytest.raises(ValueError) as e:
        load_agent_config(str(cfg), {}, {})
    assert str(e.value) == ("agent.report_interval_s: expected a number, got the string '2' (write it without "
                            "quotes); agent.launcher.exitcode_wait_s: expected a number, got the string '3' "
                            "(write it without quotes)")
    cfg.write_text('[agent]\ndaemon_url = "http://127.0.0.1:1"\nrun_id = "t"\n')
    env = {"TITAN_SUPERVISOR_AGENT__REPORT_INTERVAL_S": "2"}
    assert load_agent_config(str(cfg), env, {}).report_interval_s == 2.0
