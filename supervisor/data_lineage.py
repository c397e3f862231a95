"""Which data the run's current trajectory skipped after each checkpoint.

Why: a rollback skips a bad data window by draining batches after it loads a checkpoint. A
later load of that checkpoint (or of an older one) starts from the checkpoint's own data
position, from *before* the skip, so the bad window comes back unless the skip is carried
over. Seen on a goodput run: a rollback to step 12 skipped 54 batches past a spike; a NaN batch
then poisoned the weights at step 26, the next rollback to step 12 skipped 24 batches counted
from step 12's position and the NaN batch returned at step 56, and again at step 26, until the
region's budget stopped the run. The same happens to a cold restart from a checkpoint older
than a skip.

The trajectory's loads, in the order they happened (every generation's `load_step` and
`skip_batches`, every hot rollback's target and skip), fold into the skips still in effect: a
load of checkpoint C rewinds the run to C, so skips made after C (at a checkpoint at or after
C) are undone by it and must be repeated. `carried_skip(loads, C)` is what must be repeated.

Pure: no I/O, no clock. Failure model: skips are per-rank batches; across a reshard that changes
the batches per step, a carried count is in the old unit (the README says so).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """One load of the trajectory: a checkpoint step (None: from scratch) and the batches drained after it."""

    step: int | None
    skip_batches: int = 0


def active_skips(loads: Iterable[Load]) -> list[tuple[int, int]]:
    """(checkpoint step, batches skipped after it) still in effect after these loads, oldest first."""
    active: list[tuple[int, int]] = []
    for load in loads:
        at = load.step or 0
        active = [(s, k) for s, k in active if load.step is not None and s < at]
        if load.skip_batches > 0:
            active.append((at, load.skip_batches))
    return active


def carried_skip(loads: Iterable[Load], load_step: int | None) -> int:
    """Batches the current trajectory skipped after checkpoint `load_step`: what a new load of it
    must skip again to train on the same data (0 from scratch)."""
    if load_step is None:
        return 0
    return sum(k for s, k in active_skips(loads) if s >= load_step)
