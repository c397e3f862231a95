"""All detectors behind one door, fed in order, for one generation at a time.

The daemon (and `replay`) owns one `DetectorSuite`. It routes each input to the detectors
that want it and returns their findings in the order they happened. Rules it adds on top:

- Only the current generation counts: records and heartbeats of another generation are
  ignored (a late batch from a killed generation must not raise findings against the new
  one). Before any `reset_generation`, the first generation seen is adopted.
- Steps only go forward within a generation: a record whose step is not above the last
  one is a resend and is ignored. A rewind (rollback) must be announced with
  `reset_generation(generation, now, resume_step=C)`, which restores the loss and grad
  baselines as they were at step C (so a relapse right after the rollback is caught at
  once); without `resume_step` everything starts cold.
- One incident, one divergence: a divergence's onset is pulled back to an open loss spike's
  onset, and a divergence whose onset is at or before the step of the previous divergence
  (e.g. the spike detector and the NaN streak seeing the same blow-up) is dropped.
- A rank exit ends the generation for the stall detector (no hang on a dead job), until
  `group_restarted` says a replica group was relaunched and the generation goes on (torchft mode).
- Slow convergence is watched only when a `reference` curve is given (`ConvergenceWatch`,
  convergence.py). It follows rollbacks by itself (tokens_seen going back) and is never
  reset here: its finding is raised once per run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from supervisor.detect.convergence import ConvergenceWatch
from supervisor.detect.dead_rank import DeadRankDetector
from supervisor.detect.findings import DIVERGENCE, Finding
from supervisor.detect.grad_blowup import GradBlowupDetector
from supervisor.detect.hardware import HardwareDetector
from supervisor.detect.loss_spike import LossSpikeDetector
from supervisor.detect.non_finite import NonFiniteDetector
from supervisor.detect.stall import StallDetector
from supervisor.detect.straggler import StragglerDetector


class DetectorSuite:
    @dataclass
    class Config:
        non_finite: NonFiniteDetector.Config = field(default_factory=NonFiniteDetector.Config)
        loss_spike: LossSpikeDetector.Config = field(default_factory=LossSpikeDetector.Config)
        grad_blowup: GradBlowupDetector.Config = field(default_factory=GradBlowupDetector.Config)
        stall: StallDetector.Config = field(default_factory=StallDetector.Config)
        dead_rank: DeadRankDetector.Config = field(default_factory=DeadRankDetector.Config)
        straggler: StragglerDetector.Config = field(default_factory=StragglerDetector.Config)
        hardware: HardwareDetector.Config = field(default_factory=HardwareDetector.Config)
        convergence: ConvergenceWatch.Config = field(default_factory=ConvergenceWatch.Config)

    def __init__(self, config: "DetectorSuite.Config | None" = None, *,
                 generation: int | None = None, now: float | None = None,
                 reference: Sequence[tuple[float, float]] | None = None) -> None:
        """`reference`: [(tokens_seen, loss)] of an earlier run; enables slow-convergence
        detection (`ConvergenceWatch`, which follows rollbacks by itself via tokens_seen)."""
        self.config = c = config or DetectorSuite.Config()
        self.non_finite = NonFiniteDetector(c.non_finite)
        self.loss_spike = LossSpikeDetector(c.loss_spike)
        self.grad_blowup = GradBlowupDetector(c.grad_blowup)
        self.stall = StallDetector(c.stall, generation=generation, now=now)
        self.dead_rank = DeadRankDetector(c.dead_rank)
        self.straggler = StragglerDetector(c.straggler)
        self.hardware = HardwareDetector(c.hardware)
        self.convergence = ConvergenceWatch(reference, c.convergence) if reference else None
        self.generation = generation
        self.last_step: int | None = None
        self._last_divergence_step: int | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def reset_generation(self, generation: int, now: float, *, resume_step: int | None = None,
                         world_size: int | None = None) -> None:
        """Watch `generation` from `now`; `resume_step` = the checkpoint step it resumes from."""
        self.generation = generation
        self.last_step = resume_step
        self._last_divergence_step = None
        for d in (self.loss_spike, self.grad_blowup):
            if resume_step is None:
                d.reset()
            else:
                d.rewind(resume_step)
        self.non_finite.reset()
        self.straggler.reset()
        self.dead_rank.reset()
        self.hardware.reset()
        self.stall.reset(generation, now, world_size=world_size)

    def group_restarted(self, ranks, now: float, *, relaunched: bool = True) -> None:
        """torchft mode: one replica group's ``ranks`` (global) were relaunched at ``now`` (or excluded)
        while the other groups trained on, in the same generation: the next dead rank is a new
        finding, and stalls are watched again without those ranks' old beats. The step stream
        (group 0's) is untouched, so the loss and gradient windows are kept."""
        self.dead_rank.reset()
        self.stall.ranks_replaced(ranks, now, relaunched=relaunched)

    def end_generation(self) -> None:
        """The generation finished or is being torn down: no more hang/heartbeat findings."""
        self.stall.end()

    def expect_pause(self, until_wall_time: float) -> None:
        self.stall.expect_pause(until_wall_time)

    def next_deadline(self) -> float | None:
        """Earliest `now` at which `tick(now)` would report something."""
        return self.stall.next_deadline()

    # --- inputs -----------------------------------------------------------------------------
    def _current(self, generation: int) -> bool:
        if self.generation is None:
            self.generation = generation
            self.stall.generation = generation
        return generation == self.generation

    def observe_record(self, record) -> list[Finding]:
        if not self._current(record.generation):
            return []
        if self.last_step is not None and record.step <= self.last_step:
            return []
        self.last_step = record.step
        open_onset = self.loss_spike.open_spike_onset
        found: list[Finding] = []
        found += self.non_finite.observe(record)
        found += self.loss_spike.observe(record)
        found += self.grad_blowup.observe(record)
        found += self.straggler.observe(record)
        if self.convergence is not None:
            found += self.convergence.observe(record)
        found += self.stall.observe_record(record)
        return self._one_divergence_per_incident(found, open_onset)

    def _one_divergence_per_incident(self, found: list[Finding],
                                     open_onset: int | None) -> list[Finding]:
        out = []
        for f in found:
            if f.kind != DIVERGENCE:
                out.append(f)
                continue
            onset = int(f.evidence.get("onset_step", f.step))
            if open_onset is not None and open_onset < onset:
                onset = open_onset
                f = replace(f, evidence={**f.evidence, "onset_step": onset,
                                         "detected_onset_step": f.evidence.get("onset_step")})
            if self._last_divergence_step is not None and onset <= self._last_divergence_step:
                continue
            self._last_divergence_step = f.step
            if self.loss_spike.open_spike_onset is not None:
                self.loss_spike.restart_baseline()
            out.append(f)
        return out

    def observe_heartbeat(self, hb) -> list[Finding]:
        if not self._current(hb.generation):
            return []
        return self.stall.observe_heartbeat(hb)

    def observe_exit(self, rank: int, exitcode: int, wall_time: float, step: int, *,
                     generation: int | None = None, oom_killed: bool = False,
                     log_lines: Iterable[str] = (), host: str | None = None) -> list[Finding]:
        """A rank process of `generation` (default: the current one) exited with `exitcode`."""
        if generation is not None and not self._current(generation):
            return []
        lines = list(log_lines)
        found = self.dead_rank.observe_exit(rank, exitcode, wall_time, step,
                                            oom_killed=oom_killed, log_lines=lines, host=host)
        for line in lines:
            found += self.hardware.observe_log(line, wall_time=wall_time, step=step, rank=rank,
                                               host=host)
        if exitcode != 0:
            self.stall.end()
        return found

    def observe_log(self, line: str, *, wall_time: float, step: int, rank: int | None = None,
                    host: str | None = None) -> list[Finding]:
        return self.hardware.observe_log(line, wall_time=wall_time, step=step, rank=rank,
                                         host=host)

    def observe_alert(self, name: str, *, wall_time: float, step: int, detail: str = "",
                      rank: int | None = None, host: str | None = None) -> list[Finding]:
        return self.hardware.observe_alert(name, wall_time=wall_time, step=step, detail=detail,
                                           rank=rank, host=host)

    def tick(self, now: float) -> list[Finding]:
        return self.stall.tick(now)
