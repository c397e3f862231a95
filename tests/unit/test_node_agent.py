"""The node agent's pure parts and the AgentLauncher's rules, without processes.

The launcher is driven through a real `NodeRegistry` by reports as agents post them (built by
the test: what a report says is the protocol, tested here against the launcher's decisions);
the agents' processes, rendezvous and HTTP are exercised by tests/integration/test_node_agents.py.
NVML is absent on this machine (no GPU, no nvidia-ml-py): `gpu_health` says so and the agent
reports no GPUs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from supervisor.agent.health import KernelLog, gpu_health, scan_kernel_lines
from supervisor.agent.ranks import classify
from supervisor.launch.agents import AgentLauncher, LaunchError, node_argv, written_world
from supervisor.launch.local import LaunchSpec
from supervisor.nodes import NodeRegistry
from supervisor.protocol import NodeReport

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# --- health ------------------------------------------------------------------------------------

def test_kernel_log_fixture_yields_the_hardware_lines_only():
    events = scan_kernel_lines(FIXTURES.joinpath("kmsg-xid.txt").read_text().splitlines())
    assert [e["pattern"] for e in events] == ["xid", "fell_off_bus", "xid", "mce"]
    assert events[0]["line"].startswith("NVRM: Xid (PCI:0000:3b:00): 79")  # the /dev/kmsg header is cut


def test_kernel_log_file_is_read_from_its_end_and_each_line_once(tmp_path):
    p = tmp_path / "kmsg.txt"
    p.write_text("NVRM: Xid (PCI:0000:01:00): 79, old boot\n")
    log = KernelLog(str(p))
    assert log.read() == []  # what was there before the agent started is not news
    with open(p, "a") as f:
        f.write("NVRM: Xid (PCI:0000:01:00): 48, new\n")
    assert log.read() == ["NVRM: Xid (PCI:0000:01:00): 48, new"]
    assert log.read() == []
    assert KernelLog(str(tmp_path / "missing")).read() == [] and KernelLog("none").read() == []


def test_nvml_is_absent_here_and_says_so():
    gpus, why = gpu_health()
    assert gpus == [] and why.startswith("NVML")


@pytest.mark.parametrize("code,tail,kind,sig", [
    (0, [], "ok", None),
    (-9, ["..."], "signal", "SIGKILL"),
    (1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], "oom", None),
    (1, ["NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus."], "hardware", None),
    (1, ["ValueError: boom"], "crash", None),
])
def test_rank_exit_classification(code, tail, kind, sig):
    assert classify(code, tail) == (kind, sig)


# --- launch plumbing ------------------------------------------------------------------------------

def spec(tmp_path, generation=0, load_step=None, extra=()):
    return LaunchSpec(generation=generation, nproc=1, preset="tiny", workdir=tmp_path, supervisor_url="http://d",
                      run_id="r", load_step=load_step, extra_args=list(extra), python="py")


def test_node_argv_is_a_multi_node_rendezvous_with_the_layout_flags(tmp_path):
    layout = ["--parallelism.tensor_parallel_degree", "2"]  # what a layout fallback adds (run_plan.layout_flags)
    argv = node_argv(spec(tmp_path, 3, extra=layout), nnodes=2, node_rank=1, endpoint="10.0.0.1:29403", attempt=0,
                     extra=("--checkpoint.exclude_from_loading", "dataloader"))
    assert "--standalone" not in argv
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--rdzv-endpoint") + 1] == "10.0.0.1:29403"
    assert argv[argv.index("--rdzv-conf") + 1] == "is_host=0" and argv[argv.index("--rdzv-id") + 1] == "r-g3-a0"
    assert argv[argv.index("--parallelism.tensor_parallel_degree") + 1] == "2"
    assert argv[-2:] == ["--checkpoint.exclude_from_loading", "dataloader"]


def test_written_world_counts_the_checkpoint_shards(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "dcp" / "step-10", tmp_path / "checkpoint" / "step-10")
    assert written_world(tmp_path, 10) == 2
    assert written_world(tmp_path, 20) is None and written_world(tmp_path, None) is None


# --- the launcher over simulated agents -----------------------------------------------------------

class Agents:
    """Posts reports for named agents into the registry, as running agents would: each obeys its
    order (run -> 'running', stop -> 'stopped') unless told to misbehave."""

    def __init__(self, reg: NodeRegistry, names, *, fail=(), silent=(), addresses=None) -> None:
        self.reg, self.names = reg, list(names)
        self.addresses = addresses or {}
        self.fail, self.silent = set(fail), set(silent)
        self.exits: dict[str, list] = {}
        self.ranks: dict[str, list] = {}
        self.argv: dict[str, list[str]] = {}
        self._stop = threading.Event()
        for n in self.names:
            self.report(n)
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def report(self, name, **kw):
        v = self.reg.get(name)
        order = v.order if v is not None else None
        gen, state = -1, "idle"
        if order is not None and order.generation >= 0:
            self.argv[name] = order.argv
            gen, state = order.generation, ("failed" if name in self.fail else "running")
        elif v is not None and v.report.generation >= 0:
            gen, state = v.report.generation, "stopped"
        body = {"run_id": "r", "agent_id": name, "node": name, "address": self.addresses.get(name, "127.0.0.1"),
                "wall_time": time.time(),
                "generation": gen, "state": state, "exit_code": 1 if state == "failed" else None,
                "exits": self.exits.pop(name, []), "ranks": self.ranks.get(name, []), **kw}
        if order is not None and order.stacks_id:
            body["stacks_id"], body["stacks"] = order.stacks_id, f"Thread 0x1 of {name}\n" + "x" * 20_000 + name
        self.reg.ingest(NodeReport.model_validate(body))

    def _loop(self):
        while not self._stop.wait(0.02):
            for n in self.names:
                if n not in self.silent:
                    self.report(n)

    def close(self):
        self._stop.set()
        self._t.join()


@pytest.fixture
def reg():
    return NodeRegistry(NodeRegistry.Config(lost_after_s=0.5, report_interval_s=0.02))


def launcher(reg, **kw):
    cfg = AgentLauncher.Config(nodes=("n1", "n2"), register_timeout_s=2.0, rejoin_wait_s=0.1, confirm_timeout_s=2.0,
                               stop_wait_s=1.0, lost_after_s=0.5, report_interval_s=0.02, poll_s=0.01, **kw)
    return AgentLauncher(reg, cfg, stop_grace_s=0.0)


def test_a_generation_starts_on_every_node_with_one_rendezvous(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"])
    try:
        gen = launcher(reg).start(spec(tmp_path))
        assert gen.nodes == ("n1", "n2") and gen.world_size == 2
        eps = {a: argv[argv.index("--rdzv-endpoint") + 1] for a, argv in agents.argv.items()}
        assert len(set(eps.values())) == 1
        assert [agents.argv[a][agents.argv[a].index("--rdzv-conf") + 1] for a in ("n1", "n2")] == ["is_host=1",
                                                                                                  "is_host=0"]
    finally:
        agents.close()


def test_a_node_that_fails_to_start_fails_the_start_and_every_node_is_stopped(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"], fail={"n2"})
    try:
        with pytest.raises(LaunchError, match="failed to start on node n2"):
            launcher(reg).start(spec(tmp_path))
        assert reg.get("n1").order.generation == -1 and reg.get("n2").order.generation == -1
    finally:
        agents.close()


def test_a_node_lost_while_starting_is_left_out_and_the_rest_start(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"], silent={"n2"}, fail=())
    try:
        gen = launcher(reg).start(spec(tmp_path))
        assert gen.nodes == ("n1",) and gen.world_size == 1
        argv = agents.argv["n1"]
        assert argv[argv.index("--nnodes") + 1] == "1"
    finally:
        agents.close()


def test_a_fault_on_one_node_stops_the_others_and_only_it_is_reported(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"])
    try:
        gen = launcher(reg).start(spec(tmp_path))
        agents.exits["n2"] = [{"rank": 1, "exitcode": -9, "wall_time": time.time(), "log_tail": ["killed"]}]
        deadline = time.time() + 2
        out = []
        while time.time() < deadline and not out:
            out = gen.poll()
            time.sleep(0.02)
        assert [(e.rank, e.exitcode, e.host) for e in out] == [(1, -9, "n2")]
        assert reg.get("n1").order.generation == -1  # the healthy node was told to stop at once
        agents.exits["n1"] = [{"rank": 0, "exitcode": -15, "wall_time": time.time()}]  # our doing: no finding
        time.sleep(0.1)
        assert gen.poll() == []
    finally:
        agents.close()


def test_a_lost_node_is_a_dead_node_and_its_peer_crash_comes_second(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"])
    try:
        gen = launcher(reg).start(spec(tmp_path))
        agents.silent.add("n2")  # the node dies: reports stop
        agents.exits["n1"] = [{"rank": 0, "exitcode": 1, "wall_time": time.time(),
                               "log_tail": ["RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer"]}]
        found = []
        deadline = time.time() + 3
        while time.time() < deadline and len(found) < 2:
            found += gen.poll()
            time.sleep(0.02)
        assert [(e.host, e.exitcode) for e in found] == [("n2", 137), ("n1", 1)]
        assert "node lost" in found[0].log_tail[0]
    finally:
        agents.close()


def test_an_excluded_node_runs_nothing_and_the_next_start_goes_without_it(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"])
    try:
        la = launcher(reg)
        la.start(spec(tmp_path))
        assert la.exclude_node("n2") == {"node": "n2", "drained": True, "already_excluded": False}
        with pytest.raises(LookupError):
            la.exclude_node("n9")
        gen = la.start(spec(tmp_path, generation=1))
        assert gen.nodes == ("n1",)
        assert reg.ingest(NodeReport.model_validate({
            "run_id": "r", "agent_id": "n2", "node": "n2", "wall_time": time.time()})).order.generation == -1
    finally:
        agents.close()


def test_stacks_come_from_every_node_capped_with_the_stopped_rank_last(tmp_path, reg):
    agents = Agents(reg, ["n1", "n2"])
    try:
        gen = launcher(reg, stack_dump_chars_per_node=100).start(spec(tmp_path))
        agents.ranks["n1"] = [{"rank": 0, "pid": 11, "state": "stopped"}]  # SIGSTOPped, as /proc says
        agents.ranks["n2"] = [{"rank": 1, "pid": 12, "state": "sleeping"}]
        time.sleep(0.1)
        text = gen.dump_stacks()
        assert text.index("=== node n2") < text.index("=== node n1")  # the stopped one last
        assert text.endswith("x" * 98 + "n1") and len(text) < 400  # each node's end, capped
    finally:
        agents.close()


def test_too_few_nodes_refuse_the_start(tmp_path, reg):
    agents = Agents(reg, ["n1"])
    try:
        with pytest.raises(LaunchError, match="min_nodes"):
            launcher(reg, min_nodes=2).start(spec(tmp_path))
    finally:
        agents.close()


def test_a_loopback_rendezvous_is_refused_when_a_node_is_on_another_machine(tmp_path, reg):
    """Node rank 0's agent reports 127.0.0.1 (its --address left to a loopback name), node 2 is at
    10.0.0.2: its torchrun would wait on its own loopback. The start says so; nothing is ordered."""
    agents = Agents(reg, ["n1", "n2"], addresses={"n2": "10.0.0.2"})
    try:
        with pytest.raises(LaunchError, match=r"127\.0\.0\.1 .*loopback.*n2 \(10\.0\.0\.2\)"):
            launcher(reg).start(spec(tmp_path))
        assert agents.argv == {}
    finally:
        agents.close()


def test_a_restarted_daemon_adopts_what_the_agents_report_running(tmp_path, reg):
    la = launcher(reg)
    gen = la.adopt(spec(tmp_path, generation=4), 0, {})
    assert gen.alive() and gen.poll() == []  # no report yet: still adopting
    reg.ingest(NodeReport.model_validate({"run_id": "r", "agent_id": "n1", "node": "n1", "wall_time": time.time(),
                                          "generation": 4, "state": "running", "node_rank": 0, "nnodes": 1,
                                          "ranks": [{"rank": 0, "pid": 777}]}))
    assert gen.poll() == [] and gen.nodes == ("n1",) and gen.owns(777) and not gen.owns(778)


def test_layout_fallback_reaches_every_node_through_the_agent_launcher(tmp_path):
    """Repeated OOM -> the next preflight-valid layout: a real Supervisor (journal, preflight,
    Remedies, Generations, AgentLauncher, NodeRegistry) restarts through two simulated agents, and
    both nodes' torchrun commands carry layout B's flags; the journal's generation row names it."""
    import asyncio

    from supervisor.actions import ActiveAction
    from supervisor.daemon import Supervisor
    from supervisor.policy import RESTART, Decision
    from supervisor.settings import Settings

    layouts = [{"dp": 2, "micro_batch": 4, "activation_checkpointing": "none", "name": "fast"},
               {"dp": 1, "tp": 2, "micro_batch": 4, "activation_checkpointing": "none", "name": "safer"}]
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "r", "preset": "tiny", "nproc_per_node": 1},
                      server={"port": 0}, preflight={"layouts": layouts, "device_memory_gib": 16},
                      launch={"backend": "agents", "stop_grace_s": 0.0, "agents": {
                          "nodes": ["n1", "n2"], "register_timeout_s": 2.0, "confirm_timeout_s": 2.0,
                          "lost_after_s": 0.5, "report_interval_s": 0.02, "poll_s": 0.01, "stop_wait_s": 1.0}})
    sup = Supervisor(s)
    sup.url = "http://127.0.0.1:1"
    agents = Agents(sup.nodes, ["n1", "n2"])
    try:
        decision = Decision(RESTART, "OOM 2 within 1h: restarting on the next safer layout", 3, next_layout=True)
        params = {k: v for k, v in decision.to_dict().items() if k != "reason"}
        out = asyncio.run(sup.remedies.carry_out(ActiveAction(1, RESTART, params, None, decision)))
        assert out["layout"].startswith("layouts[1] safer"), out
        for node in ("n1", "n2"):
            argv = agents.argv[node]
            assert argv[argv.index("--parallelism.tensor_parallel_degree") + 1] == "2"
            assert argv[argv.index("--nnodes") + 1] == "2"
        row = sup.journal.last_generation()
        assert row["layout"]["label"].startswith("layouts[1] safer") and row["layout"]["nodes"] == ["n1", "n2"]
    finally:
        agents.close()
        sup.journal.close()


def test_a_start_without_enough_nodes_fails_the_run_and_pages(tmp_path):
    """No agent reports within register_timeout_s: the initial start fails with a page naming why
    (state failed), instead of the daemon crashing or waiting forever."""
    import asyncio

    from supervisor.daemon import Supervisor
    from supervisor.settings import Settings

    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "r", "nproc_per_node": 1},
                      server={"port": 0}, preflight={"enabled": False},
                      launch={"backend": "agents", "agents": {"nodes": ["n1", "n2"], "min_nodes": 2,
                                                              "register_timeout_s": 0.2, "poll_s": 0.01}})
    sup = Supervisor(s)
    try:
        asyncio.run(sup.launch(None, reason="initial start"))
        assert sup.state == "failed" and sup.gen is None
        page = sup.journal.get_meta("last_page")
        assert "generation 0 could not start" in str(page) and "min_nodes" in str(page)
    finally:
        sup.journal.close()
