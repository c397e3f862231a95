"""Loss spikes: tolerate one that recovers, act on one that does not, act on a cluster.

The lesson (LLM-jp, docs/architecture.md §1): a single spike usually comes back down by itself, many
overlapping spikes kill the run. So a spike is judged against a robust baseline (median
and robust scale of the last `window` healthy losses, see robust.py) and must clear two
bars: a robust z-score above `z_threshold` *and* a relative jump above `min_relative_jump`
over the median. The z-score alone would fire on tiny bumps of a very smooth curve; the
relative jump alone would fire on noisy small models. Losses below the median never count
and the scale ignores trends, so the steep early drop is silent; nothing is judged before
`warmup` samples.

Life of a spike (measured on bench/detection, see the README's decision section):
- onset: `loss_spike` (warning). If at the onset the loss is at least `severe_loss_ratio` x
  its median *and* the pre-clip grad norm at least `severe_grad_ratio` x the median norm, it
  is a blow-up, not a spike: `divergence` at once (cause "severe"). On the benchmark's curves
  a blow-up of both is never back in band within 40 steps; a spike of the loss alone often is.
- if at the onset the grad norm had been rising: the median of the last `drift_window`
  healthy grad norms at least `drift_grad_ratio` x the median of the `drift_window` before
  them, the spike is the end of a drift, not a one-off: whatever has been growing the
  updates (an LR ramp, a data shift) is still acting and the spike does not go away by
  itself -> `divergence` at once (cause "drift"). Training shrinks the grad norm, so a clean
  run never rises like that (tuning half: at most 1.15x on clean runs, at most 0.98x at the
  onset of every benign spike; 1.6x at a held x100 LR drift that never came back in band).
- back under median·(1 + `recovery_tolerance`) at any time -> `spike_recovered` (info),
  unless it is a *landing that kept the damage* (below). That median is frozen at the onset
  and, on a falling curve, it is the level of ~window/2 steps before the onset: a loose bar.
  For a spike that decays gradually that looseness is harmless (the weights are still
  healing; the level is not final). But a spike that drops back in one step (the step
  removes at least `landing_fraction` of the spike's peak excess over the median) had a
  transient cause that just ended (a run of corrupt batches, a bad shard): the level it
  lands on is what the weights kept. It is judged against the pre-spike *trend*: a
  Theil-Sen fit of log(loss) on log(step) over the baseline at the onset (a power law, the
  shape of a training curve; never rising), extrapolated to the landing step, at most
  `trend_horizon` steps past the last baseline loss. Landed more than `landing_tolerance`
  (relative) above it -> `divergence` (cause "landed_high"). Why the trend and not a level:
  during a 10-step spike the clean curve keeps falling (17 % on the benchmark's 6-layer
  model), so the frozen median ×1.10 called a landing 32 % above the clean twin
  "recovered", and the run stayed 9-15 % above its twin. Why only landings and only near
  the onset: the power-law forecast is good to about ±5-10 % at 10 steps and ±20-50 % at
  40 (bench/detection tuning clean runs), so it cannot judge a slow decay 40 steps out.
  A landing is also a divergence, wherever it lands, when the spike's summed excess over the
  median (sum of loss/median - 1 over its steps, each step counting at most 1: one corrupt batch,
  however high its loss, is one step of damage) reached `landing_damage` (cause
  "landed_after_damage"): ten steps of fully corrupt batches landed *on* the forecast trend
  (the forecast was 6 % above the twin there) and the run then stayed 9 % above its twin;
  tuning half: benign landings at most 1.9, the diverged ones 6.8 and 11.5.
- not back after `patience_steps` -> `slow_recovery` (warning, once per spike): the policy
  cools the LR and watches. An LR x100 spike of 1-3 steps on these models routinely takes
  20-40 steps to come back by itself, so a fixed short deadline rolls back good work. Unless
  the level there (mean of the last `level_window` losses) is still at least
  `stuck_level_ratio` x the median while the grad norm there (median of the last
  `stuck_grad_window`) is still at least `stuck_grad_ratio` x its pre-spike median (cause
  "stuck_high"): the update threw the weights out of their basin (tuning half: benign slow
  recoveries at most 2.17x at patience, the diverged ones 2.94x and more). The gradient test
  is what tells weights from data: ten fully corrupt batches sat 2.6x and 4.8x above the
  median at patience with grad norms already back at 0.9x and 2.8x, and came back by
  themselves; every LR blow-up the rule caught still had 9.6-19x.
- while it stays out, a sustained level test: once `level_window` steps after patience have
  passed (the cooled LR had time to act; one step later an oscillating loss tripped the test
  on a spike that came back by itself), if the mean of the last `level_window` usable losses
  is above the level at patience by more than `worsening_tolerance` (relative), the spike is
  getting worse -> `divergence` (cause "worsening"); not back by onset + `recovery_steps`
  -> `divergence` (cause "no_recovery").
- an off-schedule LR burst (lr_burst.py) that ended at most 2 steps before the onset or
  after it, and moved the weights at least `burst_displacement` extra normal steps ->
  `divergence` (cause "lr_burst", onset = the burst's first step if it came first): the
  tiny model's x100 10-step bursts came back into the onset's band by themselves and stayed
  20-80 % above their twins; on the loss and grad curves they look like benign slow decays.
Independently, `cluster_size` onsets within `cluster_window_steps` -> `divergence` (cause
"cluster", onset = first spike of the cluster).

Strict rules (`strict`, off by default): the drift end, `landed_high`, `landed_after_damage`,
`stuck_high` and `lr_burst` above roll back spikes that come back into their band by themselves but
probably left the run behind where it would have been (against a clean twin). Off, such a spike is
recorded as recovered (a landing), or cooled at patience (stuck high, a burst, a drift end) and rolled
back only if it gets worse or is not back by `recovery_steps`: on bench/detection, all 35 events
that never came back into their band are caught without them, at delay 1 (README, sixth round).

What feeds the baseline: finite losses of steps whose update was applied, and not the
losses of an open spike. Skipped-update and non-finite records are ignored for the baseline
and cannot open a spike, but they do count toward a spike's recovery deadline (the clock is
the step number). After a divergence the baseline restarts (the level changed; this keeps
an advisory run from re-raising the same divergence every few steps); `rewind(step)`
restores the baseline that held at a checkpoint after a rollback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

from supervisor.detect.findings import (CRITICAL, DIVERGENCE, INFO, LOSS_SPIKE, SLOW_RECOVERY,
                                        SPIKE_RECOVERED, WARNING, Finding, json_safe)
from supervisor.detect.lr_burst import Burst, LrBurstTracker
from supervisor.detect.robust import RollingWindow, median, theil_sen
from supervisor.config_types import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, doc


@dataclass
class _OpenSpike:
    onset: int
    median: float
    peak: float
    peak_step: int
    recent: list[float] = field(default_factory=list)  # usable losses since the onset
    grad_median: float | None = None  # the healthy grad-norm median at the onset
    grad_ratios: list[float] = field(default_factory=list)  # grad norm / grad_median since the onset
    level_at_patience: float | None = None  # mean of the last level_window losses at patience
    trend: "_Trend | None" = None  # the pre-spike trend, frozen at the onset


@dataclass(frozen=True)
class _Trend:
    """log(loss) = intercept + slope * log(step), fitted on the baseline at a spike's onset."""

    intercept: float
    slope: float
    last_step: int  # the newest baseline sample: extrapolation counts from here

    @classmethod
    def fit(cls, samples: list[tuple[int, float]]) -> "_Trend | None":
        pts = [(s, v) for s, v in samples if s > 0 and v > 0 and math.isfinite(v)]
        if len({s for s, _ in pts}) < 2:
            return None
        xs, ys = [math.log(s) for s, _ in pts], [math.log(v) for _, v in pts]
        slope = min(theil_sen(xs, ys)[1], 0.0)  # never forecast a rise; the intercept fits the clamped slope
        return cls(intercept=median([y - slope * x for x, y in zip(xs, ys)]), slope=slope,
                   last_step=max(s for s, _ in pts))

    def expected(self, step: int, horizon: int) -> float:
        return math.exp(self.intercept + self.slope * math.log(min(step, self.last_step + horizon)))


