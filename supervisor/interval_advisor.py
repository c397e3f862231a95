"""Adaptive checkpoint interval: when to change how often the trainer saves.

The formula is pure (`supervisor.checkpoint_interval`); this part gathers its inputs — the
measured save cost (median of the journal's recent saves: the trainer's `checkpoint_saved.seconds`,
i.e. the training stall — with `[checkpoints] async_mode` the staging copy, not the background write), the MTBF observed in the journal's
failure incidents (a configured prior until the first failure) and the median step time — exports
the recommendation, and says when the live trainer's interval should change (``checkpoints.adaptive``,
with `checkpoints.interval_hysteresis` (±20%) so the estimate's noise does not churn the trainer).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from supervisor.checkpoint_interval import IntervalRecommendation, mtbf_from_failures, recommend_interval_steps
from supervisor.model_table import PRESET_TRAINING


@dataclass(frozen=True)
class IntervalChange:
    steps: int
    reason: str
    params: dict  # journaled with the action
    directive: dict  # the trainer directive


class IntervalAdvisor:
    def __init__(self, config, configured_interval: int | None, preset: str, journal, metrics) -> None:
        self.config = config  # settings.checkpoints
        preset_cfg = PRESET_TRAINING.get(preset)
        self.current: int | None = configured_interval or (preset_cfg.checkpoint_interval if preset_cfg else None)
        self.recommended: IntervalRecommendation | None = None
        self._journal, self._metrics = journal, metrics
        if self.current:
            metrics.set_checkpoint_interval(self.current)

    def recommend(self, step_times: list[float], first_start: float | None, now: float, *,
                  may_apply: bool) -> IntervalChange | None:
        """Recompute after a save; the change to apply now, if any."""
        c = self.config
        fh = self._journal.failure_history()
        if not fh.save_seconds or not step_times:
            return None
        since = fh.observed_since or first_start or now - 1
        mtbf = mtbf_from_failures(fh.failure_times, since, max(now, since + 1e-3), prior_mtbf_s=c.mtbf_prior_hours * 3600)
        rec = recommend_interval_steps(statistics.median(fh.save_seconds), mtbf, statistics.median(step_times),
                                       min_steps=c.min_interval_steps, max_steps=c.max_interval_steps)
        self.recommended = rec
        self._metrics.set_recommended_checkpoint_interval(rec.steps)
        was = self.current
        if not c.adaptive or not may_apply:
            return None
        if was is not None and abs(rec.steps - was) <= c.interval_hysteresis * was:
            return None
        reason = (f"Young/Daly: {rec.formula} with C={rec.inputs['save_cost_s']:.3g}s, "
                  f"MTBF={rec.inputs['mtbf_s']:.4g}s, step={rec.inputs['step_seconds']:.3g}s "
                  f"-> every {rec.steps} steps (was {was})")
        self.current = rec.steps
        self._metrics.set_checkpoint_interval(rec.steps)
        return IntervalChange(rec.steps, reason, {"steps": rec.steps, "was": was, "inputs": rec.inputs},
                              {"kind": "set_checkpoint_interval", "n": rec.steps})

    def view(self) -> dict | None:
        r = self.recommended
        if r is None:
            return None
        return {"steps": r.steps, "seconds": r.seconds, "formula": r.formula, "inputs": r.inputs,
                "clamped": r.clamped}
