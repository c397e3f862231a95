"""The labeling rule: what each perturbation did to the run, measured on the curve.

Written down once, applied mechanically (no hand labels). For a perturbed run P and its
clean twin C (same model, seed, LR, data order: matrix.py), with `s(x, t)` the median of
the finite losses of steps t-2..t+2 of curve x (a 5-step rolling median) and the excess
e(t) = s(P, t) / s(C, t) - 1:

- **diverged** if P has a non-finite loss at any step >= onset (the weights were poisoned:
  nothing after it is training), or if e(t) > TOLERANCE for every t in
  [last + 1, last + K] (not back in band within K steps after the perturbation ended);
- **no_effect** if e(t) <= TOLERANCE for every t in [onset, last + K];
- **recovered** otherwise (it left the band and came back within K steps).

K = 40 steps, TOLERANCE = 0.05 (5 %, about 3x the twin-to-twin spread of the 5-step median
across seeds at the same step). `recovered` and `no_effect` are *benign*: a rollback there
throws away good work. Clean runs carry no event.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

K = 40
TOLERANCE = 0.05
DIVERGED, RECOVERED, NO_EFFECT = "diverged", "recovered", "no_effect"


def load_curve(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(lines: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in lines if "kind" not in r}


def smoothed(loss: dict[int, float], t: int) -> float | None:
    vals = sorted(v for s in range(t - 2, t + 3) if math.isfinite(v := loss.get(s, math.nan)))
    return vals[len(vals) // 2] if vals else None


def label(perturbed: dict[int, float], clean: dict[int, float], onset: int, last: int) -> tuple[str, dict]:
    """(label, measurements) for one event; see the module docstring for the rule."""
    bad = [s for s, v in perturbed.items() if s >= onset and not math.isfinite(v)]
    if bad:
        return DIVERGED, {"first_non_finite_step": min(bad)}
    end = min(last + K, max(perturbed) - 2)
    excess = {}
    for t in range(onset, end + 1):
        p, c = smoothed(perturbed, t), smoothed(clean, t)
        if p is not None and c is not None:
            excess[t] = p / c - 1.0
    peak_t = max(excess, key=excess.get)
    info = {"peak_excess": round(excess[peak_t], 4), "peak_step": peak_t}
    after = [t for t in excess if t > last]
    back = [t for t in after if excess[t] <= TOLERANCE]
    if after and not back:
        return DIVERGED, {**info, "excess_at_end": round(excess[after[-1]], 4)}
    if all(e <= TOLERANCE for e in excess.values()):
        return NO_EFFECT, info
    first_back = min(back) if back else last
    return RECOVERED, {**info, "back_in_band_step": first_back, "steps_to_recover": first_back - onset}
