"""Grow back: a node that was lost and returns rejoins the run at the next checkpoint (issue 13).

Why: a node lost to a reboot, a dead agent or a flaky link usually comes back. The daemon already
restarts on the remaining nodes when one is lost (a smaller DP degree, the global batch kept by
gradient accumulation, the exact data position kept: docs/architecture.md §6b); without growing
back, the run would train on fewer nodes until a human ran `reshard`.

What it decides: the desired nodes are the live agents' nodes that are not excluded (by the
policy or an operator: the registry's `excluded`; those never come back by themselves) and, when
`launch.agents.nodes` names the expected nodes, among them. A desired node the running
generation does not have becomes *ready* once its agent has been live for `settle_s`; the grow
is planned when a checkpoint newer than the step at which it became ready has been saved, so the
new generation (all ready nodes, DP back up, accumulation back down, same global batch) resumes
from that checkpoint and at most the few steps between the save and the stop are redone. The
wait is here, before any action starts: a heavy action in flight would hold back every other
decision (a spike's rollback) for up to a checkpoint interval.

Anti-flap: a node grown back `max_per_node` times within `window_s` (counted from the journal's
`grow` actions naming it; each one followed a loss of that node) is not grown back again until the
window has passed; `view()` says so, and status shows it. A node that dies while settling starts
its settle time again.

Pure: no I/O and no clock reads; `now` (wall seconds) comes in. The only state is the step at
which each node became ready, rebuilt by observation after a daemon restart (a new daemon sees
the node as newly live, so it settles again: a later checkpoint, never a wrong one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from supervisor.config_types import NonNegativeInt, Seconds, SecondsOrZero, doc

GROW = "grow"


@dataclass(frozen=True)
class GrowPlan:
    """Restart the run on ``nodes_to`` from the newest checkpoint (saved after ``ready_step``)."""

    nodes_from: tuple[str, ...]
    nodes_to: tuple[str, ...]
    returned: tuple[str, ...]
    ready_step: int
    checkpoint: int
    reason: str

    def params(self) -> dict:
        return {"nodes_from": list(self.nodes_from), "nodes_to": list(self.nodes_to),
                "returned": list(self.returned), "ready_step": self.ready_step, "checkpoint": self.checkpoint,
                "reason": self.reason}


@dataclass(frozen=True)
class PastGrow:
    """A grow action the journal holds (done or not): when, and which nodes it brought back."""

    wall_time: float
    returned: tuple[str, ...]


class GrowBack:
    @dataclass
    class Config:
        """Growing back onto returned nodes (settings: ``[launch.agents] grow_*``)."""

        enabled: Annotated[bool, doc("grow the run back onto a lost node that returns")] = True
        settle_s: Annotated[SecondsOrZero, doc(
            "a returned node's agent must have been live this long before the grow is planned")] = 30.0
        max_per_node: Annotated[NonNegativeInt, doc(
            "grow-backs onto one node allowed within window_s; then it stays out until the window passes "
            "(0 = never grow back)")] = 3
        window_s: Annotated[Seconds, doc("the window max_per_node counts over")] = 3600.0

    def __init__(self, config: "GrowBack.Config | None" = None) -> None:
        self.config = config or GrowBack.Config()
        self._ready_at: dict[str, int] = {}  # node -> the step at which it became ready
        self._why: dict[str, str] = {}  # node -> why it is not in the run yet (for status)

    def view(self) -> dict[str, str]:
        """Each desired node the run does not have yet, and why (status' ``nodes.returning``)."""
        return dict(self._why)

    def tick(self, *, now: float, step: int, newest_checkpoint: int | None, in_generation: tuple[str, ...],
             live_since: dict[str, float], expected: tuple[str, ...] = (),
             past: list[PastGrow] = (), final_step: int | None = None) -> GrowPlan | None:
        """One reconcile tick. ``live_since``: each live, non-excluded node -> when its agent became
        live (wall seconds). ``expected``: `launch.agents.nodes` (empty: any live node). No grow from
        a checkpoint at or past ``final_step`` (the run's last step: it ends there anyway)."""
        c = self.config
        have = set(in_generation)
        candidates = {n: t for n, t in live_since.items() if n not in have and (not expected or n in expected)}
        self._ready_at = {n: s for n, s in self._ready_at.items() if n in candidates}
        self._why = {}
        if not c.enabled or not have:
            if candidates and not c.enabled:
                self._why = {n: "live, not in the run: grow-back is off (launch.agents.grow_back)" for n in candidates}
            return None
        for node, since in sorted(candidates.items()):
            live_for = max(0.0, now - since)
            grown = [g for g in past if node in g.returned and now - g.wall_time <= c.window_s]
            if len(grown) >= c.max_per_node:
                self._ready_at.pop(node, None)
                self._why[node] = (f"not grown back: already {len(grown)} time(s) within {c.window_s:g}s "
                                   f"(launch.agents.grow_max_per_node = {c.max_per_node})")
            elif live_for < c.settle_s:
                self._ready_at.pop(node, None)
                self._why[node] = f"settling: live {live_for:.0f}s of {c.settle_s:g}s"
            else:
                ready = self._ready_at.setdefault(node, step)
                self._why[node] = f"ready: grows back at the first checkpoint after step {ready}"
        ready = {n: s for n, s in self._ready_at.items() if newest_checkpoint is not None and newest_checkpoint > s}
        if not ready or (final_step is not None and newest_checkpoint >= final_step):
            return None
        returned = tuple(sorted(ready))
        nodes_to = tuple(sorted(have | set(returned)))
        return GrowPlan(nodes_from=tuple(sorted(have)), nodes_to=nodes_to, returned=returned,
                        ready_step=min(ready.values()), checkpoint=int(newest_checkpoint),
                        reason=(f"{', '.join(returned)} returned (live >= {c.settle_s:g}s): growing back from "
                                f"{len(have)} to {len(nodes_to)} node(s) at checkpoint {newest_checkpoint}"))

    def started(self, plan: GrowPlan) -> None:
        """The daemon began the grow action: its nodes are no longer waiting."""
        for n in plan.returned:
            self._ready_at.pop(n, None)
            self._why.pop(n, None)
