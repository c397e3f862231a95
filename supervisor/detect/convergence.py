"""Slow convergence: the live loss curve against a reference curve from an earlier run.

Why: the LLM-jp lab's Adam ε = 1e-5 typo made convergence ~3× slower and nobody noticed for
weeks, because every step looked healthy on its own. Nothing spikes; the run just needs more
tokens than it should to reach each loss. So the watch asks, at every step after warm-up:
"the live run is at (smoothed) loss L after T tokens; how many tokens did the reference need
to first reach L?" If T / T_ref(L) − 1 exceeds `slowdown_threshold` for `patience`
consecutive records, it raises one `slow_convergence` warning (once, until `reset()`).

Choices, and why:
- Both curves are smoothed the same way (a causal rolling median over `smoothing_window`
  records), so the smoother's lag is the same on both and cancels in the token ratio; a
  median also ignores loss spikes shorter than half the window (spikes have their own
  detector). The reference is then made monotone non-increasing, so "tokens to first reach
  L" is well defined, with an isotonic (least-squares) fit rather than a running minimum: a
  running minimum of a noisy plateau sinks to its lowest excursion and makes any run that
  merely matches the reference look ever slower. T_ref is interpolated linearly between the
  points where the monotone curve steps down.
- A margin: the live run is credited with a loss `margin` lower than it has, i.e. the watch
  asks for T_ref(L − margin), margin = max(loss_tolerance·L, noise_sigmas·SE), SE being the
  standard error of the live smoothed loss (estimated from step-to-step differences). On a
  flat stretch of the curve a small loss offset, from seed noise or the smoother's own
  wobble, would otherwise look like a huge token gap. A live loss below anything the reference reached is fine: no finding.
- Judged only after warm-up (`warmup_steps` and `warmup_tokens`), once the smoothing window
  is full: at the very start both curves sit near ln(vocab) and the ratio is noise.
- Records whose loss is not finite or whose update was skipped are ignored (other detectors
  own those). If `tokens_seen` goes backwards (rollback, restart from a checkpoint) the
  window and the streak restart; a raised finding stays raised.
- Past the reference's last token count, the live tokens are capped at it: we cannot know how
  the reference would have gone on, so the ratio becomes a lower bound (a live run that merely
  matches the reference's final loss is not "slow" just because it ran longer).
- Records with `tokens_seen == 0` carry no token count and are ignored: the watch needs the
  trainer to fill `tokens_seen`.

Defaults were chosen for the tiny CPU drill (ε = 1e-3 needs ~2.5× the steps of ε = 1e-8 to
reach loss 1.35, and must be flagged within 150 steps; a second seed, ~10–20% token noise,
must not be): warm-up 50 steps + patience 20 flags a 2.5× slowdown around step 70, while a
50% threshold leaves a wide margin over seed noise.

Pure logic: records in, findings out; no I/O, no clock.
"""

from __future__ import annotations

from typing import Annotated

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.config_types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, doc
from supervisor.detect.findings import SLOW_CONVERGENCE, WARNING, Finding, json_safe
from supervisor.detect.robust import median
from supervisor.protocol import record_field


def _median_stderr(window: Sequence[float]) -> float:
    """Standard error of the window's median, from the noise of step-to-step differences.

    Differences cancel the trend, so a steep curve is not mistaken for noise: σ ≈ 1.4826 ·
    MAD(diffs) / √2, and the median of n samples has standard error ≈ 1.2533 · σ / √n.
    """
    vals = list(window)
    if len(vals) < 3:
        return 0.0
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    mid = median(diffs)
    sigma = 1.4826 * median(abs(d - mid) for d in diffs) / math.sqrt(2.0)
    return 1.2533 * sigma / math.sqrt(len(vals))


