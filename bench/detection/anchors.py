"""The anchors: other projects' published stability rules, applied to the same step records.

Each is a small pure function of the curve (a list of StepRecord dicts) that returns the
steps where the rule *acts* and whether that act is heavy (stops or rewinds the run) or light
(skips one update). They follow the published rules as written; where the source leaves a
detail open, the choice is stated.

- **llm-foundry `KillLossSpike`**: a loss above `outlier_multiplier` (2) x the running mean of
  the last `window_size` (100) losses is an outlier; more than `patience` (4) outliers in a
  row kill the run (heavy). A non-finite loss counts as an outlier. The mean is used from the
  10th loss on (the window is never full at our onsets; the callback would otherwise never fire).
- **OLMo-core skip-step** (`SkipStepOptimizer`): an update is skipped when the loss or the grad
  norm is more than 6 sigma above the mean of the last 128 steps (from step 20 on). It only
  ever skips (light); it never rewinds or stops.
- **Megatron**: a NaN/Inf loss is fatal (the run stops, heavy); a loss above 10x the running
  mean of the last 100 finite losses is treated as an unexpected spike and stops too (heavy).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

HEAVY, LIGHT = "heavy", "light"


def _records(lines: list[dict]) -> list[dict]:
    return [r for r in lines if "kind" not in r]


def foundry_kill_loss_spike(lines, multiplier=2.0, window=100, patience=4, min_samples=10):
    out, hist, streak = [], deque(maxlen=window), 0
    for r in _records(lines):
        loss = r["loss"]
        finite = math.isfinite(loss)
        outlier = (not finite) or (len(hist) >= min_samples and loss > multiplier * statistics.fmean(hist))
        streak = streak + 1 if outlier else 0
        if finite:
            hist.append(loss)
        if streak > patience:
            out.append((r["step"], HEAVY))
            break  # the run is killed
    return out


def olmo_skip_step(lines, sigma=6.0, window=128, min_samples=20):
    out, losses, norms = [], deque(maxlen=window), deque(maxlen=window)
    for r in _records(lines):
        loss, norm = r["loss"], r["grad_norm"]
        skip = False
        if len(losses) >= min_samples:
            for v, h in ((loss, losses), (norm, norms)):
                mu, sd = statistics.fmean(h), statistics.pstdev(h)
                if not math.isfinite(v) or v - mu > sigma * sd:
                    skip = True
        if skip:
            out.append((r["step"], LIGHT))
        else:
            if math.isfinite(loss) and math.isfinite(norm):
                losses.append(loss)
                norms.append(norm)
    return out


def megatron_nan_and_10x(lines, factor=10.0, window=100):
    hist = deque(maxlen=window)
    for r in _records(lines):
        loss = r["loss"]
        if not math.isfinite(loss) or (hist and loss > factor * statistics.fmean(hist)):
            return [(r["step"], HEAVY)]
        hist.append(loss)
    return []


ANCHORS = {
    "llm-foundry KillLossSpike": foundry_kill_loss_spike,
    "OLMo-core 6-sigma skip": olmo_skip_step,
    "Megatron NaN/10x": megatron_nan_and_10x,
}
