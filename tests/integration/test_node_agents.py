"""Drills with two node agents as two nodes on this machine (2 nodes x 1 rank, real torchtitan).

Each agent is a real `titan-supervisor agent` process with its own token, session and process
tree; each node's torchrun joins one c10d rendezvous the daemon hands out. A node is killed by
SIGKILL of its agent and of its ranks' process group (what a dead machine looks like from the
daemon: reports stop). Kernel-log lines are appended to each agent's kernel-log file (this machine
has no GPU and no Xid in its real kernel log; NVML is absent here, so the agents report no GPUs).

CI cost (2 cores, idle): about a minute each; they are the only multi-node drills. Measured on the
loaded 2-core machine (load average ~5-6): the node-kill drill 240 s plus 66 s for its unbroken
2-rank reference run (it was 169 s before it proved the data position and grew back); the xid drill
152-172 s (unchanged by the hardware threshold).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent_harness import cluster
from tests.data_position import LOSS_RTOL, dp_of, samples_by_step, unbroken_run, worst_loss_gap
from tests.trainer_harness import ROOT, spool, trainer_env

pytestmark = [pytest.mark.integration, pytest.mark.drill]
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kmsg-xid.txt"


@pytest.fixture
def nodes(tmp_path):
    made = []

    def make(**kw):
        d, agents = cluster(tmp_path, **kw)
        made.append((d, agents))
        return d, agents

    yield make
    for d, agents in made:
        for a in agents:
            a.cleanup()
        d.cleanup()


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """The reference of the node-kill drill: an unbroken 2-rank run, same seed and config."""
    return unbroken_run(tmp_path_factory.mktemp("unbroken"), steps=60, interval=10)


def _wait_running(d, step: int, nodes: list[str], timeout: float = 600.0) -> dict:
    return d.wait_for(lambda st: st if st.get("step", 0) >= step and st.get("state") == "running"
                      and sorted((st.get("nodes") or {}).get("in_generation") or []) == nodes
                      and len(st.get("trainer_pids") or {}) == len(nodes) else None, timeout,
                      f"step {step} on {nodes}")


def _generations(d) -> list[dict]:
    j = d.journal()
    try:
        return sorted(j.generations(), key=lambda g: g["id"])
    finally:
        j.close()


def _findings_and_actions(d):
    j = d.journal()
    try:
        return sorted(j.findings(limit=1000), key=lambda f: f["id"]), sorted(j.actions(limit=100), key=lambda a: a["id"])
    finally:
        j.close()


def _wait_action(d, kind: str, states: tuple[str, ...], timeout: float = 300.0) -> dict:
    from supervisor.journal import Journal, JournalError

    path = d.workdir / "supervisor" / "journal.sqlite"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            j = Journal.open(path, readonly=True)
        except (JournalError, FileNotFoundError):  # the daemon is still creating it
            time.sleep(0.02)
            continue
        try:
            found = next((a for a in j.actions() if a["kind"] == kind and a["state"] in states), None)
        finally:
            j.close()
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no {kind} action in {states} after {timeout}s\n{d.log_tail()}")


def _heartbeats_came_through_the_agents(d, nodes: list[str]) -> None:
    """Every rank's heartbeats reached the daemon inside its agent's report: the daemon's per-rank
    route took no request at all, and each rank's heartbeat carries its agent's node name (the
    relay stamps it; a rank itself knows only this machine's host name)."""
    text = d.get("/metrics")
    assert 'route="/v1/heartbeat"' not in text, [x for x in text.splitlines() if "/v1/heartbeat" in x]
    ages = [x for x in text.splitlines() if x.startswith("titan_rank_heartbeat_age_seconds{")]
    assert sorted({x.split('node="')[1].split('"')[0] for x in ages}) == sorted(nodes), ages


def _losses(records) -> dict[tuple[int, int], float]:
    """(generation, step) -> loss."""
    return {(r["generation"], r["step"]): r["loss"] for r in records}


def test_dead_rank_then_a_dead_node_then_it_returns_the_run_reshards_grows_back_and_finishes(nodes, unbroken):
    """Dead rank (+ the daemon SIGKILLed mid-restart) -> node-b killed -> the run reshards to node-a
    (DP 1, 2 microbatches) -> node-b's agent restarts -> the run grows back to both nodes at the next
    checkpoint (+ the daemon SIGKILLed mid-grow) -> finishes. Every step trained on the unbroken run's
    samples, with its loss."""
    # rank 0 sleeps 0.15 s per step in generation 0 (the kill lands between two checkpoints), and 0.4 s
    # per step from step 31 in every generation (so the run is still going when node-b returns; a sleep
    # changes no number). The run asks for a global batch of 8 (2 nodes x 1 rank x 4): on one node it
    # accumulates 2 microbatches.
    slow = ",".join(["slow@1:rank=0:seconds=0.15"] + [f"slow@{s}:rank=0:seconds=0.4:gen=*" for s in range(31, 61)])
    d, (a, b) = nodes(steps=60, faults=slow, extra={"training": {"global_batch_size": 8},
                                                    "launch": {"agents": {"grow_settle_s": 1.0}}})
    d.start()
    a.start(), b.start()
    st = _wait_running(d, 15, ["node-a", "node-b"])
    # 1. a dead rank: SIGKILL rank 1 -> restart on both nodes from the newest checkpoint ...
    victim = int(st["trainer_pids"]["1"])
    killed_rank_at = time.time()
    os.kill(victim, signal.SIGKILL)
    # ... and the daemon SIGKILLed while that restart runs: the next daemon finishes it, once
    _wait_action(d, "restart", ("intent", "running"))
    d.kill(signal.SIGKILL)
    time.sleep(1.0)
    d.start()  # same port: the agents' reports reach the new daemon
    _wait_running(d, 32, ["node-a", "node-b"])
    _heartbeats_came_through_the_agents(d, ["node-a", "node-b"])
    gens = _generations(d)
    assert len(gens) == 2 and gens[1]["layout"]["nodes"] == ["node-a", "node-b"]
    # 2. a dead node: node-b's agent and ranks SIGKILLed -> restart on node-a alone (smaller world)
    killed_at = time.time()
    b.kill_node()
    _wait_running(d, 32, ["node-a"])
    # 3. node-b returns (its agent restarts): once live for grow_settle_s, the run grows back onto it at
    # the next checkpoint; the daemon is SIGKILLed mid-grow and the next one finishes it, once
    b.start()
    returning = d.wait_for(lambda st: (st.get("nodes") or {}).get("returning"), 120, "node-b returning")
    assert "node-b" in returning, returning
    _wait_action(d, "grow", ("intent", "running"), timeout=300)
    d.kill(signal.SIGKILL)
    time.sleep(1.0)
    d.start()
    assert d.wait_exit(900) == 0, d.log_tail(60) + "\n--- node-a:\n" + a.log_tail() + "\n--- node-b:\n" + b.log_tail()
    findings, actions = _findings_and_actions(d)
    dead = [f for f in findings if f["kind"] == "dead_rank"]
    assert dead[0]["rank"] == 1 and dead[0]["evidence"]["signal_name"] == "SIGKILL"
    # seen through the node's agent (torchrun's report, then the agent's) before the node would even
    # count as lost
    assert dead[0]["wall_time"] - killed_rank_at <= d.cfg["launch"]["agents"]["lost_after_s"]
    restarts = [x for x in actions if x["kind"] == "restart"]
    assert restarts[0]["params"]["from_step"] >= 15 and restarts[0]["state"] == "done"
    after = [f for f in dead if f["wall_time"] >= killed_at]
    # the first finding after the kill names the node that died (lost: 137), not its peer's collateral crash
    assert after and after[0]["evidence"]["host"] == "node-b" and after[0]["evidence"]["exitcode"] == 137, after
    gens = _generations(d)
    shrunk = next(g for g in gens if g["layout"]["nodes"] == ["node-a"])
    assert gens[-1]["layout"]["nodes"] == ["node-a", "node-b"] and gens[-1]["id"] > shrunk["id"], gens
    assert all(x["state"] == "done" for x in actions if x["kind"] == "restart"), actions
    # the grow-back: one action (resumed by the second daemon, not redone), journaled with its reason
    grows = [x for x in actions if x["kind"] == "grow"]
    assert len(grows) == 1 and grows[0]["state"] == "done", grows
    g = grows[0]
    assert g["actor"] == "policy" and g["params"]["returned"] == ["node-b"] and "node-b returned" in g["params"]["reason"]
    assert g["outcome"]["nodes_to"] == ["node-a", "node-b"] and g["outcome"]["returned"] == ["node-b"], g
    grown_at = gens[-1]["load_step"]
    # at the next checkpoint after node-b was ready: nothing older, and no step lost before it
    assert g["params"]["ready_step"] < g["params"]["checkpoint"] <= grown_at < 60, (g, gens[-1])
    j = d.journal()
    try:
        assert j.unfinished_actions() == []
    finally:
        j.close()
    records, _ = spool(d.workdir)
    assert max(r["step"] for r in records) == 60
    losses = _losses(records)
    # the restart after the dead rank (same world) redoes steps exactly: equal losses step for step
    g1 = gens[1]["load_step"]
    redone = [s for (g, s) in losses if g == 1 and (0, s) in losses and s > g1]
    assert redone, "generation 1 redid no step of generation 0"
    assert all(math.isclose(losses[(0, s)], losses[(1, s)], rel_tol=1e-6) for s in redone), \
        [(s, losses[(0, s)], losses[(1, s)]) for s in redone]
    last_gen = gens[-1]["id"]
    tail = [losses[(last_gen, s)] for s in range(55, 61) if (last_gen, s) in losses]
    assert tail and all(math.isfinite(x) for x in tail) and max(tail) < losses[(0, 1)]
    # nothing was deleted: every checkpoint ever saved is in checkpoint/ or quarantine/
    saved = {p.name for p in (d.workdir / "checkpoint").glob("step-*")}
    assert {"step-10", "step-20", "step-60"} <= saved | {p.name.split(".")[0] for p in
                                                        (d.workdir / "quarantine").glob("step-*")}
    # 4. the data position across the reshard (DP 2 -> 1, global batch kept by accumulation) and the
    # grow-back (DP 1 -> 2): every step trained on exactly the unbroken 2-rank run's samples, and the
    # loss stays within noise of it
    resharded_at = shrunk["load_step"]
    assert dp_of(d.workdir, shrunk["id"]) == {1} and dp_of(d.workdir, last_gen) == {2}
    started = [(e["step"], e["dp_degree"], e["batches_per_step"], e["samples_consumed"])
               for e in spool(d.workdir)[1] if e["kind"] == "started"]
    assert (resharded_at, 1, 2, resharded_at * 8) in started, started
    assert started[-1] == (grown_at, 2, 1, grown_at * 8), started
    want, got = samples_by_step(unbroken), samples_by_step(d.workdir)
    assert sorted(got) == list(range(1, 61)) and all(len(ids) == 8 for ids in got.values())
    assert got == want, [s for s in got if got[s] != want.get(s)]
    worst = worst_loss_gap(unbroken, d.workdir, range(1, 61))
    assert worst <= LOSS_RTOL, f"loss differs from the unbroken run by {worst:.2e} relative"
    print(f"node-kill drill: resharded to 1 node at step {resharded_at}, grew back to 2 at step {grown_at}; "
          f"worst relative loss difference {worst:.2e} over steps 1..60")


def test_spike_hang_and_xid_on_two_nodes_the_bad_node_is_excluded_and_the_run_finishes(nodes):
    d, (a, b) = nodes(steps=70, faults="spike@22:lr=1000:steps=3",
                      extra={"policy": {"exclude_on_hardware": True}})
    d.start()
    a.start(), b.start()
    # 1. an unrecovered loss spike -> hot rollback: a directive to rank 0, applied by both nodes' ranks
    _wait_action(d, "rollback", ("done",))
    st = _wait_running(d, 35, ["node-a", "node-b"])
    assert st["generation"] == 0  # hot: no restart
    # 2. a hang: node-b's rank SIGSTOPped -> named, stacks from every node's agent, killed, restarted
    victim = int(st["trainer_pids"]["1"])
    # which node runs rank 1 is the rendezvous' choice: ask the agents' view
    hung_node = next(n["node"] for n in d.get("/v1/nodes")["nodes"] if "1" in (n.get("ranks") or {}))
    other_node = "node-a" if hung_node == "node-b" else "node-b"
    _heartbeats_came_through_the_agents(d, ["node-a", "node-b"])
    os.kill(victim, signal.SIGSTOP)
    try:
        hang = _wait_action(d, "kill_restart_hang", ("done",))
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # every node's agent answered; the node with the stopped rank comes last (kept by the action's cap)
    stacks = hang["outcome"]["stacks"]
    assert stacks.index(f"=== node {hung_node}") > stacks.index(f"=== node {other_node}") >= 0
    # both ranks' stacks came back through their agents: the blocked peer's (py-spy) and the stopped
    # rank's (py-spy --nonblocking: faulthandler cannot run in a stopped process)
    assert "(stopped, py-spy --nonblocking)" in stacks and "pid %d (stopped" % victim in stacks, stacks[:2000]
    assert stacks.count("(py-spy)") >= 1 and "Thread" in stacks, stacks[:2000]
    _wait_running(d, 45, ["node-a", "node-b"])
    # 3. node-b's kernel log reports an Xid (twice), the GPU fallen off the bus and an ECC error: two
    # hardware findings (each pattern once per node and generation) -> node-b drained, run on node-a
    with open(b.kernel_log, "a") as f:
        f.write(FIXTURE.read_text())
    d.wait_for(lambda st: (st.get("nodes") or {}).get("excluded") == ["node-b"], 300, "node-b excluded")
    out = subprocess.run([sys.executable, "-m", "supervisor.cli", "nodes", "--json", "--url", d.url, "--token",
                          d.token], env=trainer_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in json.loads(out.stdout)["nodes"]}
    assert rows["node-b"]["state"] == "excluded" and rows["node-b"]["excluded"]
    assert d.wait_exit(900) == 0, d.log_tail(60)
    findings, actions = _findings_and_actions(d)
    hangs = [f for f in findings if f["kind"] == "hang"]
    assert hangs and hangs[0]["rank"] == 1
    assert hangs[0]["evidence"]["basis"] == "heartbeat", hangs[0]  # its relayed heartbeats fell silent
    hw = [f for f in findings if f["kind"] == "hardware"]
    assert len(hw) >= 2 and {f["evidence"]["host"] for f in hw} == {"node-b"}
    # repeated findings exclude (policy.exclude_hardware_after = 2): the first is recorded with its count
    j = d.journal()
    try:
        by_finding = {x["finding_id"]: x for x in j.decisions(limit=1000)}
    finally:
        j.close()
    assert by_finding[hw[0]["id"]]["action"] == "record" and "hardware finding 1 on host node-b" in \
        by_finding[hw[0]["id"]]["reason"], by_finding.get(hw[0]["id"])
    assert by_finding[hw[1]["id"]]["action"] == "exclude_node", by_finding.get(hw[1]["id"])
    ex = [x for x in actions if x["kind"] == "exclude_node"]
    assert len(ex) == 1 and ex[0]["state"] == "done" and ex[0]["outcome"]["node"] == "node-b"
    assert ex[0]["outcome"]["excluded"] is True
    gens = _generations(d)
    assert gens[-1]["layout"]["nodes"] == ["node-a"] and len(gens) == 3
    records = spool(d.workdir)[0]
    assert max(r["step"] for r in records) == 70
    j = d.journal()
    try:
        assert j.get_meta("excluded_nodes") == ["node-b"]
    finally:
        j.close()
