"""Non-finite loss or gradient norm: the one finding that needs no statistics.

A NaN/Inf loss or pre-clip grad norm means the update of that step is garbage. The trainer
guards itself (it skips such updates); this detector makes the event visible (critical
`non_finite`, one per step) and escalates:
- a non-finite gradient whose update was *applied* (`update_skipped` false) has poisoned the
  weights: every later step computes on NaN weights and no skip can undo it, so it is a
  `divergence` at once (cause "poisoned_update", onset = that step);
- `max_consecutive` non-finite steps in a row are no longer "one bad step" but a
  `divergence` whose onset is the first of them, raised once per streak. Failure model: a streak broken by dropped records is judged only
on the records that arrive (missing steps neither extend nor break it).
"""

from __future__ import annotations

from typing import Annotated

import math
from dataclasses import dataclass

from supervisor.detect.findings import CRITICAL, DIVERGENCE, NON_FINITE, Finding, json_safe
from supervisor.config_types import NonNegativeInt, doc


class NonFiniteDetector:
    @dataclass
    class Config:
        max_consecutive: Annotated[NonNegativeInt, doc(
            "consecutive non-finite steps that turn into a divergence (0 disables escalation)")] = 2

    def __init__(self, config: "NonFiniteDetector.Config | None" = None) -> None:
        self.config = config or NonFiniteDetector.Config()
        self.reset()

    def reset(self) -> None:
        self._streak_start: int | None = None
        self._streak = 0
        self._escalated = False

    def observe(self, record) -> list[Finding]:
        bad = [name for name in ("loss", "grad_norm") if not math.isfinite(getattr(record, name))]
        if not bad:
            self.reset()
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
                                    "update_skipped": False})))
        elif limit and self._streak >= limit and not self._escalated:
            self._escalated = True
            out.append(Finding(
                kind=DIVERGENCE, step=record.step, severity=CRITICAL, wall_time=record.wall_time,
                evidence={"cause": "non_finite_streak", "onset_step": self._streak_start,
                          "consecutive": self._streak, "fields": bad},
            ))
        return out
