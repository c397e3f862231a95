"""Stalls: no new step for too long (`hang`), or a rank whose heartbeats stopped.

Time is never read here: it comes from record/heartbeat `wall_time`s and from the `now`
given to `tick(now)`, which the daemon calls about once a second.

Hang timeout. Steps of a healthy run take a steady time, so the timeout is learned from
it: clamp(`multiplier` × p95(step_seconds), `floor_seconds`, `ceiling_seconds`). Until the
first record of a generation (process start, checkpoint load, compile) only the longer
`startup_timeout` applies, counted from `reset(generation, now)`. While any rank's latest
heartbeat says it is in a slow phase (`slow_phases`: loading, checkpoint save, in-process
rollback, ...), the timeout is at least `slow_phase_timeout`: a checkpoint save is not a
hang. `expect_pause(until)` announces a known pause (a rollback being applied, an operator
checkpoint): no hang before `until`, and the ordinary timeout counts from `until`.
A hang fires when `now >= deadline` (exactly at the timeout, not before), once per stall;
the next progress re-arms it.

Progress is a record with a higher step or, once the first record of the generation has
arrived, a heartbeat reporting a higher step: telemetry records can be dropped or delayed
by design (bounded queue), heartbeats are an independent path, so a slow daemon-side
ingest does not look like a hang.

Heartbeats: each rank beats about once a second; a rank silent for `heartbeat_timeout`
gets one `missing_heartbeat` finding per silence. If `world_size` is given to `reset`, a
rank never heard from within `startup_timeout` is missing too. A rank whose heartbeat
thread falls silent while the step stream is stalled too (no step for `heartbeat_timeout`
since that rank's last beat) and another rank still beats, none of the beating ones in a slow
phase and the silent one not `finishing`, is hung *now* (basis "heartbeat"):
the heartbeat thread runs beside the training loop, so its silence means the whole process
is stopped or gone, and waiting out the learned step timeout only adds latency. When the
step stream stalls, the `hang` names a suspect rank (`rank`): the lowest silent rank if any (its
process or node is gone); else a rank whose heartbeat phase shows it stuck outside the
training step while others are inside it (waiting for it in a collective), a phase
starting with "fault:" (drills) first. Evidence lists every rank's phase and silence.

Failure model: the clocks of the trainer hosts and of the daemon are assumed to agree to
well within `floor_seconds`, and `floor_seconds` must exceed the telemetry flush interval.
After `end()` (the generation exited or finished) nothing fires until `reset`, or until
`ranks_replaced` says one replica group was relaunched and the generation goes on (torchft mode:
every group's ranks beat with their global rank; group 0's records are the step stream).
"""

from __future__ import annotations

import math
from typing import Annotated

from collections import deque
from dataclasses import dataclass

from supervisor.detect.findings import CRITICAL, HANG, MISSING_HEARTBEAT, WARNING, Finding
from supervisor.config_types import PositiveFloat, PositiveInt, Seconds, Strings, doc
from supervisor.detect.robust import percentile


@dataclass
class _Beat:
    wall_time: float
    step: int
    host: str | None = None
    pid: int | None = None
    phase: str = ""


