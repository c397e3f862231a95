"""The daemon's view of its node agents: who reported when, what each runs, what it is told.

One `NodeRegistry` per daemon. The ingest route (`supervisor/node_api.py`) hands it each
`NodeReport` and answers with the node's `NodeOrder`; the `AgentLauncher`
(`supervisor/launch/agents.py`) sets orders and reads the reports back; `titan-supervisor nodes`
reads `view()`. It decides nothing: which node runs what is the launcher's business, when to
exclude one is the policy's.

Hot path (issue 13, 2,048 agents x 8 ranks at 1 Hz): `ingest` updates one dict entry under a
lock and returns the order already built for the node. No journal write, no fsync, no
allocation proportional to the cluster: a report costs O(ranks of that node) (the node-claim
check included: an index from node to its agents, not a scan of every agent). Rank exits are
queued per node, bounded (`Config.max_exits_per_node`; the oldest are dropped and counted), and
taken by the launcher's poll; kernel-log events go to a callback (rare by nature).

Failure model:
- A node that stops reporting is *lost* after `Config.lost_after_s` (a dead machine, a dead agent
  or a cut network look the same from here). The launcher turns that into a dead node.
- A daemon restart forgets every order: agents keep running what they run (no order = no
  change) and report it, which is how the launcher re-adopts a generation.
- Exclusions are durable: they live in the journal's `excluded_nodes` meta (the same key
  `Remedies.exclude_node` writes), re-read at start.
- Thread safety: the launcher calls in from `asyncio.to_thread`; every method takes the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Callable

from supervisor.config_types import PositiveInt, Seconds, doc
from supervisor.protocol import KernelEvent, NodeOrder, NodeReply, NodeReport, NodeRankExit

EXCLUDED_META = "excluded_nodes"


@dataclass
class NodeView:
    """The latest report of one agent, plus what the daemon wants from it."""

    agent_id: str
    node: str
    address: str
    first_seen: float
    last_seen: float  # monotonic
    last_wall: float  # the daemon's wall clock at the last report
    report: NodeReport
    order: NodeOrder | None = None
    exits: deque = field(default_factory=deque)  # (generation, NodeRankExit) not yet taken
    exits_dropped: int = 0
    stacks: dict[str, str] = field(default_factory=dict)  # stacks_id -> dump
    live_since: float = 0.0  # the daemon's wall clock when this agent last became live (grow-back settles on it)


class NodeRegistry:
    @dataclass
    class Config:
        """How agents are heard (settings: ``[launch.agents]`` shares these)."""

        lost_after_s: Annotated[Seconds, doc(
            "a node with no report for this long is lost (a dead node for the launcher)")] = 10.0
        report_interval_s: Annotated[Seconds, doc("how often agents are asked to report")] = 1.0
        max_exits_per_node: Annotated[PositiveInt, doc(
            "rank exits kept per node until the launcher takes them (older ones are dropped and counted)")] = 256

    def __init__(self, config: "NodeRegistry.Config | None" = None, *, journal=None, log=None,
                 on_kernel_event: Callable[[str, KernelEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.config = config or NodeRegistry.Config()
        self._journal, self._log = journal, log
        self._on_kernel = on_kernel_event
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeView] = {}  # by agent id
        self._agents_of: dict[str, set[str]] = {}  # node -> the agents whose view is on it (claims in O(1))
        self._excluded: set[str] = set(journal.get_meta(EXCLUDED_META) or []) if journal is not None else set()
        self.reports = 0

    # -- the hot path -------------------------------------------------------------------------------
    def claim_refusal(self, report: NodeReport) -> str | None:
        """Why this report may not speak for its node, or None.

        An agent's token binds its agent id, not the node name it reports; without this check a
        stolen agent token could report kernel errors under another node's name and get that node
        excluded. A node is claimed by the agent that reported it while that agent is live
        (heard within `lost_after_s`); an agent keeps its node while it is live. A lost claim can be
        taken over (a replaced machine, a re-installed agent)."""
        now = self._clock()
        with self._lock:
            mine = self._nodes.get(report.agent_id)
            if mine is not None and mine.node != report.node and not self.lost(mine, now):
                return (f"agent {report.agent_id!r} reports node {mine.node!r}; it may not switch to "
                        f"{report.node!r} while that claim is live (silent for {self.config.lost_after_s:g} s frees it)")
            for agent in sorted(self._agents_of.get(report.node, ())):
                v = self._nodes[agent]
                if agent != report.agent_id and not self.lost(v, now):
                    return f"node {report.node!r} is reported by live agent {v.agent_id!r}"
        return None

    def ingest(self, report: NodeReport) -> NodeReply:
        now = self._clock()
        new = False
        with self._lock:
            v = self._nodes.get(report.agent_id)
            if v is None or v.node != report.node:
                new = True
                old = v
                v = NodeView(report.agent_id, report.node, report.address, now, now, self._wall(), report,
                             live_since=self._wall())
                if old is not None:
                    v.order = old.order
                    self._agents_of[old.node].discard(old.agent_id)
                self._nodes[report.agent_id] = v
                self._agents_of.setdefault(v.node, set()).add(v.agent_id)
            elif self.lost(v, now):  # back after being lost (a restarted agent, a rebooted machine)
                v.live_since = self._wall()
            v.last_seen, v.last_wall, v.report, v.address = now, self._wall(), report, report.address
            for ex in report.exits:
                if len(v.exits) >= self.config.max_exits_per_node:
                    v.exits.popleft()
                    v.exits_dropped += 1
                v.exits.append((report.generation, ex))
            if report.stacks_id and report.stacks is not None:
                v.stacks[report.stacks_id] = report.stacks
                while len(v.stacks) > 4:
                    v.stacks.pop(next(iter(v.stacks)))
            excluded = report.node in self._excluded
            order = NodeOrder(generation=-1) if excluded else v.order
            self.reports += 1
        if new and self._log is not None:
            self._log.info("node agent registered", agent_id=report.agent_id, node=report.node,
                           address=report.address, generation=report.generation, state=report.state)
        if self._on_kernel is not None and report.health is not None:
            for ev in report.health.kernel:
                self._on_kernel(report.node, ev)
        return NodeReply(order=order, report_interval_s=self.config.report_interval_s, excluded=excluded)

    # -- what the launcher asks -------------------------------------------------------------------
    def lost(self, v: NodeView, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) - v.last_seen > self.config.lost_after_s

    def live(self) -> list[NodeView]:
        """Agents heard from within `lost_after_s`, on nodes not excluded, by agent id."""
        now = self._clock()
        with self._lock:
            return [v for _, v in sorted(self._nodes.items())
                    if not self.lost(v, now) and v.node not in self._excluded]

    def live_since(self) -> dict[str, float]:
        """Each live, non-excluded node -> when its agent became live (wall seconds)."""
        return {v.node: v.live_since for v in self.live()}

    def get(self, agent_id: str) -> NodeView | None:
        with self._lock:
            return self._nodes.get(agent_id)

    def set_order(self, agent_id: str, order: NodeOrder | None) -> None:
        with self._lock:
            v = self._nodes.get(agent_id)
            if v is not None:
                v.order = order

    def take_exits(self, agent_id: str, generation: int) -> list[NodeRankExit]:
        """Rank exits of ``generation`` reported by the agent since the last call (others dropped)."""
        with self._lock:
            v = self._nodes.get(agent_id)
            if v is None:
                return []
            out = [ex for g, ex in v.exits if g == generation]
            v.exits.clear()
            return out

    def stacks(self, agent_id: str, stacks_id: str) -> str | None:
        with self._lock:
            v = self._nodes.get(agent_id)
            return None if v is None else v.stacks.get(stacks_id)

    def reporting(self, generation: int, *, running_only: bool = False) -> list[NodeView]:
        """Live agents that report ``generation`` (running, or ended while the daemon was away):
        how a restarted daemon re-adopts it."""
        now = self._clock()
        with self._lock:
            return [v for _, v in sorted(self._nodes.items()) if not self.lost(v, now)
                    and v.report.generation == generation and (v.report.state == "running" or not running_only)]

    # -- exclusion ----------------------------------------------------------------------------------
    @property
    def excluded(self) -> set[str]:
        with self._lock:
            return set(self._excluded)

    def known(self, node: str) -> bool:
        with self._lock:
            return any(v.node == node for v in self._nodes.values())

    def exclude(self, node: str) -> bool:
        """Drain ``node``: its agent is told to run nothing. Durable. False if it already was."""
        with self._lock:
            was = node in self._excluded
            self._excluded.add(node)
            now = sorted(self._excluded)
        if self._journal is not None:
            self._journal.set_meta(EXCLUDED_META, now)
        return not was

    def readmit(self, node: str) -> bool:
        """Let ``node`` run generations again (from the next one on). False if it was not excluded."""
        with self._lock:
            was = node in self._excluded
            self._excluded.discard(node)
            now = sorted(self._excluded)
        if self._journal is not None:
            self._journal.set_meta(EXCLUDED_META, now)
        return was

    # -- the read view ------------------------------------------------------------------------------
    def view(self) -> list[dict]:
        """One row per node for `GET /v1/nodes` and `titan-supervisor nodes`."""
        now = self._clock()
        with self._lock:
            rows = []
            for _, v in sorted(self._nodes.items()):
                r = v.report
                rows.append({
                    "agent_id": v.agent_id, "node": v.node, "address": v.address,
                    "state": "excluded" if v.node in self._excluded else ("lost" if self.lost(v, now) else r.state),
                    "excluded": v.node in self._excluded, "seconds_since_report": round(now - v.last_seen, 3),
                    "last_report_at": v.last_wall, "generation": r.generation, "node_rank": r.node_rank,
                    "nnodes": r.nnodes, "ranks": {str(x.rank): {"pid": x.pid, "state": x.state} for x in r.ranks},
                    "health": r.health.model_dump(mode="json", exclude={"kernel"}) if r.health else None,
                    "exits_dropped": v.exits_dropped, "live_since": v.live_since,
                    "ordered_generation": v.order.generation if v.order is not None else None})
            for node in sorted(self._excluded - {v.node for v in self._nodes.values()}):
                rows.append({"agent_id": None, "node": node, "state": "excluded", "excluded": True})
            return rows
