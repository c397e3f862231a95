"""torchft mode: a generation is N replica groups, each its own torchrun, and a group is the unit
of restart (docs/architecture.md, "torchft mode").

Each group is a `supervisor.launch.local` generation of its own (own torchrun, own rendezvous,
own log, own session) started with ``--fault_tolerance.enable --fault_tolerance.replica_id g
--fault_tolerance.group_size N`` and ``TORCHFT_LIGHTHOUSE`` pointing at the `Lighthouse` this
launcher owns. The trainer side (`training.ft`) makes the groups average gradients through
torchft, go on without a dead peer, and heal a (re)joining group from a live one.

Layout on disk: group 0 trains in the run's workdir (its checkpoints and spool are the ones the
daemon's catalog, ledger and replay already read: every committed step leaves all groups with the
same parameters, so group 0's checkpoints are the run's); group g > 0 in ``<workdir>/replica-<g>``.

`ReplicaGroups` is the `RunningGeneration` the daemon sees: global rank = g * nproc + local rank
(``world_size`` = groups * nproc); a rank exit is reported with its global rank, every group's
ranks heartbeat the daemon with theirs (a SIGSTOPped group is a silent rank to the stall
detector), and `group_of` maps a rank back to its group. The generation as a whole
has exited only when every group has, so one dead group is never a job-wide exit. A dead group is
relaunched by `restart_group` (the remedy calls it; nothing here decides when), and a group that
failed `exclude_after` times within `exclude_window_s` is excluded: `restart_group` refuses it and
says why, and the remedy pages with the node's name.

Failure model: the groups' processes and the Lighthouse run in their own sessions and survive a
daemon crash; `adopt` re-attaches to group 0 by pid (the journal's torchrun pid), the others by
the pids noted from their heartbeats, and to the Lighthouse only if its pid still runs it.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import psutil

from supervisor import dcp
from supervisor.config_types import PositiveInt, Seconds, doc
from supervisor.launch.local import Generation, LaunchSpec, LocalLauncher, RankExit
from supervisor.lighthouse import Lighthouse, LighthouseConfig


@dataclass
class FaultToleranceConfig:
    """``[fault_tolerance]``: torchft replica groups (``mode = "torchft"``) or none (``"off"``)."""

    mode: Annotated[Literal["off", "torchft"], doc(
        "off: one torchrun per generation, restarted as a whole; torchft: `groups` replica groups, "
        "each its own torchrun, a dead group relaunched alone while the others keep stepping")] = "off"
    groups: Annotated[PositiveInt, doc(
        "replica groups (each `run.nproc_per_node` ranks); torchtitan's group_size: the data is split this many ways")] = 2
    min_replica_size: Annotated[PositiveInt, doc("fewest groups a step may commit with")] = 1
    process_group_timeout_ms: Annotated[PositiveInt, doc(
        "a cross-group allreduce not done in this time fails the step (a hung peer)")] = 10000
    quorum_timeout_s: Annotated[Seconds, doc("a group's quorum request fails after this (Lighthouse unreachable)")] = 60.0
    exclude_after: Annotated[PositiveInt, doc(
        "a group that failed this many times within exclude_window_s is excluded (not relaunched; paged)")] = 3
    exclude_window_s: Annotated[Seconds, doc("the window of exclude_after")] = 600.0
    lighthouse: LighthouseConfig = field(default_factory=LighthouseConfig)

    def __post_init__(self) -> None:
        for name, n in (("min_replica_size", self.min_replica_size), ("lighthouse.min_replicas", self.lighthouse.min_replicas)):
            if n > self.groups:
                raise ValueError(f"{name} = {n} is more than groups = {self.groups}: no step could ever commit")


def group_workdir(workdir: Path, group: int) -> Path:
    return Path(workdir) if group == 0 else Path(workdir) / f"replica-{group}"


def group_spec(spec: LaunchSpec, group: int, config: FaultToleranceConfig, lighthouse: str) -> LaunchSpec:
    """The launch spec of one replica group: its own folder and the trainer's torchft flags."""
    flags = ["--fault_tolerance.enable", "--fault_tolerance.replica_id", str(group),
             "--fault_tolerance.group_size", str(config.groups),
             "--fault_tolerance.min_replica_size", str(config.min_replica_size),
             "--fault_tolerance.process_group_timeout_ms", str(config.process_group_timeout_ms),
             "--fault_tolerance.quorum_timeout_s", repr(float(config.quorum_timeout_s)),
             # one fault history for the job: a job-wide spike is not fired again by a group that
             # was down when it happened (training/faults.py, "Event faults")
             "--supervision.fault_state", str(Path(spec.workdir) / "faults")]
    # Every group's ranks heartbeat the daemon with their global rank (a hung group is seen by the
    # stall detector); group 0's step stream is the run's (docs/architecture.md, "torchft mode"):
    # the trainer posts records from global rank 0 only, the other groups spool theirs.
    return dataclasses.replace(spec, workdir=group_workdir(spec.workdir, group),
                               extra_args=list(spec.extra_args) + flags,
                               env=dict(spec.env, TORCHFT_LIGHTHOUSE=lighthouse))