class LossSpikeDetector:
    @dataclass
    class Config:
        #: 20, not 50 (bench/detection tuning half): early in a run the median of 50 losses lags the
        #: falling curve so far that an LR x100 blow-up over 10 steps never cleared the 20 % bar
        strict: Annotated[bool, doc(
            "also roll back spikes that come back into the band by themselves but probably left the "
            "run behind where it would have been (README, 'Strict rules'): the end of a drift, a "
            "one-step landing high above the trend or after long damage, stuck high at patience, an "
            "off-schedule LR burst. Off by default: measured on bench/detection, they roll back 18 of "
            "140 events that came back into their own band within 40 steps, and catch no divergence "
            "of that kind the other rules miss")] = False
        window: Annotated[PositiveInt, doc("healthy losses in the rolling baseline")] = 20
        warmup: Annotated[PositiveInt, doc(
            "baseline samples needed before anything is judged (covers the first steep drop)")] = 20
        z_threshold: Annotated[PositiveFloat, doc(
            "robust z-score ((loss - median) / robust scale) a spike must exceed ...")] = 6.0
        min_relative_jump: Annotated[NonNegativeFloat, doc(
            "... and its relative height over the median (0.2 = 20 % above)")] = 0.20
        severe_loss_ratio: Annotated[PositiveFloat, doc(
            "a spike whose loss is at least this multiple of the median ...")] = 1.5
        severe_grad_ratio: Annotated[PositiveFloat, doc(
            "... while the grad norm is at least this multiple of its median is a divergence at once")] = 20.0
        drift_window: Annotated[PositiveInt, doc(
            "grad norms per half of the drift test (at most half of `window`, which holds both halves)")] = 10
        drift_grad_ratio: Annotated[PositiveFloat, doc(
            "a spike whose recent grad-norm median is at least this multiple of the one before it ends "
            "a drift: a divergence at once")] = 1.3
        patience_steps: Annotated[PositiveInt, doc(
            "steps after the onset without recovery before `slow_recovery` (the LR is cooled)")] = 5
        level_window: Annotated[PositiveInt, doc(
            "losses averaged by the sustained-level (worsening) test")] = 5
        worsening_tolerance: Annotated[NonNegativeFloat, doc(
            "after patience, a level this much (relative) above the level at patience is a divergence")] = 0.05
        recovery_steps: Annotated[PositiveInt, doc(
            "steps after the onset within which the loss must come back, else divergence")] = 40
        recovery_tolerance: Annotated[NonNegativeFloat, doc(
            "'back' means loss <= median_at_onset * (1 + recovery_tolerance)")] = 0.10
        landing_fraction: Annotated[Fraction, doc(
            "a return to the band is a landing when that one step removed at least this fraction of the "
            "spike's peak excess over the median (the spike's cause ended at once)")] = 0.5
        landing_tolerance: Annotated[NonNegativeFloat, doc(
            "a landing more than this (relative) above the pre-spike trend extrapolated to that step "
            "kept the damage: a divergence")] = 0.20
        landing_damage: Annotated[NonNegativeFloat, doc(
            "a landing after a spike whose summed excess over the median (sum of loss/median - 1 over "
            "its steps, at most 1 per step) reached this is a divergence even on the trend: the weights "
            "trained that long on what caused it")] = 4.0
        stuck_level_ratio: Annotated[PositiveFloat, doc(
            "at patience, a level at least this multiple of the median is a divergence, not a slow "
            "recovery: the update threw the weights out of their basin ...")] = 2.5
        stuck_grad_ratio: Annotated[PositiveFloat, doc(
            "... if the grad norm there (median of the last `stuck_grad_window`) is still at least this "
            "multiple of the pre-spike median: a high loss with ordinary gradients measures the batches, "
            "not the weights")] = 5.0
        stuck_grad_window: Annotated[PositiveInt, doc("grad norms in that median")] = 3
        burst_displacement: Annotated[PositiveFloat, doc(
            "a spike during or right after an off-schedule LR burst that moved the weights at least this "
            "many extra normal steps (lr_burst.py) is a divergence")] = 600.0
        lr_burst: LrBurstTracker.Config = field(default_factory=LrBurstTracker.Config)
        trend_horizon: Annotated[PositiveInt, doc(
            "steps past the last pre-spike loss the trend is extrapolated; later landings are judged "
            "against its value there (a looser bar: the curve keeps falling)")] = 20
        cluster_size: Annotated[PositiveInt, doc("this many spike onsets ...")] = 3
        cluster_window_steps: Annotated[PositiveInt, doc(
            "... within this many steps (last onset - first onset < this) are a divergence")] = 50
        history: Annotated[PositiveInt, doc(
            "older baseline samples kept so a rollback can restore the baseline at a checkpoint")] = 4096

    def __init__(self, config: "LossSpikeDetector.Config | None" = None) -> None:
        self.config = config or LossSpikeDetector.Config()
        c = self.config
        self._window = RollingWindow(c.window, history=c.history)
        self._grads = RollingWindow(c.window, history=c.history)
        self._open: _OpenSpike | None = None
        self._onsets: list[int] = []
        self._bursts = LrBurstTracker(c.lr_burst)
        self._last_burst: Burst | None = None

    @property
    def open_spike_onset(self) -> int | None:
        return None if self._open is None else self._open.onset

    def reset(self) -> None:
        """Cold start: forget the baseline, any open spike and past onsets."""
        self._window.clear()
        self._grads.clear()
        self._open = None
        self._onsets = []
        self._bursts.reset()
        self._last_burst = None

    def rewind(self, to_step: int) -> None:
        """After a rollback to checkpoint `to_step`: the baseline and spike history as of then."""
        self._window.rewind(to_step)
        self._grads.rewind(to_step)
        self._open = None
        self._onsets = [s for s in self._onsets if s <= to_step]
        self._bursts.drop_open()  # the schedule's peak still holds; the steps after to_step did not happen
        self._last_burst = None

    def restart_baseline(self) -> None:
        """The level changed (a divergence was declared): judge from a fresh baseline."""
        self._window.restart()
        self._grads.restart()
        self._open = None
        self._onsets = []
        self._last_burst = None

    def observe(self, record) -> list[Finding]:
        c = self.config
        step, loss, t = record.step, record.loss, record.wall_time
        usable = math.isfinite(loss) and not record.update_skipped
        if c.strict:  # only the strict lr_burst rule reads bursts: no tracking otherwise
            # a record without an LR (an older or foreign telemetry source) just has no bursts
            burst = self._bursts.observe(step, getattr(record, "lr", math.nan), getattr(record, "lr_scale", 1.0),
                                         record.update_skipped)
            if burst is not None:
                self._last_burst = burst
        if self._open is not None:
            return self._follow_open_spike(step, loss, t, usable, record.grad_norm)
        if not usable:
            return []
        if len(self._window) >= c.warmup:
            med, scale = self._window.stats()
            z = (loss - med) / scale
            rel = (loss - med) / max(abs(med), 1e-12)
            if z > c.z_threshold and rel > c.min_relative_jump:
                return self._open_spike(record, med, scale, z, rel)
        self._window.add(step, loss)
        self._add_grad(record)
        return []

    def _add_grad(self, record) -> None:
        if math.isfinite(record.grad_norm):
            self._grads.add(record.step, record.grad_norm)

    def _grad_ratio(self, grad_norm: float) -> float | None:
        if len(self._grads) == 0 or not math.isfinite(grad_norm):
            return None
        med = self._grads.stats()[0]
        return grad_norm / med if med > 0 else None

    def _drift_ratio(self) -> float | None:
        """Median of the last `drift_window` grad norms over the median of the ones before them."""
        w = min(self.config.drift_window, self.config.window // 2)
        grads = self._grads.values()
        if w < 1 or len(grads) < 2 * w:
            return None
        before, recent = median(grads[-2 * w:-w]), median(grads[-w:])
        return recent / before if before > 0 else None

    def _open_spike(self, record, med, scale, z, rel) -> list[Finding]:
        c = self.config
        step, loss, t = record.step, record.loss, record.wall_time
        grad_ratio = self._grad_ratio(record.grad_norm)
        self._open = _OpenSpike(onset=step, median=med, peak=loss, peak_step=step, recent=[loss],
                                trend=_Trend.fit(self._window.samples()),
                                grad_median=self._grads.stats()[0] if len(self._grads) else None,
                                grad_ratios=[] if grad_ratio is None else [grad_ratio])
        evidence = {"loss": loss, "median": med, "scale": scale, "z": round(z, 3),
                    "relative_jump": round(rel, 4), "window": len(self._window),
                    "grad_norm": record.grad_norm,
                    "grad_ratio": None if grad_ratio is None else round(grad_ratio, 3),
                    "patience_steps": c.patience_steps, "recovery_steps": c.recovery_steps}
        out = [Finding(kind=LOSS_SPIKE, step=step, severity=WARNING, wall_time=t, evidence=evidence)]
        if loss >= c.severe_loss_ratio * med and grad_ratio is not None and grad_ratio >= c.severe_grad_ratio:
            out.append(Finding(
                kind=DIVERGENCE, step=step, severity=CRITICAL, wall_time=t,
                evidence={"cause": "severe", "onset_step": step, "loss": loss, "median": med,
                          "loss_ratio": round(loss / med, 3), "severe_loss_ratio": c.severe_loss_ratio,
                          "grad_norm": record.grad_norm, "grad_ratio": round(grad_ratio, 3),
                          "severe_grad_ratio": c.severe_grad_ratio}))
            self.restart_baseline()
            return out
        drift = self._drift_ratio() if c.strict else None
        if drift is not None and drift >= c.drift_grad_ratio:
            out.append(Finding(
                kind=DIVERGENCE, step=step, severity=CRITICAL, wall_time=t,
                evidence={"cause": "drift", "onset_step": step, "loss": loss, "median": med,
                          "loss_ratio": round(loss / med, 3), "grad_drift_ratio": round(drift, 3),
                          "drift_grad_ratio": c.drift_grad_ratio, "drift_window": c.drift_window}))
            self.restart_baseline()
            return out
        burst = self._burst_divergence(self._open, step, t, loss, True)
        if burst:
            return out + burst
        self._onsets = [s for s in self._onsets if step - s < c.cluster_window_steps] + [step]
        if len(self._onsets) >= c.cluster_size:
            onsets = list(self._onsets)
            out.append(Finding(
                kind=DIVERGENCE, step=step, severity=CRITICAL, wall_time=t,
                evidence={"cause": "cluster", "onset_step": onsets[0], "spike_steps": onsets,
                          "cluster_window_steps": c.cluster_window_steps, "median": med,
                          "peak": loss},
            ))
            self.restart_baseline()
        return out

    def _follow_open_spike(self, step, loss, t, usable, grad_norm) -> list[Finding]:
        c = self.config
        sp = self._open
        assert sp is not None
        if sp.grad_median and math.isfinite(grad_norm):
            sp.grad_ratios.append(grad_norm / sp.grad_median)
        burst = self._burst_divergence(sp, step, t, loss, usable)
        if burst:
            return burst
        if usable and loss <= sp.median * (1.0 + c.recovery_tolerance):
            landed = self._landed_high(sp, step, loss, t) if c.strict else None
            if landed is not None:
                return landed
            self._open = None
            self._window.add(step, loss)
            return [Finding(
                kind=SPIKE_RECOVERED, step=step, severity=INFO, wall_time=t,
                evidence={"onset_step": sp.onset, "peak": sp.peak, "peak_step": sp.peak_step,
                          "steps_to_recover": step - sp.onset, "loss": loss,
                          "median": sp.median},
            )]
        if usable:
            sp.recent.append(loss)
            if loss > sp.peak:
                sp.peak, sp.peak_step = loss, step
        age = step - sp.onset
        if age < c.patience_steps:
            return []
        level = sum(sp.recent[-c.level_window:]) / len(sp.recent[-c.level_window:])
        if sp.level_at_patience is None:
            sp.level_at_patience = level
            grads = median(sp.grad_ratios[-c.stuck_grad_window:]) if sp.grad_ratios else None
            if (c.strict and level >= c.stuck_level_ratio * sp.median and grads is not None
                    and grads >= c.stuck_grad_ratio):
                return self._diverge(sp, step, t, loss, usable, {
                    "cause": "stuck_high", "level": level, "level_ratio": round(level / sp.median, 3),
                    "stuck_level_ratio": c.stuck_level_ratio, "grad_ratio": round(grads, 3),
                    "stuck_grad_ratio": c.stuck_grad_ratio, "patience_steps": c.patience_steps})
            return [Finding(
                kind=SLOW_RECOVERY, step=step, severity=WARNING, wall_time=t,
                evidence={"onset_step": sp.onset, "loss": json_safe(loss), "median": sp.median,
                          "level": level, "band": sp.median * (1.0 + c.recovery_tolerance),
                          "peak": sp.peak, "patience_steps": c.patience_steps, "level_window": c.level_window,
                          "worsening_tolerance": c.worsening_tolerance,
                          "recovery_steps": c.recovery_steps})]
        cause = None
        # judged on a level made only of steps after patience (after the LR was cooled there):
        # one step later the cool has not acted yet, and an oscillating loss trips it at once
        if age >= c.patience_steps + c.level_window and level > sp.level_at_patience * (1.0 + c.worsening_tolerance):
            cause = "worsening"
        elif age >= c.recovery_steps:
            cause = "no_recovery"
        if cause is None:
            return []
        return self._diverge(sp, step, t, loss, usable, {
            "cause": cause, "level": level, "level_at_patience": sp.level_at_patience,
            "worsening_tolerance": c.worsening_tolerance, "recovery_steps": c.recovery_steps})

    def _diverge(self, sp: _OpenSpike, step: int, t: float, loss: float, usable: bool,
                 evidence: dict) -> list[Finding]:
        """Declare the open spike a divergence (evidence names the rule) and restart the baseline."""
        finding = Finding(
            kind=DIVERGENCE, step=step, severity=CRITICAL, wall_time=t,
            evidence={"onset_step": sp.onset, "peak": sp.peak, "peak_step": sp.peak_step,
                      "median": sp.median, "loss": json_safe(loss), **evidence})
        self.restart_baseline()
        if usable:
            self._window.add(step, loss)
        return [finding]

    def _burst_divergence(self, sp: _OpenSpike, step: int, t: float, loss: float,
                          usable: bool) -> list[Finding]:
        """The open spike came with an off-schedule LR burst that moved the weights too far to
        come back by themselves (lr_burst.py): ended at most 2 steps before the onset (a step's
        update shows in the next step's loss) or after it. The divergence's onset is the burst's
        first step if that came first, so the rollback lands before any of its updates."""
        b = self._last_burst
        if b is None or b.end < sp.onset - 2 or b.displacement < self.config.burst_displacement:
            return []
        # the onset is the burst's first step when it came first: the rollback target must predate it
        return self._diverge(sp, step, t, loss, usable, {
            "cause": "lr_burst", "onset_step": min(sp.onset, b.start), "spike_onset_step": sp.onset,
            **b.evidence(), "burst_displacement_bar": self.config.burst_displacement})

    def _landed_high(self, sp: _OpenSpike, step: int, loss: float, t: float) -> list[Finding] | None:
        """A one-step return to the band that lands well above the pre-spike trend: the
        transient cause ended and the weights kept the damage (see the module docstring)."""
        c = self.config
        prev = sp.recent[-1]
        if sp.trend is None or prev - loss < c.landing_fraction * (sp.peak - sp.median):
            return None
        expected = sp.trend.expected(step, c.trend_horizon)
        # each step counts at most 1: the loss *on* a corrupt batch measures the batch, not the
        # weights, so one step of garbage, however high its loss, is one step of damage
        damage = sum(min(1.0, max(0.0, v / sp.median - 1.0)) for v in sp.recent)
        landing = {"previous_loss": prev, "expected": round(expected, 6),
                   "landing_ratio": round(loss / expected, 4), "damage": round(damage, 3),
                   "spike_steps": step - sp.onset}
        if loss > expected * (1.0 + c.landing_tolerance):
            return self._diverge(sp, step, t, loss, True, {
                "cause": "landed_high", **landing, "landing_tolerance": c.landing_tolerance,
                "trend_slope": round(sp.trend.slope, 4), "trend_from_step": sp.trend.last_step,
                "trend_horizon": c.trend_horizon})
        if damage >= c.landing_damage:
            return self._diverge(sp, step, t, loss, True, {
                "cause": "landed_after_damage", **landing, "landing_damage": c.landing_damage})
        return None
