"""Off-schedule LR bursts: a few steps at many times the run's LR, and how far they moved the weights.

Why: an LR x100 held for 10 steps on the benchmark's tiny model (bench/detection) lifts the
loss by 1-1.5x its twin, then the loss comes back into the onset's band by itself 20-30 steps
later and stays 20-80 % above its clean twin for good. Nothing on the loss curve tells that
slow, complete-looking return from a benign one (README, fourth round). The step's LR tells
it: with Adam each applied step moves every weight by about its LR, so a burst moved the
weights about `sum(lr / peak - 1)` *extra* normal steps in a few steps (its displacement).
Tuning half (seeds 1-10): the tiny model's bursts of 990 extra steps (x100 for 10 steps)
diverged 4 of 4 and x1000 for one step (999) always did; every benign burst but one moved at most
297 (x100 / x30 for 3 / 10 steps; x100 for 3 steps is a coin flip and is left to the loss
rules). The one: the 6-layer model's x100 10-step burst came back in 37 steps; the bar does not
know the model's tolerance, and rolls it back.

What is off-schedule: the record's LR with the supervisor's own `lr_scale` divided out (a
cool, a re-warm or an LR-down rollback is never a burst) above `factor` x the highest such LR
of the last `peak_window` steps outside bursts (the peak of the schedule: a warm-up climbs to it
step by step, a decay stays under it). A burst is judged when it ends (the first step back under
the bar): a raised LR that holds longer than `max_steps` is a new level (a changed config, a
warm restart, a held drift), not a burst; it is dropped and its LR counts as the schedule's from
then on. That is also why the peak is a trailing one: a level raised for an hour and then
lowered again (an operator's experiment, a rollback past a held drift) leaves the reference
`peak_window` steps later instead of blinding the rule for the rest of the run. Steps whose
update was skipped moved nothing and add nothing. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Annotated

from supervisor.config_types import PositiveFloat, PositiveInt, doc


@dataclass(frozen=True)
class Burst:
    start: int  # first off-schedule step
    end: int  # last off-schedule step
    peak_factor: float  # highest LR / schedule peak in the burst
    displacement: float  # sum over applied steps of (LR / schedule peak - 1): extra normal steps moved

    def evidence(self) -> dict:
        return {"burst_start": self.start, "burst_end": self.end, "burst_steps": self.end - self.start + 1,
                "burst_peak_factor": round(self.peak_factor, 3),
                "burst_displacement": round(self.displacement, 1)}


class LrBurstTracker:
    @dataclass
    class Config:
        factor: Annotated[PositiveFloat, doc(
            "an LR (the supervisor's own scale divided out) above this multiple of the run's peak LR "
            "is off-schedule")] = 2.0
        max_steps: Annotated[PositiveInt, doc(
            "an off-schedule LR held longer than this is a new level, not a burst")] = 20
        min_history: Annotated[PositiveInt, doc(
            "steps seen before anything is judged (the first warm-up steps double the LR)")] = 10
        peak_window: Annotated[PositiveInt, doc(
            "the schedule's peak is the highest LR of this many latest steps outside bursts")] = 200

    def __init__(self, config: "LrBurstTracker.Config | None" = None) -> None:
        self.config = config or LrBurstTracker.Config()
        self._recent: deque[float] = deque(maxlen=self.config.peak_window)  # base LRs outside bursts
        self._seen = 0
        self._open: list[tuple[int, float, bool]] = []  # (step, base LR, update applied) of the burst

    @property
    def peak(self) -> float:
        return max(self._recent, default=0.0)

    def reset(self) -> None:
        self._recent.clear()
        self._seen, self._open = 0, []

    def drop_open(self) -> None:
        """After a rewind: the burst in progress did not happen on the restored trajectory."""
        self._open = []

    def observe(self, step: int, lr: float, lr_scale: float, update_skipped: bool) -> Burst | None:
        """Feed one step; returns the burst that this step ended, if any."""
        if not (math.isfinite(lr) and math.isfinite(lr_scale) and lr_scale > 0 and lr >= 0):
            return None
        base = lr / lr_scale
        c = self.config
        ref = self.peak
        if self._seen >= c.min_history and ref > 0 and base > c.factor * ref:
            self._open.append((step, base, not update_skipped))
            if len(self._open) > c.max_steps:  # a new level: it is the schedule now
                self._recent.extend(b for _, b, _ in self._open)
                self._open = []
            return None
        self._seen += 1
        ended, self._open = self._open, []
        self._recent.append(base)
        if not ended:
            return None
        return Burst(start=ended[0][0], end=ended[-1][0],
                     peak_factor=max(b for _, b, _ in ended) / ref,
                     displacement=sum(b / ref - 1.0 for _, b, applied in ended if applied))