def isotonic_non_increasing(values: Sequence[float]) -> list[float]:
    """Least-squares non-increasing fit (pool adjacent violators), O(n).

    Used instead of a running minimum: on a noisy plateau a running minimum drifts down to the
    lowest noise excursion, and a live run compared with it looks ever slower; the isotonic
    fit averages the plateau instead.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out.extend([total / count] * int(count))
    return out


def _usable(record: Any) -> tuple[float, float] | None:
    """(tokens, loss) of a record that can be compared, else None."""
    loss, tokens = record_field(record, "loss"), record_field(record, "tokens_seen")
    if record_field(record, "update_skipped", False):
        return None
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
        return None
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or not tokens > 0:
        return None
    return float(tokens), float(loss)


def reference_from_spool_lines(lines: Iterable[Any], smoothing_window: int = 20) -> list[tuple[float, float]]:
    """A reference curve [(tokens_seen, loss)] from a previous run's StepRecords (dicts or models).

    Skips non-finite losses, skipped updates, records without `tokens_seen`, and lines that are
    not step records (events). When the step goes backwards (the reference run rolled back),
    the points from that step on are replaced by the newer ones. Then: causal rolling median
    over `smoothing_window` (use the watch's window, so the lags cancel), then a non-increasing
    isotonic fit (see `isotonic_non_increasing`).
    Raises ValueError when fewer than two usable points remain.
    """
    if smoothing_window < 1:
        raise ValueError(f"smoothing_window: must be >= 1, got {smoothing_window}")
    points: list[tuple[int | None, float, float]] = []  # (step, tokens, loss)
    for rec in lines:
        if record_field(rec, "loss") is None or record_field(rec, "tokens_seen") is None:
            continue
        step = record_field(rec, "step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        if step is not None:
            while points and points[-1][0] is not None and points[-1][0] >= step:
                points.pop()
        got = _usable(rec)
        if got is not None:
            points.append((step, *got))
    window: deque[float] = deque(maxlen=smoothing_window)
    smoothed: list[float] = []
    for _, _, loss in points:
        window.append(loss)
        smoothed.append(median(window))
    curve = list(zip((t for _, t, _ in points), isotonic_non_increasing(smoothed)))
    if len(curve) < 2:
        raise ValueError("reference: fewer than two usable step records (need finite loss and tokens_seen > 0)")
    return curve


class ConvergenceWatch:
    """Flags a run that needs much more data than the reference to reach the same loss."""

    @dataclass
    class Config:
        warmup_steps: Annotated[NonNegativeInt, doc("no judgement before this step ...")] = 50
        warmup_tokens: Annotated[NonNegativeInt, doc(
            "... nor before this many tokens (0: steps alone decide)")] = 0
        slowdown_threshold: Annotated[PositiveFloat, doc(
            "0.5 = the run needs > 50% more tokens than the reference to reach the same loss")] = 0.5
        smoothing_window: Annotated[PositiveInt, doc(
            "records in the causal rolling median (both curves); judged only once it is full")] = 20
        patience: Annotated[PositiveInt, doc("consecutive slow records before the finding is raised")] = 20
        loss_tolerance: Annotated[NonNegativeFloat, doc(
            "relative loss credit given to the live run (see the module docstring) ...")] = 0.02
        noise_sigmas: Annotated[NonNegativeFloat, doc(
            "... or this many standard errors of the smoothed live loss, whichever is larger")] = 3.0

    def __init__(self, reference: Sequence[tuple[float, float]], config: "ConvergenceWatch.Config | None" = None):
        self.config = c = config or ConvergenceWatch.Config()
        if c.smoothing_window < 1 or c.patience < 1 or c.warmup_steps < 0 or c.warmup_tokens < 0:
            raise ValueError("smoothing_window and patience must be >= 1, warm-ups >= 0")
        if not (c.slowdown_threshold > 0 and math.isfinite(c.slowdown_threshold)):
            raise ValueError(f"slowdown_threshold: must be > 0, got {c.slowdown_threshold}")
        if not (0 <= c.loss_tolerance < 1):
            raise ValueError(f"loss_tolerance: must be in [0, 1), got {c.loss_tolerance}")
        # The reference is made non-increasing (a no-op for `reference_from_spool_lines` output),
        # then only the points where it strictly drops are kept: the first time each loss level
        # is reached. Losses are stored negated so bisect sees an increasing list.
        pts = [(float(t), float(v)) for t, v in reference]
        last_tokens = -math.inf
        for tokens, loss in pts:
            if not (math.isfinite(tokens) and math.isfinite(loss)) or tokens < last_tokens:
                raise ValueError("reference: points must be finite and in non-decreasing token order")
            last_tokens = tokens
        self._ref_tokens: list[float] = []
        self._ref_neg_loss: list[float] = []
        best = math.inf
        for (tokens, _), loss in zip(pts, isotonic_non_increasing([v for _, v in pts])):
            if loss < best:
                best = loss
                self._ref_tokens.append(tokens)
                self._ref_neg_loss.append(-loss)
        if len(self._ref_tokens) < 1 or last_tokens <= 0:
            raise ValueError("reference: needs at least one point with tokens > 0")
        self._ref_end = last_tokens
        self.reset()

    @property
    def reference_min_loss(self) -> float:
        return -self._ref_neg_loss[-1]

    def reference_tokens_to_reach(self, loss: float) -> float | None:
        """Tokens the reference needed to first reach `loss` (interpolated); None if it never did."""
        if loss < self.reference_min_loss:
            return None
        i = bisect.bisect_left(self._ref_neg_loss, -loss)  # first point with ref loss <= loss
        if i == 0:
            return self._ref_tokens[0]
        t0, l0 = self._ref_tokens[i - 1], -self._ref_neg_loss[i - 1]
        t1, l1 = self._ref_tokens[i], -self._ref_neg_loss[i]
        return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)

    def reset(self) -> None:
        self._window: deque[float] = deque(maxlen=self.config.smoothing_window)
        self._last_tokens: float | None = None
        self._streak = 0
        self._raised = False

    def observe(self, record: Any) -> list[Finding]:
        got = _usable(record)
        if got is None:
            return []
        tokens, loss = got
        c = self.config
        if self._last_tokens is not None and tokens < self._last_tokens:
            self._window.clear()  # rolled back: the old window describes another timeline
            self._streak = 0
        self._last_tokens = tokens
        self._window.append(loss)
        step = int(record_field(record, "step", 0) or 0)
        if (self._raised or len(self._window) < c.smoothing_window
                or step < c.warmup_steps or tokens < c.warmup_tokens):
            return []
        smoothed = median(self._window)
        stderr = _median_stderr(self._window)
        margin = max(smoothed * c.loss_tolerance, c.noise_sigmas * stderr)
        target = smoothed - margin
        ref_tokens = self.reference_tokens_to_reach(target)
        if ref_tokens is None or ref_tokens <= 0:
            self._streak = 0  # better than anything the reference reached: fine
            return []
        # Past the reference's end we do not know how it would have gone on, so the live
        # tokens are capped there: the ratio is then a lower bound on the slowdown.
        compared_tokens = min(tokens, self._ref_end)
        ratio = compared_tokens / ref_tokens
        if ratio - 1.0 <= c.slowdown_threshold:
            self._streak = 0
            return []
        self._streak += 1
        if self._streak < c.patience:
            return []
        self._raised = True
        return [Finding(
            kind=SLOW_CONVERGENCE, step=step, severity=WARNING,
            wall_time=float(record_field(record, "wall_time", 0.0) or 0.0),
            evidence=json_safe({
                "tokens": tokens,
                "compared_tokens": compared_tokens,
                "live_loss": smoothed,
                "raw_loss": loss,
                "compared_loss": target,
                "margin": margin,
                "live_loss_stderr": stderr,
                "reference_tokens": ref_tokens,
                "ratio": ratio,
                "slowdown": ratio - 1.0,
                "threshold": c.slowdown_threshold,
                "consecutive": self._streak,
                "reference_min_loss": self.reference_min_loss,
            }),
        )]
