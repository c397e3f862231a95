"""The launcher interface: how the daemon starts, watches and stops a generation of trainer ranks.

One implementation per place ranks can run: `supervisor.launch.local` (torchrun on this machine),
`supervisor.launch.kubernetes` (one JobSet per generation) and `supervisor.launch.agents` (one
torchrun per node through node agents), chosen by `launch.backend`. A launcher that can take a
node out of scheduling also has ``exclude_node(node) -> dict`` (the Kubernetes one cordons it,
the agents one drains it); `Remedies.exclude_node` uses it when present. A generation that spans
nodes also has ``world_size`` and ``nodes``.
A launcher decides nothing; `supervisor.generations.Generations` calls it, and the policy decides
when. Failure model: a launcher's processes outlive the daemon (they run in their own session), so
`adopt` must recognise a generation started by an earlier daemon process, and must refuse a pid
that now belongs to something else.
"""

from __future__ import annotations

from typing import Protocol


class RunningGeneration(Protocol):
    """A started generation as the daemon sees it."""

    pid: int
    rank_pids: dict[int, int]
    exited: int | None  # the whole generation's exit status, once it has ended
    stopping: bool  # exits from here on are the daemon's doing, not findings
    exit_expected: bool  # the trainer said it finished

    @property
    def generation(self) -> int: ...
    def alive(self) -> bool: ...
    def poll(self) -> list: ...  # new rank exits (RankExit) since the last poll
    def note_rank_pid(self, rank: int, pid: int) -> None: ...
    def owns(self, pid: int) -> bool: ...  # pid is a process this generation started (never trust a request)
    def stop(self, grace_s: float) -> None: ...
    def dump_stacks(self) -> str: ...


class Launcher(Protocol):
    def start(self, spec) -> RunningGeneration: ...
    def adopt(self, spec, pid: int, rank_pids: dict[int, int]) -> RunningGeneration | None: ...
