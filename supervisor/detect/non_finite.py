"""Non-finite loss or gradient norm: the one finding that needs no statistics.

A NaN/Inf loss or pre-clip grad norm means the update of that step is garbage. The trainer
guards itself (it skips such updates); this detector makes the event visible (critical
`non_finite`, one per step) and escalates:
- a non-finite gradient whose update was *applied* (`update_skipped` false) has poisoned the
  weights: every later step computes on NaN weights and no skip can undo it, so it is a
  `divergence` at once (cause "poisoned_update", onset = that step). Its evidence says whether
  it came out of a normal loss (`sudden`: the step's loss finite and at most
  `sudden_loss_ratio` x the median of the last `loss_window` finite losses): then nothing
  was growing before it, which points at the batch or the hardware rather than the LR, and the
  policy does not count it as a sign of an unstable LR;
- `max_consecutive` non-finite steps in a row are no longer "one bad step" but a
  `divergence` whose onset is the first of them, raised once per streak. Failure model: a streak broken by dropped records is judged only
on the records that arrive (missing steps neither extend nor break it).
"""

from __future__ import annotations

from typing import Annotated

import math
import statistics
from collections import deque
from dataclasses import dataclass

from supervisor.detect.findings import CRITICAL, DIVERGENCE, NON_FINITE, Finding, json_safe
from supervisor.config_types import NonNegativeInt, PositiveFloat, PositiveInt, doc


class NonFiniteDetector:
    @dataclass
    class Config:
        max_consecutive: Annotated[NonNegativeInt, doc(
            "consecutive non-finite steps that turn into a divergence (0 disables escalation)")] = 2
        sudden_loss_ratio: Annotated[PositiveFloat, doc(
            "a poisoned update whose loss is at most this x the recent median is 'sudden' "
            "(a bad batch or hardware, not the LR)")] = 1.5
        loss_window: Annotated[PositiveInt, doc(
            "finite losses whose median 'sudden' compares with (at least 5 must be known)")] = 20

    def __init__(self, config: "NonFiniteDetector.Config | None" = None) -> None:
        self.config = config or NonFiniteDetector.Config()
        self._losses: deque[float] = deque(maxlen=self.config.loss_window)
        self.reset()

    def reset(self) -> None:
        """Forget the streak (not the recent losses: a restarted or rolled-back run is the same model)."""
        self._streak_start: int | None = None
        self._streak = 0
        self._escalated = False

    def observe(self, record) -> list[Finding]:
        bad = [name for name in ("loss", "grad_norm") if not math.isfinite(getattr(record, name))]
        if not bad:
            self.reset()
            self._losses.append(record.loss)
            return []
        if self._streak_start is None:
            self._streak_start = record.step
        self._streak += 1
        out = [Finding(
            kind=NON_FINITE, step=record.step, severity=CRITICAL, wall_time=record.wall_time,
            evidence=json_safe({
                "fields": bad, "loss": record.loss, "grad_norm": record.grad_norm,
                "update_skipped": bool(record.update_skipped),
                "skip_reason": getattr(record, "skip_reason", None),
                "consecutive": self._streak,
            }),
        )]
        limit = self.config.max_consecutive
        poisoned = not math.isfinite(record.grad_norm) and not record.update_skipped
        if poisoned and not self._escalated:
            self._escalated = True
            out.append(Finding(
                kind=DIVERGENCE, step=record.step, severity=CRITICAL, wall_time=record.wall_time,
                evidence=json_safe({"cause": "poisoned_update", "onset_step": record.step,
                                    "grad_norm": record.grad_norm, "loss": record.loss,
                                    "update_skipped": False, **self._sudden(record.loss)})))
        elif limit and self._streak >= limit and not self._escalated:
            self._escalated = True
            out.append(Finding(
                kind=DIVERGENCE, step=record.step, severity=CRITICAL, wall_time=record.wall_time,
                evidence={"cause": "non_finite_streak", "onset_step": self._streak_start,
                          "consecutive": self._streak, "fields": bad},
            ))
        return out

    def _sudden(self, loss: float) -> dict:
        """Whether a poisoned update came out of a normal loss, with the numbers that say so."""
        if len(self._losses) < 5:
            return {"sudden": False}
        median = statistics.median(self._losses)
        ratio = self.config.sudden_loss_ratio
        return {"sudden": math.isfinite(loss) and median > 0 and loss <= ratio * median,
                "loss_median": median, "sudden_loss_ratio": ratio}
