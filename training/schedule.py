"""The LR multiplier the trainer applies: a WSD schedule times a supervisor-controlled scale.

WSD (warmup-stable-decay) lets the decay start at any step, so "start the decay now" and
"extend the run" change training length without a restart (docs/architecture.md §1 "Lessons"). The scale is
what the supervisor turns down after repeated instabilities (OPT-style), optionally with a
linear ramp so the change (or a re-warm after a rollback) is gradual.

Both are pure functions of the step number plus a little state; every rank holds the same
state because directives are applied at the same step boundary on every rank. The schedule's
state is checkpointed with the train state; the scale is not (the supervisor passes it at
start and on every rollback, so a checkpoint never silently carries an old cool-down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class WSDSchedule:
    warmup_steps: int
    total_steps: int
    decay_steps: int
    decay_type: str = "linear"  # linear | sqrt | cosine
    min_lr_factor: float = 0.0
    decay_start: int | None = None  # None: total_steps - decay_steps

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.total_steps < 1 or self.decay_steps < 0:
            raise ValueError(f"invalid WSD schedule {self}")
        if self.decay_type not in ("linear", "sqrt", "cosine"):
            raise ValueError(f"unknown decay_type {self.decay_type!r}")

    @property
    def effective_decay_start(self) -> int:
        if self.decay_start is not None:
            return self.decay_start
        return max(self.warmup_steps, self.total_steps - self.decay_steps)

    def factor(self, step: int) -> float:
        """Multiplier for the optimizer step numbered ``step`` (1-based, as torchtitan counts)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return step / (self.warmup_steps + 1)
        start = self.effective_decay_start
        if step <= start:
            return 1.0
        length = max(1, self.total_steps - start)
        progress = min(1.0, (step - start) / length)
        if self.decay_type == "linear":
            decayed = 1.0 - progress
        elif self.decay_type == "sqrt":
            decayed = 1.0 - math.sqrt(progress)
        else:
            decayed = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * decayed

    def decay_now(self, step: int, decay_steps: int | None = None) -> None:
        """Start the decay after ``step``; the run then ends after ``decay_steps`` more steps."""
        length = self.decay_steps if decay_steps is None else decay_steps
        if length < 1:
            raise ValueError("decay length must be >= 1 step")
        self.decay_start = step
        self.total_steps = step + length

    def extend(self, total_steps: int, current_step: int) -> None:
        """Make the run ``total_steps`` long; the decay moves with the end unless it has begun."""
        if total_steps <= current_step:
            raise ValueError(f"extend to {total_steps} steps: the run is already at step {current_step}")
        if self.decay_start is not None and current_step > self.decay_start:
            raise ValueError("the decay has already started; extending now would re-raise the LR")
        self.decay_start = None if self.decay_start is None else total_steps - self.decay_steps
        self.total_steps = total_steps

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "decay_start": -1 if self.decay_start is None else self.decay_start}

    def load_state_dict(self, sd: dict) -> None:
        self.total_steps = int(sd["total_steps"])
        ds = int(sd["decay_start"])
        self.decay_start = None if ds < 0 else ds


@dataclass
class LrScale:
    """A scale that moves linearly from ``start`` to ``target`` over ``ramp_steps`` after ``at_step``."""

    target: float = 1.0
    start: float = 1.0
    at_step: int = 0
    ramp_steps: int = 0

    def value(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.at_step + self.ramp_steps:
            return self.target
        if step <= self.at_step:
            return self.start
        frac = (step - self.at_step) / self.ramp_steps
        return self.start + (self.target - self.start) * frac

    def set(self, target: float, ramp_steps: int, at_step: int, start: float | None = None) -> None:
        if not (target > 0 and math.isfinite(target)):
            raise ValueError(f"LR scale must be a positive finite number, got {target}")
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        self.start = self.value(at_step) if start is None else start
        self.target = target
        self.at_step = at_step
        self.ramp_steps = ramp_steps
