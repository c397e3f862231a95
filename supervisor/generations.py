"""Generations: the one owner of starting, stopping and re-adopting trainer generations.

A *generation* is one start of the trainer job (one torchrun, one rendezvous). Everything that
restarts training goes through `Generations.launch` / `stop`, so the journal's `generations`
table is complete and the generation number only ever grows. The daemon supplies `hooks` for
what else must happen at those moments (preflight before a launch, detector windows reset,
directives of the old generation dropped); this class decides nothing about *when*.

Layout: a generation runs on `layout_index` (an index into `[preflight] layouts`; None = the
preset's own parallelism). `launch(layout_index=i)` switches to layout i for this and every later
generation (the repeated-OOM fallback); the journal's generation row names it.

Warm spare (`[launch] warm_spare`, local launcher): `keep_spare` keeps one spare generation parked
after its imports while the current one trains; a launch whose world matches is served by it
(supervisor/launch/spare.py). Its pids are journaled (`spare` meta); a restarted daemon kills it.

Failure model: the ranks run in their own session and outlive a daemon crash. The torchrun pid
is journaled at launch and the rank pids as they are learned, so a restarted daemon `adopt`s the
running generation instead of starting a second one. Rank pids are written when the world is
complete, else at most once per `PIDS_JOURNAL_EVERY_S` (and by the reconcile loop's
`flush_pids`): one write per first heartbeat cost O(ranks) each, O(ranks^2) for a start at
16,384 ranks (bench/ingest.py). A pid learned within that second and lost to a daemon crash is
learned again from the rank's next heartbeat.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

from supervisor.launch.base import Launcher, RunningGeneration
from supervisor.launch.spare import kill_recorded


#: while a world's rank pids are still arriving, they are journaled at most this often
PIDS_JOURNAL_EVERY_S = 1.0


class PreflightFailed(RuntimeError):
    """The plan about to launch has errors (and no override reason)."""


class GenerationHooks(Protocol):
    def before_launch(self) -> None: ...  # may raise PreflightFailed
    def on_launch(self, generation: int, load_step: int | None, nproc: int, lr_scale: float) -> None: ...
    def on_stop(self) -> None: ...


class Generations:
    def __init__(self, launcher: Launcher, journal, log, metrics, *, spec: Callable, stop_grace_s: float,
                 run_id: str, hooks: GenerationHooks) -> None:
        self.launcher = launcher
        self._journal, self._log, self._metrics = journal, log, metrics
        self._spec = spec  # (generation, load_step, skip_batches, lr_scale, ramp_steps, layout_index) -> LaunchSpec
        self._grace = stop_grace_s
        self._run_id = run_id
        self._hooks = hooks
        self.current: RunningGeneration | None = None
        self.id = -1  # the newest generation number (-1: none yet)
        self.first_start: float | None = journal.get_meta("first_start")
        self.layout_index: int | None = journal.get_meta("layout_index")
        self.layout_label: str | None = journal.get_meta("layout_label")
        self.ranks: int | None = journal.get_meta("ranks")
        self._pids_dirty, self._pids_journaled_at = False, -1e9
        self._taken: tuple[object, set[int]] = (None, set())

    def alive(self) -> bool:
        """A generation runs and its processes are there."""
        g = self.current
        return g is not None and g.exited is None and g.alive()

    async def launch(self, *, load_step: int | None, skip_batches: int, lr_scale: float, ramp_steps: int = 0,
                     reason: str, layout_index: int | None = None, layout_label: str | None = None,
                     ranks: int | None = None) -> RunningGeneration:
        self._hooks.before_launch()
        if ranks is not None:
            self.ranks = ranks
            self._journal.set_meta("ranks", ranks)
        if layout_index is not None:
            self.layout_index, self.layout_label = layout_index, layout_label
            self._journal.set_meta("layout_index", layout_index)
            self._journal.set_meta("layout_label", layout_label)
        self.id += 1
        spec = self._spec(self.id, load_step=load_step, skip_batches=skip_batches, lr_scale=lr_scale,
                          ramp_steps=ramp_steps, layout_index=self.layout_index)
        try:
            self.current = gen = await asyncio.to_thread(self.launcher.start, spec)
        except Exception as e:  # noqa: BLE001 - told to the hooks (a page), then raised as before
            failed = getattr(self._hooks, "launch_failed", None)
            if failed is not None:
                failed(self.id, e)
            raise
        # after the start: a launcher over node agents knows the world size only once it has chosen nodes
        self._hooks.on_launch(self.id, load_step, getattr(gen, "world_size", spec.nproc), lr_scale)
        if self.first_start is None:
            self.first_start = time.time()
            self._journal.set_meta("first_start", self.first_start)
        self._journal.record_generation_start(generation=self.id, run_id=self._run_id, load_step=load_step or 0,
                                              skip_batches=skip_batches, lr_scale=lr_scale,
                                              layout={"nproc_per_node": spec.nproc, "index": self.layout_index,
                                                      "label": self.layout_label,
                                                      **({"nodes": list(gen.nodes)} if hasattr(gen, "nodes") else {})})
        self._journal.set_meta(f"generation_{self.id}", {"torchrun_pid": gen.pid, "rank_pids": {}})
        self._note_spare()  # a spare that became this generation, or was discarded, is no spare now
        self._metrics.generation.set(self.id)
        self._metrics.set_up(True)
        self._log.info("generation started", generation=self.id, load_step=load_step, skip_batches=skip_batches,
                       lr_scale=lr_scale, reason=reason, layout=self.layout_label, pid=gen.pid,
                       warm_spare=getattr(gen, "spare", "off"),
                       command=getattr(gen, "command", "") or " ".join(spec.command()))
        return gen

    async def stop(self, reason: str, *, grace_s: float | None = None) -> None:
        gen = self.current
        if gen is None:
            return
        gen.stopping = True
        self._hooks.on_stop()
        await asyncio.to_thread(gen.stop, self._grace if grace_s is None else grace_s)
        self._journal.record_generation_end(gen.generation, exit_code=gen.exited, reason=reason, state="stopped")
        self._log.info("generation stopped", generation=gen.generation, reason=reason)
        self.current = None

    def ended(self, gen: RunningGeneration, reason: str) -> None:
        """The generation exited by itself (finished, or died)."""
        self._journal.record_generation_end(gen.generation, exit_code=gen.exited, reason=reason, state="exited")
        if self.current is gen:
            self.current = None

    def adopt(self, last: dict, lr_scale: float) -> RunningGeneration | None:
        """Re-attach to the journal's last generation if its processes still run; else mark it lost."""
        self.id = int(last["id"])
        meta = self._journal.get_meta(f"generation_{self.id}") or {}
        spec = self._spec(self.id, load_step=last.get("load_step"), skip_batches=last.get("skip_batches") or 0,
                          lr_scale=lr_scale, ramp_steps=0, layout_index=self.layout_index)
        gen = self.launcher.adopt(spec, int(meta.get("torchrun_pid", 0) or 0),
                                  {int(k): int(v) for k, v in (meta.get("rank_pids") or {}).items()})
        if gen is None:
            self._journal.record_generation_end(self.id, reason="not running when the daemon restarted", state="lost")
            return None
        self.current = gen
        self._log.info("adopted generation", generation=self.id, pid=gen.pid, pids=last.get("pids") or [])
        return gen

    def keep_spare(self, *, keep: bool, start: bool) -> None:
        """Reconcile the warm spare (`[launch] warm_spare`, launchers that have one): started when
        ``start`` (the current generation trains), discarded unless ``keep``. Its pids are journaled
        (`spare` meta) like a generation's, so a restarted daemon can kill it (`kill_stale_spare`)."""
        ensure = getattr(self.launcher, "ensure_spare", None)
        if ensure is None:
            return
        if not keep:
            reason = self.launcher.discard_spare("no spare wanted")
            if reason is not None:
                self._note_spare()
                self._log.info("warm spare discarded", reason=reason)
            return
        if start and self.current is not None and hasattr(self.current, "spec"):
            record = ensure(self.current.spec)
            if record is not None:
                self._note_spare()
                self._log.info("warm spare started", pid=record.pid, folder=record.folder)

    def _note_spare(self) -> None:
        get = getattr(self.launcher, "spare_record", None)
        if get is None:
            return
        record = get()
        if (record.to_dict() if record else None) != self._journal.get_meta("spare"):
            self._journal.set_meta("spare", record.to_dict() if record else None)

    def kill_stale_spare(self) -> None:
        """A spare journaled by an earlier daemon process is never adopted (its ranks hold that
        daemon's trainer token): killed if that pid is still that spare, and forgotten."""
        record = self._journal.get_meta("spare")
        if record:
            killed = kill_recorded(record)
            self._journal.set_meta("spare", None)
            self._log.info("warm spare of an earlier daemon", pid=record.get("pid"),
                           action="killed" if killed else "already gone")

    def note_rank_pid(self, rank: int, pid: int, *, ranks: int, agent: str | None = None) -> str | None:
        """A rank's pid, learned from its first heartbeat (journaled for re-adoption); or why the
        heartbeat is refused. A pid from a request is only believed when the launcher confirms
        the process is one it started for this generation (its process tree, its start time):
        the daemon signals these pids, so a forged one must never get in. A heartbeat relayed by
        node agent ``agent`` is believed only if that agent runs the rank with that pid in this
        generation (`AgentGeneration.vouches`: its own report, not every node's)."""
        gen = self.current
        if gen is None:
            return "no generation is running"
        ranks = getattr(gen, "world_size", ranks)  # nodes x ranks per node under node agents
        if not 0 <= rank < ranks:
            return f"rank {rank} is not a rank of this run (0..{ranks - 1})"
        if agent is not None:
            vouches = getattr(gen, "vouches", None)
            if vouches is None or not vouches(agent, rank, pid):
                return f"agent {agent} does not run rank {rank} as pid {pid} in generation {gen.generation}"
        known = gen.rank_pids.get(rank)
        if known is not None:
            return None if known == pid else f"rank {rank} is pid {known}, not {pid}"
        taken = self._taken_pids(gen)
        if pid in taken or (agent is None and not gen.owns(pid)):
            return f"pid {pid} is not a trainer process of generation {gen.generation}"
        gen.note_rank_pid(rank, pid)
        taken.add(pid)
        self._pids_dirty = True
        if len(gen.rank_pids) >= ranks or time.monotonic() - self._pids_journaled_at >= PIDS_JOURNAL_EVERY_S:
            self.flush_pids()
        return None

    def _taken_pids(self, gen) -> set[int]:
        """The pids already known as ranks of ``gen``, as a set (a scan of `rank_pids` per new rank
        was O(ranks^2) for a start at 16,384 ranks); rebuilt if the launcher added pids itself."""
        if self._taken[0] is not gen or len(self._taken[1]) != len(gen.rank_pids):
            self._taken = (gen, set(gen.rank_pids.values()))
        return self._taken[1]

    def flush_pids(self, *, due_only: bool = False) -> None:
        """Journal the current generation's rank pids if some were learned since the last write
        (`note_rank_pid` when the world is complete; the reconcile loop every tick with
        ``due_only``: once `PIDS_JOURNAL_EVERY_S` has passed since the last write)."""
        gen = self.current
        if not self._pids_dirty or gen is None:
            return
        if due_only and time.monotonic() - self._pids_journaled_at < PIDS_JOURNAL_EVERY_S:
            return
        self._pids_dirty = False
        self._pids_journaled_at = time.monotonic()
        self._journal.set_meta(f"generation_{self.id}", {"torchrun_pid": gen.pid, "rank_pids": gen.rank_pids})
        self._journal.set_generation_pids(self.id, sorted(gen.rank_pids.values()))
