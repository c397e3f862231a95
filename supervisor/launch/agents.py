"""Start, watch and stop generations through node agents (the `Launcher` protocol of `base.py`).

One `titan-supervisor agent` per node (`supervisor/agent/`) reports to the daemon's
`NodeRegistry` and runs what its `NodeOrder` says. A generation here is one multi-node torchrun
job: every chosen node runs ``torchrun --nnodes N --node-rank r`` against one c10d rendezvous
endpoint that is fresh per generation (and per attempt), hosted by node rank 0.

All or nothing: `start` sets every chosen node's order, then waits until every agent reports the
generation running. If one fails to start, all are stopped and the start fails; if one is *lost*
meanwhile (no report for `lost_after_s`), the others are stopped and the start is retried on the
rest (as long as `min_nodes` remain). Once running, a fault on any node (a rank exit other than
0, or the node lost) orders every other node to stop at once, so no rank is left blocked in a
collective; only the faulty node's exits become findings (the others' are our doing).

Smaller world: a start uses the live, non-excluded nodes, so after a node is lost or excluded
the run restarts on the rest. When the checkpoint to load was written by a different world size
(counted from its ``__<rank>_0.distcp`` shards), `reshard_args` are added to the trainer's flags
(today torchtitan's ``--checkpoint.exclude_from_loading dataloader``; the exact-data-position
reshard replaces them).

Failure model: agents outlive the daemon. A restarted daemon `adopt`s the journal's generation
without waiting (the HTTP server must keep taking reports): the generation is whatever nodes
report running it; if none does within `lost_after_s`, it is lost (a dead-rank finding, and the
policy restarts). Pids never cross from a request to a signal here: agents signal their own
process trees; `owns` only checks a heartbeat's pid against what the agents report, and
`vouches` a relayed heartbeat against its own node's report.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from supervisor.config_types import NonNegativeInt, PositiveInt, Seconds, SecondsOrZero, Strings, doc
from supervisor.grow import GrowBack
from supervisor.hosts import is_loopback
from supervisor.launch.local import LaunchSpec, RankExit
from supervisor.nodes import NodeRegistry, NodeView
from supervisor.protocol import NodeOrder

KILLED = 137
# A rank that died because a peer on another node vanished (gloo's view of a lost node): its
# exit is held until the lost node is known, so the finding names the node that died.
PEER_LOSS = re.compile(r"Connection (reset|closed) by peer|Broken pipe|recvBytes|connectFullMesh|"
                       r"Socket Timeout|rendezvous.*(closed|timed out)", re.IGNORECASE)


class LaunchError(RuntimeError):
    """A generation could not be started on every chosen node (all were stopped)."""


@dataclass
class AgentsConfig:
    """Generations on node agents (settings: ``[launch.agents]``; ``launch.backend = "agents"``)."""

    nodes: Annotated[Strings, doc(
        "the nodes expected to run the job (their agents' node names); empty: whichever agents report")] = ()
    min_nodes: Annotated[PositiveInt, doc(
        "fewest nodes a generation may run on (a loss below this fails the start and pages)")] = 1
    register_timeout_s: Annotated[Seconds, doc(
        "the first start waits this long for every expected node's agent to report")] = 120.0
    rejoin_wait_s: Annotated[Seconds, doc(
        "a later start waits this long for an expected node that is not live, then goes without it")] = 5.0
    confirm_timeout_s: Annotated[Seconds, doc(
        "every agent must report the generation running within this, or the start fails")] = 60.0
    stop_wait_s: Annotated[Seconds, doc("after the stop grace, wait at most this for every node to stop")] = 30.0
    stack_dump_timeout_s: Annotated[Seconds, doc("wait at most this for every node's stack dump")] = 30.0
    stack_dump_chars_per_node: Annotated[PositiveInt, doc(
        "characters kept of each node's dump (the end); nodes with a stopped rank come last, so they "
        "survive the action's own cap (launch.stack_dump_chars)")] = 8000
    lost_after_s: Annotated[Seconds, doc(
        "a node with no report for this long is lost: a dead node")] = 10.0
    report_interval_s: Annotated[Seconds, doc("how often agents report (told to them in every reply)")] = 1.0
    max_exits_per_node: Annotated[PositiveInt, doc("rank exits queued per node until polled")] = 256
    rdzv_host: Annotated[str, doc(
        "rendezvous host; empty: the address node rank 0's agent reports")] = ""
    rdzv_port_base: Annotated[PositiveInt, doc(
        "rendezvous ports are rdzv_port_base + (generation, attempt) modulo rdzv_port_span; on a loopback "
        "host a free port is picked instead")] = 29400
    rdzv_port_span: Annotated[PositiveInt, doc("how many ports the rendezvous cycles through")] = 500
    reshard_args: Annotated[Strings, doc(
        "trainer flags added when the checkpoint to load was written by another world size (the data position "
        "is global and in the trainer's own state: only torchtitan's per-rank loader state, empty, is skipped)")] = (
        "--checkpoint.exclude_from_loading", "dataloader")
    poll_s: Annotated[Seconds, doc("how often start/stop check the agents' reports")] = 0.05
    grow_back: Annotated[bool, doc(
        "a lost node whose agent returns (not one excluded by the policy or an operator) rejoins the run at "
        "the next checkpoint: the generation stops and the next starts on every desired node from it "
        "(supervisor/grow.py)")] = True
    grow_settle_s: Annotated[SecondsOrZero, doc(
        "a returned node's agent must have been live this long before the grow-back is planned")] = 30.0
    grow_max_per_node: Annotated[NonNegativeInt, doc(
        "grow-backs onto one node within grow_window_s; past it the node stays out until the window passes "
        "(a node that keeps coming back and dying must not flap the run)")] = 3
    grow_window_s: Annotated[Seconds, doc("the window grow_max_per_node counts over")] = 3600.0

    def registry_config(self) -> NodeRegistry.Config:
        return NodeRegistry.Config(lost_after_s=self.lost_after_s, report_interval_s=self.report_interval_s,
                                   max_exits_per_node=self.max_exits_per_node)

    def grow_config(self) -> GrowBack.Config:
        return GrowBack.Config(enabled=self.grow_back, settle_s=self.grow_settle_s,
                               max_per_node=self.grow_max_per_node, window_s=self.grow_window_s)


def written_world(workdir: Path, step: int | None) -> int | None:
    """How many ranks wrote checkpoint ``step`` (its ``__<rank>_0.distcp`` shards), None if unknown."""
    if step is None:
        return None
    folder = Path(workdir) / "checkpoint" / f"step-{step}"
    n = len(list(folder.glob("__*_0.distcp")))
    return n or None


def node_argv(spec: LaunchSpec, *, nnodes: int, node_rank: int, endpoint: str, attempt: int,
              extra: tuple[str, ...] = ()) -> list[str]:
    """The trainer command of one node: `LaunchSpec.command` with a multi-node rendezvous."""
    cmd = spec.command()
    i = cmd.index("--standalone")
    rdzv = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", f"{spec.run_id}-g{spec.generation}-a{attempt}",
            "--rdzv-conf", f"is_host={1 if node_rank == 0 else 0}"]
    return cmd[:i] + rdzv + cmd[i + 1:] + list(extra)


def _free_port(host: str) -> int:
    """A free port on ``host`` (IPv4 or IPv6: "::1" failed in an IPv4 socket with a gaierror that
    escaped the launch); a host that cannot be bound is a LaunchError naming it."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(addr)
            return s.getsockname()[1]
    except OSError as e:
        raise LaunchError(f"cannot pick a rendezvous port on {host!r}: {e}") from None