class StallDetector:
    @dataclass
    class Config:
        multiplier: Annotated[PositiveFloat, doc(
            "hang timeout = clamp(multiplier * p95 step seconds, floor_seconds, ceiling_seconds)")] = 10.0
        floor_seconds: Annotated[Seconds, doc("lower bound of the learned hang timeout")] = 3.0
        ceiling_seconds: Annotated[Seconds, doc("upper bound of the learned hang timeout")] = 600.0
        startup_timeout: Annotated[Seconds, doc(
            "before the first step of a generation (start, load, compile): no step within this "
            "is a failed start (a hang)")] = 900.0
        heartbeat_timeout: Annotated[Seconds, doc(
            "a rank silent this long is missing (ranks beat about every second)")] = 5.0
        step_time_window: Annotated[PositiveInt, doc("step_seconds samples the p95 is taken over")] = 200
        slow_phases: Annotated[Strings, doc(
            "heartbeat phases during which steps legitimately pause ...")] = (
            "starting", "loading", "checkpoint", "rollback", "finishing")
        slow_phase_timeout: Annotated[Seconds, doc(
            "... and the minimum hang timeout while any rank reports one")] = 600.0
        step_phase: Annotated[str, doc(
            "the phase of a rank inside the training step (others outside it are suspects)")] = "train_step"
        exit_phase: Annotated[str, doc(
            "the phase a rank reports before it exits normally (its silence after it is no hang)")] = "finishing"

        def __post_init__(self) -> None:
            if self.floor_seconds > self.ceiling_seconds:
                raise ValueError(f"floor_seconds {self.floor_seconds} > ceiling_seconds {self.ceiling_seconds}")

    def __init__(self, config: "StallDetector.Config | None" = None, *,
                 generation: int | None = None, now: float | None = None) -> None:
        self.config = config or StallDetector.Config()
        self.reset(generation, now)

    # --- lifecycle --------------------------------------------------------------------------
    def reset(self, generation: int | None, now: float | None,
              world_size: int | None = None) -> None:
        """Start watching `generation` (a new one, or the same one after a rollback) at `now`."""
        self.generation = generation
        self._started_at = now
        self._progress_step: int | None = None
        self._progress_time: float | None = None
        self._step_times: deque[float] = deque(maxlen=self.config.step_time_window)
        self._pause_until: float | None = None
        self._hang_reported = False
        self._beats: dict[int, _Beat] = {}
        self._slow: dict[int, _Beat] = {}  # the beats whose phase is a slow one (a subset of _beats)
        self._expected: set[int] = set(range(world_size)) if world_size else set()
        self._missing_reported: set[int] = set()
        self._ended = False
        self._quiet_until = -math.inf  # see `_rank_deadlines_from`: no rank deadline comes before it
        self._rejoined: dict[int, float] = {}  # rank -> when its replica group was relaunched

    def ranks_replaced(self, ranks, now: float, *, relaunched: bool = True) -> None:
        """torchft mode: the ranks of one replica group were killed and relaunched at `now` (or, with
        ``relaunched=False``, taken out for good) while the other groups kept training. Their old
        beats are forgotten (a silent old beat must not make the next stall look like theirs); a
        relaunched rank is expected again within `startup_timeout` of `now`; and the detector
        watches again (the group's exit had ended it, but the generation goes on)."""
        for rank in ranks:
            self._beats.pop(rank, None)
            self._slow.pop(rank, None)
            self._missing_reported.discard(rank)
            if relaunched:
                self._expected.add(rank)
                self._rejoined[rank] = now
            else:
                self._expected.discard(rank)
                self._rejoined.pop(rank, None)
        self._ended = False
        self._quiet_until = -math.inf

    def end(self) -> None:
        """The generation is over (a rank exited, or training finished): stop firing."""
        self._ended = True

    def expect_pause(self, until_wall_time: float) -> None:
        self._pause_until = max(until_wall_time, self._pause_until or until_wall_time)

    # --- inputs -----------------------------------------------------------------------------
    def observe_record(self, record) -> list[Finding]:
        if not self._accepts(record.generation):
            return []
        if self._started_at is None:
            self._started_at = record.wall_time
            self._quiet_until = -math.inf
        self._step_times.append(float(record.step_seconds))
        if self._started_at is not None and record.wall_time < self._started_at:
            # From before this watch began: a late record of the trajectory a rollback abandoned, or
            # the spool replayed at re-adoption. Not progress of this watch (its step would become the
            # point the trainer "stalled" at, timed from a moment before the daemon was watching).
            return []
        # A record is a finished step, even when its step number went back (a rollback rewound the
        # run): newer than the last progress is progress.
        if self._progress_time is None or record.wall_time > self._progress_time:
            self._mark_progress(record.step, record.wall_time)
        return []

    def observe_heartbeat(self, hb) -> list[Finding]:
        if not self._accepts(hb.generation):
            return []
        if self._started_at is None:
            self._started_at = hb.wall_time
            self._quiet_until = -math.inf
        prev = self._beats.get(hb.rank)
        if prev is None or hb.wall_time >= prev.wall_time:
            beat = self._beats[hb.rank] = _Beat(hb.wall_time, hb.step, getattr(hb, "host", None),
                                                getattr(hb, "pid", None), getattr(hb, "phase", "") or "")
            if beat.phase in self.config.slow_phases:
                self._slow[hb.rank] = beat
            elif self._slow:
                self._slow.pop(hb.rank, None)
            self._missing_reported.discard(hb.rank)
            # this rank's deadlines are no earlier than this (both are heartbeat_timeout after >= its beat)
            self._quiet_until = min(self._quiet_until, hb.wall_time + self.config.heartbeat_timeout)
        if self._progress_step is not None:  # startup is over: heartbeats count as progress
            self._progress(hb.step, hb.wall_time)
        return []

    def _accepts(self, generation: int) -> bool:
        if self.generation is None:
            self.generation = generation
        return generation == self.generation

    def _progress(self, step: int, wall_time: float) -> None:
        if self._progress_step is None or step > self._progress_step:
            self._mark_progress(step, wall_time)

    def _mark_progress(self, step: int, wall_time: float) -> None:
        if self._hang_reported or self._progress_time is None or wall_time < self._progress_time:
            self._quiet_until = -math.inf  # silent-rank deadlines come back, or move earlier
        self._progress_step = step
        self._progress_time = wall_time
        self._hang_reported = False

    # --- timing -----------------------------------------------------------------------------
    def step_timeout(self) -> float | None:
        """The learned step timeout, or None before any step time was seen."""
        c = self.config
        if not self._step_times:
            return None
        p95 = percentile(list(self._step_times), 95)
        return min(max(c.multiplier * p95, c.floor_seconds), c.ceiling_seconds)

    def _hang_deadline(self) -> tuple[float, str, float] | None:
        """(deadline, basis, timeout) of the current stall, or None if nothing can fire."""
        c = self.config
        if self._ended or self._hang_reported:
            return None
        if self._progress_time is None:
            if self._started_at is None:
                return None
            timeout, basis = c.startup_timeout, "startup"
            deadline = self._started_at + timeout
        else:
            timeout = self.step_timeout()
            basis = "steps"
            if timeout is None:
                timeout, basis = c.startup_timeout, "startup"
            slow = list(self._slow.values())
            if slow and c.slow_phase_timeout > timeout:
                # A slow phase only counts while its rank keeps beating: a rank that went
                # silent mid-save (SIGSTOP, a wedged driver) is hung, not saving.
                stale_at = max(b.wall_time for b in slow) + c.heartbeat_timeout
                slow_deadline = min(self._progress_time + c.slow_phase_timeout, stale_at)
                if slow_deadline > self._progress_time + timeout:
                    timeout = slow_deadline - self._progress_time
                    basis = "phase:" + ",".join(sorted({b.phase for b in slow}))
            deadline = self._progress_time + timeout
        if self._pause_until is not None:
            after = self.step_timeout() or c.floor_seconds
            if self._pause_until + after > deadline:
                deadline, basis, timeout = self._pause_until + after, "pause", after
        return deadline, basis, timeout

    def _silent_rank_deadlines(self) -> dict[int, float]:
        """{rank: when its silence makes the stall a hang}: heartbeat_timeout after the later of
        its last beat and the last progress (a step after its beat means it was alive then)."""
        if self._ended or self._hang_reported or self._progress_time is None:
            return {}
        after = max(self._progress_time, self._pause_until or self._progress_time)
        return {r: max(b.wall_time, after) + self.config.heartbeat_timeout for r, b in self._beats.items()}

    def _heartbeat_deadline(self, rank: int) -> float | None:
        beat = self._beats.get(rank)
        if beat is not None:
            return beat.wall_time + self.config.heartbeat_timeout
        started = self._rejoined.get(rank, self._started_at)
        if started is None:
            return None
        return started + max(self.config.startup_timeout, self.config.heartbeat_timeout)

    def next_deadline(self) -> float | None:
        """The earliest `now` at which `tick` would report something (None: nothing pending)."""
        if self._ended:
            return None
        times = []
        hang = self._hang_deadline()
        if hang is not None:
            times.append(hang[0])
        times.extend(self._silent_rank_deadlines().values())
        for rank in self._expected | set(self._beats):
            if rank not in self._missing_reported:
                d = self._heartbeat_deadline(rank)
                if d is not None:
                    times.append(d)
        return min(times) if times else None

    # --- the clock --------------------------------------------------------------------------
    def tick(self, now: float) -> list[Finding]:
        """Findings due at ``now``. O(1) while nothing can be due (`_quiet_until`, the stall's
        deadline); a full pass over the ranks otherwise (at 16,384 ranks and 10 ticks a second a
        pass per tick was most of the daemon's core: bench/ingest.py)."""
        if self._ended:
            return []
        if now < self._quiet_until:
            hang = self._hang_deadline()
            if hang is None or now < hang[0]:
                return []
        out = self._tick_ranks(now)
        self._quiet_until = self._rank_deadlines_from()
        return out

    def _rank_deadlines_from(self) -> float:
        """The earliest per-rank deadline (a heartbeat not yet reported missing, a silent rank that
        would make the stall a hang): until then only the stall's own deadline can fire. Kept a lower
        bound between passes: a beat lowers it to its own deadline, a progress that could bring
        deadlines earlier (or back) resets it."""
        times = list(self._silent_rank_deadlines().values())
        times += [d for rank in self._expected | set(self._beats) if rank not in self._missing_reported
                  and (d := self._heartbeat_deadline(rank)) is not None]
        return min(times, default=math.inf)

    def _tick_ranks(self, now: float) -> list[Finding]:
        out: list[Finding] = []
        step = self._progress_step if self._progress_step is not None else 0
        silent: list[int] = []
        for rank in sorted(self._expected | set(self._beats)):
            d = self._heartbeat_deadline(rank)
            if d is None or now < d:
                continue
            silent.append(rank)
            if rank in self._missing_reported:
                continue
            self._missing_reported.add(rank)
            beat = self._beats.get(rank)
            out.append(Finding(
                kind=MISSING_HEARTBEAT, step=step, severity=WARNING, wall_time=now, rank=rank,
                evidence={
                    "last_heartbeat_wall_time": beat.wall_time if beat else None,
                    "seconds_silent": round(now - beat.wall_time, 3) if beat else None,
                    "never_seen": beat is None,
                    "heartbeat_timeout": self.config.heartbeat_timeout,
                    "host": beat.host if beat else None, "pid": beat.pid if beat else None,
                    "last_step": beat.step if beat else None,
                },
            ))
        hang = self._hang_deadline()
        c = self.config
        beating = [r for r, b in self._beats.items() if now - b.wall_time < c.heartbeat_timeout]
        # Not while a live rank is in a slow phase (loading, saving, finishing: it may wait on
        # the silent one legitimately), nor for a rank whose last word was that it is exiting.
        pausing = any(self._beats[r].phase in c.slow_phases for r in beating)
        frozen = [] if pausing else sorted(
            r for r, d in self._silent_rank_deadlines().items()
            if now >= d and self._beats[r].phase != c.exit_phase)
        if frozen and beating and (hang is None or now < hang[0]):
            hang = (now, "heartbeat", self.config.heartbeat_timeout)
            silent = frozen + [r for r in silent if r not in frozen]
        if hang is not None and now >= hang[0]:
            deadline, basis, timeout = hang
            self._hang_reported = True
            since = self._progress_time if self._progress_time is not None else self._started_at
            suspects = silent or self._stalest(now) or self._phase_suspects()
            out.append(Finding(
                kind=HANG, step=step, severity=CRITICAL, wall_time=now,
                rank=suspects[0] if suspects else None,
                evidence={
                    "last_step": self._progress_step,
                    "last_progress_wall_time": self._progress_time,
                    "seconds_without_progress": (round(now - since, 3) if since is not None
                                                 else None),
                    "timeout_seconds": timeout, "basis": basis,
                    "p95_step_seconds": (percentile(list(self._step_times), 95)
                                         if self._step_times else None),
                    "silent_ranks": silent,
                    "suspect_ranks": suspects,
                    "rank_phases": {str(r): b.phase for r, b in sorted(self._beats.items())},
                    "heartbeat_ages": {str(r): round(now - b.wall_time, 3)
                                       for r, b in sorted(self._beats.items())},
                    "rank_steps": {str(r): b.step for r, b in sorted(self._beats.items())},
                },
            ))
        return out

    def _stalest(self, now: float) -> list[int]:
        """The rank whose heartbeat is clearly the oldest (by at least half the heartbeat timeout
        over every other's): a stopped process stops beating first, and its last phase is stale, so
        this comes before the phase rule. For a step stall that fires before any heartbeat is past
        its timeout: in torchft mode the phase rule named the healthy group's rank (waiting in the
        quorum, outside the step) and the remedy relaunched it, leaving the stopped group stopped."""
        if len(self._beats) < 2:
            return []
        ages = sorted((now - b.wall_time, r) for r, b in self._beats.items())
        (oldest, rank), (second, _) = ages[-1], ages[-2]
        return [rank] if oldest - second >= self.config.heartbeat_timeout / 2 else []

    def _phase_suspects(self) -> list[int]:
        """Ranks stuck outside the training step while another rank is inside it."""
        inside = self.config.step_phase
        phases = {r: b.phase for r, b in self._beats.items() if b.phase}
        if inside not in phases.values():
            return []
        out = sorted((not p.startswith("fault:"), r) for r, p in phases.items() if p != inside)
        return [r for _, r in out]