def set_aside_newer(workdir: Path, step: int) -> list[str]:
    """Move a group's checkpoints newer than ``step`` to ``<workdir>/quarantine/`` (never deleted).

    A start from checkpoint C (a cold rollback) loads step C in group 0 (its folder is the catalog's,
    already set aside by the ledger); the other groups then load their newest checkpoint at or before
    C and heal from group 0. Were a newer one left in place, group 0 would heal *from it* and the
    rollback would be undone."""
    moved = []
    qdir = Path(workdir) / "quarantine"
    for s, path in dcp.step_folders(Path(workdir) / "checkpoint"):
        if s > step:
            qdir.mkdir(parents=True, exist_ok=True)
            dest = qdir / f"{path.name}.rollback-{int(time.time() * 1000)}"
            path.rename(dest)
            moved.append(str(dest))
    return moved


class GroupExcluded(RuntimeError):
    """The group failed too often to be relaunched (`FaultToleranceConfig.exclude_after`)."""


class ReplicaGroups:
    """One generation in torchft mode: the groups' local generations behind one `RunningGeneration`."""

    def __init__(self, spec: LaunchSpec, launcher: "TorchftLauncher", groups: list[Generation]) -> None:
        self.spec = spec
        self._launcher = launcher
        self.groups = groups
        self.nproc = spec.nproc
        self.failures: dict[int, list[float]] = {g: [] for g in range(len(groups))}
        self.restarts: dict[int, int] = {g: 0 for g in range(len(groups))}
        self.excluded: dict[int, str] = {}
        self.lighthouse_restarts = 0
        self.exited: int | None = None
        self._stopping = False
        self._exit_expected = False

    # --- RunningGeneration ---------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self.spec.generation

    @property
    def pid(self) -> int:
        return self.groups[0].pid

    @property
    def rank_pids(self) -> dict[int, int]:
        return {g * self.nproc + r: pid for g, gen in enumerate(self.groups) for r, pid in gen.rank_pids.items()}

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        for gen in self.groups:
            gen.stopping = value

    @property
    def exit_expected(self) -> bool:
        return self._exit_expected

    @exit_expected.setter
    def exit_expected(self, value: bool) -> None:
        self._exit_expected = value
        for gen in self.groups:
            gen.exit_expected = value

    @property
    def world_size(self) -> int:
        """Every group's ranks: the heartbeats' global ranks are 0 .. world_size - 1."""
        return len(self.groups) * self.nproc

    def group_of(self, rank: int | None) -> int | None:
        return None if rank is None else rank // self.nproc

    def ranks_of(self, group: int) -> list[int]:
        """The global ranks of ``group``."""
        return list(range(group * self.nproc, (group + 1) * self.nproc))

    def alive(self) -> bool:
        return any(gen.alive() for gen in self.groups)

    def note_rank_pid(self, rank: int, pid: int) -> None:
        self.groups[rank // self.nproc].note_rank_pid(rank % self.nproc, pid)

    def owns(self, pid: int) -> bool:
        return any(gen.owns(pid) for gen in self.groups)

    def poll(self) -> list[RankExit]:
        """New rank exits (global ranks). The generation exits only when every group has."""
        out: list[RankExit] = []
        if self.exited is None and not self._stopping and self._launcher.lighthouse.ensure():
            self.lighthouse_restarts += 1  # it died: same port, so the groups find it again
        for g, gen in enumerate(self.groups):
            self._discover_ranks(gen)
            for ex in gen.poll():
                if ex.exitcode != 0 and not self._stopping:
                    self.failures[g].append(ex.wall_time)
                # A group whose ranks were never seen (it died at start) is named by its first rank.
                out.append(dataclasses.replace(ex, rank=g * self.nproc + (ex.rank or 0),
                                               host=ex.host or socket.gethostname()))
        if self.exited is None and all(gen.exited is not None for gen in self.groups):
            codes = [gen.exited for gen in self.groups]
            self.exited = next((c for c in codes if c != 0), 0)
            if self.exited == 0 and self._exit_expected:
                self._launcher.lighthouse.stop()  # the run finished: no group will ask for a quorum again
        return out

    def stop(self, grace_s: float) -> None:
        self.stopping = True
        for gen in self.groups:
            gen.stop(grace_s)
        for gen in self.groups:
            gen.poll()
        self.exited = next((gen.exited for gen in self.groups if gen.exited not in (None, 0)), 0)

    def dump_stacks(self) -> str:
        return "\n".join(self.dump_group_stacks(g) for g in range(len(self.groups)))

    def dump_group_stacks(self, group: int) -> str:
        """One group's stacks (a hung group, before `restart_group` kills it); local ranks."""
        return f"=== replica group {group} ===\n{self.groups[group].dump_stacks()}"

    # --- the unit of restart -------------------------------------------------------------------
    @property
    def reconfigure_s(self) -> float:
        """How long the other groups may stall while torchft drops a dead group and admits its
        replacement: the Lighthouse's heartbeat timeout (a silent group leaves the quorum only then)
        plus its join timeout (a quorum waits that long for a relaunched group to ask to join)."""
        lh = self._launcher.config.lighthouse
        return (lh.heartbeat_timeout_ms + lh.join_timeout_ms) / 1000.0

    def group_alive(self, group: int) -> bool:
        return self.groups[group].alive()

    def recent_failures(self, group: int, now: float | None = None) -> int:
        now = time.time() if now is None else now
        window = self._launcher.config.exclude_window_s
        return sum(1 for t in self.failures[group] if now - t <= window)

    def restart_group(self, group: int, reason: str) -> dict:
        """Kill what is left of ``group`` and start it again (same generation, same flags; it loads
        its own newest valid checkpoint and heals from a live peer). Raises `GroupExcluded` for a
        group that keeps failing, ValueError for a group that does not exist."""
        if not 0 <= group < len(self.groups):
            raise ValueError(f"replica group {group} does not exist (0..{len(self.groups) - 1})")
        if group in self.excluded:
            raise GroupExcluded(self.excluded[group])
        recent = self.recent_failures(group)
        if recent >= self._launcher.config.exclude_after:
            self.excluded[group] = (f"replica group {group} failed {recent} times within "
                                    f"{self._launcher.config.exclude_window_s:g} s on {socket.gethostname()}")
            self.groups[group].stopping = True
            self.groups[group].stop(0.0)
            raise GroupExcluded(self.excluded[group])
        old = self.groups[group]
        old.stopping = True
        old.stop(0.0)
        # Its own newest checkpoint, then a heal from a live peer: not the generation's start step.
        respec = dataclasses.replace(self.spec, load_step=None, skip_batches=0)
        self.groups[group] = self._launcher.start_group(respec, group)
        self.restarts[group] += 1
        self.exited = None
        return {"replica_group": group, "restarts": self.restarts[group], "pid": self.groups[group].pid,
                "recent_failures": recent, "reason": reason}

    @staticmethod
    def _discover_ranks(gen: Generation) -> None:
        """Note the ranks of a group we started (torchrun's children running ``training.run``), so
        a SIGKILLed rank is seen without waiting for its first heartbeat to name its pid."""
        if gen.rank_pids or not gen.alive():
            return
        try:
            children = psutil.Process(gen.pid).children(recursive=True)
        except psutil.Error:
            return
        ranks = []
        for child in children:
            try:
                env = child.environ()
                if "training.run" in " ".join(child.cmdline()) and "LOCAL_RANK" in env:
                    ranks.append((int(env["LOCAL_RANK"]), child.pid))
            except (psutil.Error, ValueError):
                continue
        for rank, pid in ranks:
            if gen.owns(pid):
                gen.note_rank_pid(rank, pid)


class TorchftLauncher:
    """Starts a generation as `FaultToleranceConfig.groups` replica groups behind one Lighthouse."""

    Config = FaultToleranceConfig

    def __init__(self, config: FaultToleranceConfig, logs_dir: Path, local_config=None) -> None:
        self.config = config
        self.logs_dir = Path(logs_dir)
        self.local_config = local_config
        self.lighthouse = Lighthouse(config.lighthouse, self.logs_dir / "lighthouse.log")

    def _local(self, group: int) -> LocalLauncher:
        return LocalLauncher(self.logs_dir / f"replica-{group}", self.local_config)

    def start_group(self, spec: LaunchSpec, group: int) -> Generation:
        address = self.lighthouse.start()  # idempotent; starts it again if it died
        gspec = group_spec(spec, group, self.config, address)
        gspec.workdir.mkdir(parents=True, exist_ok=True)
        if group > 0 and spec.load_step is not None:
            set_aside_newer(gspec.workdir, spec.load_step)
            gspec = dataclasses.replace(gspec, load_step=None)  # its newest at or before, then a heal
        return self._local(group).start(gspec)

    def start(self, spec: LaunchSpec) -> ReplicaGroups:
        return ReplicaGroups(spec, self, [self.start_group(spec, g) for g in range(self.config.groups)])

    def adopt(self, spec: LaunchSpec, pid: int, rank_pids: dict[int, int]) -> ReplicaGroups | None:
        """Re-attach after a daemon restart: group 0 by its torchrun pid, the others by their
        noted rank pids' parent torchrun, and the Lighthouse by the pid and port it left on disk."""
        self.lighthouse.readopt()
        first = self._local(0).adopt(group_spec(spec, 0, self.config, ""), pid,
                                     {r: p for r, p in rank_pids.items() if r < spec.nproc})
        if first is None:
            return None
        groups = [first]
        for g in range(1, self.config.groups):
            ranks = {r - g * spec.nproc: p for r, p in rank_pids.items() if r // spec.nproc == g}
            parent = _parent_torchrun(next(iter(ranks.values()), 0))
            gen = self._local(g).adopt(group_spec(spec, g, self.config, ""), parent, ranks) if parent else None
            if gen is None:
                return None
            groups.append(gen)
        return ReplicaGroups(spec, self, groups)

    def close(self) -> None:
        self.lighthouse.stop()


def _parent_torchrun(pid: int) -> int | None:
    try:
        for p in psutil.Process(pid).parents():
            if "torch.distributed.run" in " ".join(p.cmdline()):
                return p.pid
    except psutil.Error:
        return None
    return None
