"""Slow convergence: the live loss stays above a reference curve.

The Adam ε = 1e-5 typo (LLM-jp) made training ~3× slower and went unnoticed for months,
because nothing was *wrong* at any single step. So the smoothed loss (median of the last
`window` finite losses) is compared every `every` steps with a reference loss curve
(piecewise-linear through `reference` points, never extrapolated beyond them); being more
than `tolerance` above it for `patience` evaluations in a row raises one `slow_convergence`
warning, re-armed after the curve is back under. No reference -> the detector is off.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

from supervisor.detect.findings import SLOW_CONVERGENCE, WARNING, Finding
from supervisor.detect.robust import RollingWindow


def interpolate(points: tuple[tuple[int, float], ...], step: int) -> float | None:
    """The reference loss at `step`, or None outside the reference's step range."""
    if not points or step < points[0][0] or step > points[-1][0]:
        return None
    steps = [s for s, _ in points]
    i = bisect_left(steps, step)
    if steps[i] == step:
        return points[i][1]
    (s0, v0), (s1, v1) = points[i - 1], points[i]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


class SlowConvergenceDetector:
    @dataclass
    class Config:
        #: (step, loss) points of a reference run, sorted by step; empty = off
        reference: tuple[tuple[int, float], ...] = field(default_factory=tuple)
        #: smoothed loss more than this fraction above the reference is "behind"
        tolerance: float = 0.10
        #: losses in the median smoothing
        window: int = 50
        #: steps between comparisons
        every: int = 50
        #: consecutive "behind" comparisons before the finding
        patience: int = 3
        history: int = 4096

    def __init__(self, config: "SlowConvergenceDetector.Config | None" = None) -> None:
        self.config = config or SlowConvergenceDetector.Config()
        self._ref = tuple(sorted((int(s), float(v)) for s, v in self.config.reference))
        self._window = RollingWindow(self.config.window, history=self.config.history)
        self._behind = 0
        self._reported = False

    def reset(self) -> None:
        self._window.clear()
        self._behind = 0

    def rewind(self, to_step: int) -> None:
        self._window.rewind(to_step)
        self._behind = 0

    def observe(self, record) -> list[Finding]:
        c = self.config
        if not self._ref or not math.isfinite(record.loss):
            return []
        self._window.add(record.step, record.loss)
        if record.step % c.every or len(self._window) < c.window:
            return []
        ref = interpolate(self._ref, record.step)
        if ref is None:
            return []
        smoothed, _ = self._window.stats()
        if smoothed <= ref * (1.0 + c.tolerance):
            self._behind = 0
            self._reported = False
            return []
        self._behind += 1
        if self._behind < c.patience or self._reported:
            return []
        self._reported = True
        return [Finding(kind=SLOW_CONVERGENCE, step=record.step, severity=WARNING,
                        wall_time=record.wall_time,
                        evidence={"smoothed_loss": smoothed, "reference_loss": ref,
                                  "relative_gap": round(smoothed / ref - 1.0, 4) if ref else None,
                                  "comparisons_behind": self._behind})]
