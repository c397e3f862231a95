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

A second rule, **band** (`band_label`, `score --label band`), reads "back in band" as the issue
words it ("an LR x100 spike ... is routinely back in band after 20-40 steps by itself"): the
run's own band, no twin. With m the median of the finite losses of the BAND_BASELINE steps
before the onset and the same 5-step rolling median s(P, t): *diverged* on a non-finite loss at
or after the onset, or if s(P, t) > m * (1 + BAND_TOLERANCE) for every t in [last + 1, last + K];
*no_effect* if never above it in [onset, last + K]; *recovered* otherwise. It is blind to work
lost: a run back at its pre-onset level while its twin went on falling is benign under it (the
twin rule calls that diverged), so the two rules disagree on such "soft" divergences; the
README prints both tables.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

K = 40
TOLERANCE = 0.05
BAND_TOLERANCE = 0.10  # the "median*1.10"
BAND_BASELINE = 20  # steps before the onset whose median is the band's centre
DIVERGED, RECOVERED, NO_EFFECT = "diverged", "recovered", "no_effect"


def load_curve(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(lines: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in lines if "kind" not in r}


def smoothed(loss: dict[int, float], t: int) -> float | None:
    vals = sorted(v for s in range(t - 2, t + 3) if math.isfinite(v := loss.get(s, math.nan)))
    return vals[len(vals) // 2] if vals else None


def _non_finite_after(perturbed: dict[int, float], onset: int) -> list[int]:
    return [s for s, v in perturbed.items() if s >= onset and not math.isfinite(v)]


def _classify(excess: dict[int, float], onset: int, last: int, tol: float) -> tuple[str, dict]:
    """Shared tail of both rules: excess[t] over [onset, end] against the tolerance."""
    peak_t = max(excess, key=excess.get)
    info = {"peak_excess": round(excess[peak_t], 4), "peak_step": peak_t}
    after = [t for t in excess if t > last]
    back = [t for t in after if excess[t] <= tol]
    if after and not back:
        return DIVERGED, {**info, "excess_at_end": round(excess[after[-1]], 4)}
    if all(e <= tol for e in excess.values()):
        return NO_EFFECT, info
    first_back = min(back) if back else last
    return RECOVERED, {**info, "back_in_band_step": first_back, "steps_to_recover": first_back - onset}


def band_label(perturbed: dict[int, float], onset: int, last: int) -> tuple[str, dict]:
    """(label, measurements) under the band rule (module docstring): no twin needed."""
    bad = _non_finite_after(perturbed, onset)
    if bad:
        return DIVERGED, {"first_non_finite_step": min(bad)}
    base = sorted(v for s in range(onset - BAND_BASELINE, onset) if math.isfinite(v := perturbed.get(s, math.nan)))
    if not base:
        raise ValueError(f"no finite loss in the {BAND_BASELINE} steps before onset {onset}")
    m = base[len(base) // 2]
    end = min(last + K, max(perturbed) - 2)
    excess = {t: v / m - 1.0 for t in range(onset, end + 1) if (v := smoothed(perturbed, t)) is not None}
    return _classify(excess, onset, last, BAND_TOLERANCE)


def label(perturbed: dict[int, float], clean: dict[int, float], onset: int, last: int) -> tuple[str, dict]:
    """(label, measurements) for one event; see the module docstring for the rule."""
    bad = _non_finite_after(perturbed, onset)
    if bad:
        return DIVERGED, {"first_non_finite_step": min(bad)}
    end = min(last + K, max(perturbed) - 2)
    excess = {}
    for t in range(onset, end + 1):
        p, c = smoothed(perturbed, t), smoothed(clean, t)
        if p is not None and c is not None:
            excess[t] = p / c - 1.0
    return _classify(excess, onset, last, TOLERANCE)
