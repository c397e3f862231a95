"""Robust rolling statistics: median and MAD over the last N accepted samples.

Why median/MAD and not mean/std: one spike moves a mean and a standard deviation a lot,
and then hides the next spike; the median and the median absolute deviation barely move.
The scale is the MAD of successive differences (≈ σ for Gaussian
noise, and blind to a trend, see `stats`), floored so a perfectly flat window cannot
divide by zero.

Samples carry their step, and a longer history than the window is kept, so that after a
rollback to checkpoint C the window can be rebuilt from the samples at steps ≤ C
(`rewind`) instead of starting cold: a relapse right after the rollback is then judged
against the healthy baseline at once. Failure model: a rewind further back than the kept
history leaves an empty window, i.e. a cold start (the detector warms up again).
"""

from __future__ import annotations

from collections import deque

MAD_TO_SIGMA = 1.4826
SQRT2 = 2 ** 0.5


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); an observed value, never interpolated."""
    s = sorted(values)
    if not s:
        raise ValueError("percentile of no values")
    k = max(1, -(-len(s) * q // 100))  # ceil(n*q/100), at least 1
    return s[int(min(k, len(s))) - 1]


def theil_sen(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the Theil-Sen line: the median of the pairwise slopes, then the
    median of y - slope*x. Robust to outliers (up to ~29 % of the points) where least squares
    is not; O(n^2) pairs, meant for windows of tens of samples."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("theil_sen needs at least two (x, y) pairs of equal length")
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    if not slopes:
        raise ValueError("theil_sen needs at least two distinct x values")
    slope = median(slopes)
    return median([y - slope * x for x, y in zip(xs, ys)]), slope


class RollingWindow:
    """The last `size` (step, value) samples, plus up to `history` older ones for rewinds."""

    def __init__(self, size: int, history: int = 4096, min_scale_fraction: float = 1e-3) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self.size = size
        self.min_scale_fraction = min_scale_fraction
        self._window: deque[tuple[int, float]] = deque(maxlen=size)
        self._history: deque[tuple[int, float]] = deque(maxlen=max(history, size))

    def __len__(self) -> int:
        return len(self._window)

    def add(self, step: int, value: float) -> None:
        self._window.append((step, value))
        self._history.append((step, value))

    def values(self) -> list[float]:
        return [v for _, v in self._window]

    def samples(self) -> list[tuple[int, float]]:
        return list(self._window)

    def stats(self) -> tuple[float, float]:
        """(median, robust scale) of the window; the window must not be empty.

        The scale is taken from successive differences (1.4826 · median|Δ| / √2, ≈ σ for
        i.i.d. noise) rather than from deviations around the median: while the loss is
        still falling steeply, the spread around the median is mostly trend, which would
        inflate the scale and hide real spikes; successive differences barely see a trend.
        """
        vals = self.values()
        med = median(vals)
        if len(vals) >= 2:
            diffs = [abs(b - a) for a, b in zip(vals, vals[1:])]
            spread = MAD_TO_SIGMA * median(diffs) / SQRT2
        else:
            spread = 0.0
        floor = max(abs(med) * self.min_scale_fraction, 1e-12)
        return med, max(spread, floor)

    def restart(self) -> None:
        """Forget the active window (the level changed); keep history for a later rewind."""
        self._window.clear()

    def rewind(self, to_step: int) -> None:
        """Drop samples after `to_step` and rebuild the window from the newest kept ones."""
        kept = [(s, v) for s, v in self._history if s <= to_step]
        self._history = deque(kept, maxlen=self._history.maxlen)
        self._window = deque(kept[-self.size:], maxlen=self.size)

    def clear(self) -> None:
        self._window.clear()
        self._history.clear()