@dataclass
class _Member:
    agent_id: str
    node: str
    node_rank: int


class AgentGeneration:
    """One generation across node agents, as the daemon sees it (`RunningGeneration`)."""

    def __init__(self, launcher: "AgentLauncher", spec: LaunchSpec, members: list[_Member], *,
                 adopted: bool = False) -> None:
        self._launcher, self.spec = launcher, spec
        self._reg = launcher.registry
        self.members = members
        self.pid = 0  # no local process: the journal's torchrun_pid is 0 and adoption goes by reports
        self.rank_pids: dict[int, int] = {}
        self.exited: int | None = None
        self.stopping = False
        self.exit_expected = False
        self.started_at = time.time()
        self._adopted_at = time.monotonic() if adopted else None
        self._lost: set[str] = set()
        self._done: dict[str, int] = {}  # agent -> torchrun exit code
        self._faulty: set[str] = set()
        self._fault_stop = False
        self._held: list[tuple[float, str, RankExit]] = []  # (since, agent, exit): a peer's loss suspected
        self._dumps = 0
        self._member_ids: tuple[list | None, frozenset] = (None, frozenset())  # (members, their agent ids)

    @property
    def generation(self) -> int:
        return self.spec.generation

    @property
    def command(self) -> str:
        """Node rank 0's torchrun command (what the journal's log line shows)."""
        v = self._reg.get(self.members[0].agent_id) if self.members else None
        return " ".join(v.order.argv) if v is not None and v.order is not None and v.order.argv else ""

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(m.node for m in self.members)

    @property
    def world_size(self) -> int:
        nodes = len(self.members) or len(self._launcher.config.nodes) or 1  # adopting: the expected nodes
        return nodes * self.spec.nproc

    def note_rank_pid(self, rank: int, pid: int) -> None:
        self.rank_pids.setdefault(rank, pid)

    def owns(self, pid: int) -> bool:
        """``pid`` is a rank of this generation by its agent's own report (the agent read it from /proc)."""
        for m in self.members:
            v = self._reg.get(m.agent_id)
            if v is not None and v.report.generation == self.generation and any(r.pid == pid for r in v.report.ranks):
                return True
        return False

    def vouches(self, agent_id: str, rank: int, pid: int) -> bool:
        """``agent_id`` is a member of this generation and its latest report lists ``rank`` as ``pid``
        (O(ranks of that node): the check for heartbeats relayed in a node's report)."""
        if not self.members:
            self._adopting()  # adopted: the members are whoever reports the generation
        if self._member_ids[0] is not self.members:  # the member list was (re)assigned
            self._member_ids = (self.members, frozenset(m.agent_id for m in self.members))
        if agent_id not in self._member_ids[1]:
            return False
        v = self._reg.get(agent_id)
        return (v is not None and v.report.generation == self.generation
                and any(r.rank == rank and r.pid == pid for r in v.report.ranks))

    def alive(self) -> bool:
        if self.exited is not None:
            return False
        return self._adopting() or len(self._done) + len(self._lost) < len(self.members)

    def _adopting(self) -> bool:
        """Adopted and no agent has reported the generation yet (still within `lost_after_s`)."""
        if self._adopted_at is None:
            return False
        running = self._reg.reporting(self.generation)
        if running:
            if not self.members:
                self.members = [_Member(v.agent_id, v.node, v.report.node_rank or 0) for v in running]
            self._adopted_at = None
            return False
        return time.monotonic() - self._adopted_at <= self._launcher.config.lost_after_s

    def poll(self) -> list[RankExit]:
        """New rank exits: each node's reported exits and each node lost (each reported once)."""
        if self._adopting() or self.exited is not None:
            return []
        out: list[RankExit] = []
        now = time.time()
        if not self.members:  # adopted, and no agent runs it any more
            self.exited = KILLED
            return [RankExit(None, KILLED, None, [f"no node agent reports generation {self.generation} "
                                                  "after the daemon restarted: lost"], now)]
        for m in self.members:
            v = self._reg.get(m.agent_id)
            for ex in self._reg.take_exits(m.agent_id, self.generation):
                if self._fault_stop and m.agent_id not in self._faulty:
                    continue  # stopped by us because another node faulted: not a finding
                rex = RankExit(ex.rank, ex.exitcode, ex.pid, list(ex.log_tail), ex.wall_time, host=m.node,
                               oom_killed=ex.classification == "oom")
                if ex.exitcode != 0 and len(self.members) > 1 and PEER_LOSS.search("\n".join(ex.log_tail[-30:])):
                    self._held.append((time.monotonic(), m.agent_id, rex))
                    continue
                if ex.exitcode != 0:
                    self._faulty.add(m.agent_id)
                out.append(rex)
            if m.agent_id in self._lost or m.agent_id in self._done:
                continue
            if v is None or self._reg.lost(v):
                self._lost.add(m.agent_id)
                if not self._fault_stop and not self.stopping:
                    self._faulty.add(m.agent_id)
                    age = "never" if v is None else f"{time.monotonic() - v.last_seen:.1f}s ago"
                    out.append(RankExit(self._first_rank(m, v), KILLED, None, [
                        f"node lost: agent {m.agent_id} on node {m.node} last reported {age} "
                        f"(lost after {self._launcher.config.lost_after_s:g}s without a report)"], now, host=m.node))
            elif v.report.generation != self.generation or v.report.state in ("exited", "failed", "stopped"):
                self._done[m.agent_id] = v.report.exit_code if v.report.exit_code is not None else (
                    0 if v.report.state == "exited" else KILLED)
        out += self._release_held()
        if self._faulty and not self._fault_stop and not self.stopping:
            self._fault_stop = True  # a fault on one node stops all of them
            for m in self.members:
                if m.agent_id not in self._faulty:
                    self._reg.set_order(m.agent_id, NodeOrder(generation=-1, stop_grace_s=self._launcher.stop_grace_s))
        if len(self._done) + len(self._lost) >= len(self.members):
            out += [rex for _, _, rex in self._held]  # nothing is left to wait for
            self._faulty |= {agent for _, agent, _ in self._held}
            self._held = []
            codes = [self._done[a] for a in sorted(self._done) if a in self._faulty or not self._fault_stop]
            self.exited = next((c for c in codes if c != 0), KILLED if self._lost else 0)
        return out

    def _release_held(self) -> list[RankExit]:
        """Held peer-loss exits: after a node was found lost (they come second), or once a node
        would have been found lost by now (then they are the fault)."""
        wait = self._launcher.config.lost_after_s + 2 * self._launcher.config.report_interval_s
        now = time.monotonic()
        keep, out = [], []
        for since, agent, rex in self._held:
            if self._lost or now - since > wait:
                if not self._lost:
                    self._faulty.add(agent)
                out.append(rex)
            else:
                keep.append((since, agent, rex))
        self._held = keep
        return out

    def _first_rank(self, m: _Member, v: NodeView | None) -> int:
        if v is not None and v.report.ranks:
            return min(r.rank for r in v.report.ranks)
        return m.node_rank * self.spec.nproc

    def stop(self, grace_s: float) -> None:
        """Order every node to stop (SIGTERM, SIGKILL after ``grace_s``) and wait until each has, or is lost."""
        for m in self.members:
            self._reg.set_order(m.agent_id, NodeOrder(generation=-1, stop_grace_s=grace_s))
        deadline = time.monotonic() + grace_s + self._launcher.config.stop_wait_s
        while time.monotonic() < deadline:
            if all(self._stopped(m) for m in self.members):
                break
            time.sleep(self._launcher.config.poll_s)

    def _stopped(self, m: _Member) -> bool:
        v = self._reg.get(m.agent_id)
        return (v is None or self._reg.lost(v) or v.report.generation != self.generation
                or v.report.state != "running")

    def dump_stacks(self) -> str:
        """Ask every node's agent for its ranks' stacks (py-spy or faulthandler) and wait for them."""
        self._dumps += 1
        sid = f"g{self.generation}-d{self._dumps}"
        for m in self.members:
            v = self._reg.get(m.agent_id)
            if v is not None and v.order is not None:
                self._reg.set_order(m.agent_id, v.order.model_copy(update={"stacks_id": sid}))
        deadline = time.monotonic() + self._launcher.config.stack_dump_timeout_s
        got: dict[str, str] = {}
        while time.monotonic() < deadline and len(got) < len(self.members):
            for m in self.members:
                s = self._reg.stacks(m.agent_id, sid)
                if s is not None:
                    got[m.agent_id] = s
                elif self._reg.get(m.agent_id) is None or self._reg.lost(self._reg.get(m.agent_id)):
                    got[m.agent_id] = "(node lost: no stacks)"
            time.sleep(self._launcher.config.poll_s)
        cap = self._launcher.config.stack_dump_chars_per_node

        def stopped_rank(m: _Member) -> bool:
            v = self._reg.get(m.agent_id)
            return v is not None and any(r.state == "stopped" for r in v.report.ranks)

        return "\n".join(f"=== node {m.node} (agent {m.agent_id}) ===\n"
                         + got.get(m.agent_id, f"(no dump within {self._launcher.config.stack_dump_timeout_s:g}s)")[-cap:]
                         for m in sorted(self.members, key=stopped_rank))


class AgentLauncher:
    """The daemon's launcher over node agents."""

    Config = AgentsConfig

    def __init__(self, registry: NodeRegistry, config: AgentsConfig | None = None, *,
                 stop_grace_s: float = 10.0) -> None:
        self.registry = registry
        self.config = config or AgentsConfig()
        self.stop_grace_s = stop_grace_s
        self._started_once = False

    # -- choosing nodes ---------------------------------------------------------------------------
    def _choose(self) -> list[NodeView]:
        """Wait for the expected nodes (long on the first start, briefly later); the live ones."""
        c = self.config
        wait = c.rejoin_wait_s if self._started_once else c.register_timeout_s
        deadline = time.monotonic() + wait
        seen, settled_at = 0, time.monotonic()
        while True:
            live = self.registry.live()
            names = {v.node for v in live}
            if len(live) != seen:
                seen, settled_at = len(live), time.monotonic()
            expected = [n for n in c.nodes if n not in self.registry.excluded]
            if expected and set(expected) <= names:
                break
            # no expected list: whoever reports, once no new node has appeared for rejoin_wait_s
            if not c.nodes and len(live) >= c.min_nodes and time.monotonic() - settled_at >= c.rejoin_wait_s:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(c.poll_s)
        if c.nodes:
            live = [v for v in live if v.node in set(c.nodes)]
        if len(live) < c.min_nodes:
            raise LaunchError(f"{len(live)} live node(s) {[v.node for v in live]} after {wait:g}s; the run needs "
                              f"{c.min_nodes} (launch.agents.min_nodes); excluded: {sorted(self.registry.excluded)}")
        return sorted(live, key=lambda v: v.node)

    def _endpoint(self, head: NodeView, generation: int, attempt: int, members: list[NodeView]) -> str:
        host = self.config.rdzv_host or head.address or head.node
        if is_loopback(host):
            # two agents on one machine (the drills) share a loopback rendezvous; a node on another
            # machine would time out against its own loopback, once per restart, with no word why
            far = sorted(f"{v.node} ({v.address})" for v in members if v.address and not is_loopback(v.address))
            if far:
                why = "launch.agents.rdzv_host" if self.config.rdzv_host else f"node {head.node}'s agent address"
                raise LaunchError(f"the rendezvous host {host} ({why}) is a loopback address, which "
                                  f"{', '.join(far)} on other machines cannot reach: give the agent of "
                                  f"{head.node} --address <a name or IP the other nodes reach>")
            port = _free_port(host if host != "localhost" else "127.0.0.1")
        else:
            port = self.config.rdzv_port_base + (generation * 8 + attempt) % self.config.rdzv_port_span
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- the Launcher protocol --------------------------------------------------------------------
    def start(self, spec: LaunchSpec) -> AgentGeneration:
        chosen = self._choose()
        self._started_once = True
        for attempt in range(len(chosen)):
            members = [_Member(v.agent_id, v.node, r) for r, v in enumerate(chosen)]
            endpoint = self._endpoint(chosen[0], spec.generation, attempt, chosen)
            world = len(members) * spec.nproc
            extra = tuple(self.config.reshard_args) if written_world(spec.workdir, spec.load_step) not in (None, world) else ()
            for m in members:
                self.registry.set_order(m.agent_id, NodeOrder(
                    generation=spec.generation, node_rank=m.node_rank, nnodes=len(members),
                    stop_grace_s=self.stop_grace_s, env=dict(spec.env),
                    argv=node_argv(spec, nnodes=len(members), node_rank=m.node_rank, endpoint=endpoint,
                                   attempt=attempt, extra=extra)))
            gen = AgentGeneration(self, spec, members)
            lost = self._confirm(gen)
            if not lost:
                return gen
            gen.stop(0.0)
            chosen = [v for v in chosen if v.agent_id not in lost]
            if len(chosen) < self.config.min_nodes:
                break
        raise LaunchError(f"generation {spec.generation}: nodes were lost while starting; "
                          f"{len(chosen)} left, the run needs {self.config.min_nodes}")

    def _confirm(self, gen: AgentGeneration) -> set[str]:
        """Wait until every member runs the generation; the agents lost meanwhile (empty: all run).
        A member that fails to start fails the whole start (every node stopped)."""
        deadline = time.monotonic() + self.config.confirm_timeout_s
        while True:
            pending, lost = [], set()
            for m in gen.members:
                v = self.registry.get(m.agent_id)
                if v is None or self.registry.lost(v):
                    lost.add(m.agent_id)
                elif v.report.generation == gen.generation and v.report.state in ("failed", "exited"):
                    gen.stop(0.0)
                    tail = " | ".join((v.report.exits[-1].log_tail if v.report.exits else [])[-3:])
                    raise LaunchError(f"generation {gen.generation} failed to start on node {m.node} "
                                      f"(exit {v.report.exit_code}): {tail}")
                elif not (v.report.generation == gen.generation and v.report.state == "running"):
                    pending.append(m.node)
            if lost:
                return lost
            if not pending:
                return set()
            if time.monotonic() >= deadline:
                gen.stop(0.0)
                raise LaunchError(f"generation {gen.generation}: node(s) {pending} did not confirm within "
                                  f"{self.config.confirm_timeout_s:g}s; every node was stopped")
            time.sleep(self.config.poll_s)

    def adopt(self, spec: LaunchSpec, pid: int, rank_pids: dict[int, int]) -> AgentGeneration:
        """The journal's running generation: whichever agents report it (they report within
        `lost_after_s` of the daemon's start; until then it counts as running)."""
        running = self.registry.reporting(spec.generation)
        members = [_Member(v.agent_id, v.node, v.report.node_rank or 0) for v in running]
        gen = AgentGeneration(self, spec, members, adopted=not members)
        for r, p in rank_pids.items():
            gen.note_rank_pid(int(r), int(p))
        self._started_once = True
        return gen

    def exclude_node(self, node: str) -> dict:
        """Drain ``node``: its agent runs nothing from now on (the next generation goes without it)."""
        if not self.registry.known(node) and node not in set(self.config.nodes):
            raise LookupError(f"node {node!r} has no agent (known: {sorted(r['node'] for r in self.registry.view())})")
        new = self.registry.exclude(node)
        return {"node": node, "drained": True, "already_excluded": not new}
