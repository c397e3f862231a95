"""The policy: findings -> decisions, a pure function of (finding, run state, history).

It walks the ladder of docs/architecture.md §3; each rung has a budget, and an exhausted budget climbs
to the next rung, ending with "stop, keep everything, page a human":

  rung 1  record          a spike that recovers; straggler, hardware, missing heartbeat,
                          slow convergence (warnings a human should see, no action)
  rung 2  skip_update     a non-finite or blown-up gradient on one step (the trainer guards
                          itself; the decision records it)
          cool_lr         a spike still out of band after `patience_steps` (slow_recovery):
                          scale the LR down by `cool_lr_factor` at once and watch; rewarm_lr
                          brings it back over `rewarm_steps` when the spike recovers. Light:
                          no work is thrown away. At most one cool per spike (the detector
                          says slow_recovery once); never below `min_lr_scale`
  rung 3  rollback        a blow-up of loss and grad norm (severe), a spike at the end of a
                          rising grad norm (drift), a non-finite update that
                          reached the weights (poisoned_update), a spike that keeps getting
                          worse after the cool or does not recover in `recovery_steps`, a
                          cluster, a NaN streak: back to the
                          newest valid checkpoint strictly before the onset, skipping the
                          data window that led into it (PaLM)
          restart         crash / OOM: restart from the newest valid checkpoint, at once after
                          a healthy stretch, with exponential backoff only inside a crash loop
                          (failures within `crash_loop_window_seconds` of the last restart
                          and fewer than `crash_loop_healthy_steps` steps past its checkpoint);
                          kill_restart_hang for a hang (same budget)
  rung 4  rollback_lr_down  divergence again in the same region: roll back and scale the LR
                          down with a re-warm (OPT); a sudden poisoned update (a non-finite
                          gradient out of a normal loss: a batch or hardware) neither
                          triggers this nor counts towards it; repeated OOM -> next safer layout;
                          repeated crashes on one host -> exclude_node (opt-in)
  rung 5  stop_page       budget exhausted, nothing valid to roll back to

No I/O and no clock: "now" is the finding's `wall_time`. The caller owns `History` and adds
each decision it actually carried out (`History.record`), so the same finding and history
always give the same decision, on the daemon and in `replay`. Mode "advise" computes the
same decision flagged `advisory=True` (nothing runs, the history is not extended); mode
"off" only records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Annotated

from supervisor.config_types import Fraction, NonNegativeInt, PositiveInt, Seconds, SecondsOrZero, doc

from supervisor.detect.findings import (DEAD_RANK, DIVERGENCE, GRAD_BLOWUP, HANG, HARDWARE,
                                        LOSS_SPIKE, MISSING_HEARTBEAT, NON_FINITE, OOM,
                                        SLOW_CONVERGENCE, SLOW_RECOVERY, SPIKE_RECOVERED, STRAGGLER,
                                        Finding)

# --- actions and rungs --------------------------------------------------------------------
NONE = "none"
RECORD = "record"
SKIP_UPDATE = "skip_update"
ROLLBACK = "rollback"
ROLLBACK_LR_DOWN = "rollback_lr_down"
RESTART = "restart"
KILL_RESTART_HANG = "kill_restart_hang"
STOP_PAGE = "stop_page"
EXCLUDE_NODE = "exclude_node"
COOL_LR = "cool_lr"
REWARM_LR = "rewarm_lr"
ACTIONS: tuple[str, ...] = (NONE, RECORD, SKIP_UPDATE, COOL_LR, REWARM_LR, ROLLBACK, ROLLBACK_LR_DOWN,
                            RESTART, KILL_RESTART_HANG, STOP_PAGE, EXCLUDE_NODE)
LR_ACTIONS = frozenset({COOL_LR, REWARM_LR})
ROLLBACK_ACTIONS = frozenset({ROLLBACK, ROLLBACK_LR_DOWN})
RESTART_ACTIONS = frozenset({RESTART, KILL_RESTART_HANG, EXCLUDE_NODE})

RUNG_NONE, RUNG_RECORD, RUNG_SKIP, RUNG_ROLLBACK, RUNG_ESCALATE, RUNG_STOP = range(6)

AUTO, ADVISE, OFF = "auto", "advise", "off"
MODES = (AUTO, ADVISE, OFF)


@dataclass(frozen=True)
class Decision:
    """What to do about one finding, with a sentence a human can check it against."""

    action: str
    reason: str
    rung: int
    target_step: int | None = None  # checkpoint step to load (rollback / restart)
    skip_batches: int = 0  # dataloader batches per rank to drain after loading
    lr_scale: float | None = None  # LR scale to run with after the action (None: unchanged)
    ramp_steps: int = 0  # re-warm length for a new lr_scale
    backoff_seconds: float = 0.0  # wait before a restart
    advisory: bool = False  # mode "advise": computed, not carried out
    next_layout: bool = False  # restart with the next safer parallel layout
    node: str | None = None  # exclude_node: the host to drain

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")

    @property
    def acts(self) -> bool:
        """True when the daemon is to carry something out (not advisory, not just a record)."""
        return not self.advisory and self.action not in (NONE, RECORD)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown decision fields {sorted(unknown)}")
        return cls(**d)


@dataclass
class RunState:
    """What the daemon knows about the run when it decides."""

    current_step: int
    generation: int
    valid_checkpoints: list[int] = field(default_factory=list)  # sorted, from the catalog
    last_known_good: int | None = None  # pinned checkpoint step, if the catalog has one
    batches_per_step: int = 1  # dataloader batches per optimizer step per rank
    lr_scale: float = 1.0
    trainer_alive: bool = True
    mode: str = AUTO


@dataclass(frozen=True)
class RollbackEntry:
    onset_step: int
    target_step: int
    wall_time: float
    lr_scale: float
    cause: str = ""
    # False for a divergence that came out of a normal loss (a sudden poisoned update: a bad
    # batch or hardware); only suspects make a later divergence in the region cost LR
    lr_suspect: bool = True


@dataclass(frozen=True)
class RestartEntry:
    wall_time: float
    kind: str
    step: int
    host: str | None = None
    rank: int | None = None
    backoff_seconds: float = 0.0  # the wait this restart was decided with (0 for older journals)
    resume_step: int | None = None  # the checkpoint step it restarted from (None for older journals)


@dataclass(frozen=True)
class CoolEntry:
    """An LR cool (or its rewarm) for the spike with onset `onset_step`."""

    onset_step: int
    wall_time: float
    scale_before: float
    scale_after: float
    action: str = COOL_LR


@dataclass(frozen=True)
class HardwareEntry:
    """A hardware finding naming a host (Xid / ECC log line, an Alertmanager or NVML alert)."""

    wall_time: float
    host: str
    pattern: str = ""


@dataclass
class History:
    """The carried-out actions that budgets count, and the hardware findings per host that
    exclusion counts; rebuilt by the daemon from its journal."""

    rollbacks: list[RollbackEntry] = field(default_factory=list)
    restarts: list[RestartEntry] = field(default_factory=list)
    cools: list[CoolEntry] = field(default_factory=list)
    hardware: list[HardwareEntry] = field(default_factory=list)

    def hardware_on(self, host: str, since: float) -> list[HardwareEntry]:
        return [h for h in self.hardware if h.host == host and h.wall_time >= since]

    def record_hardware(self, finding: Finding, keep: int = 1000) -> None:
        """Count a hardware finding naming a host (whatever was decided about it; the newest `keep`)."""
        host = finding.evidence.get("host")
        if finding.kind == HARDWARE and host:
            self.hardware.append(HardwareEntry(finding.wall_time, str(host), str(finding.evidence.get("pattern", ""))))
            del self.hardware[:-keep]

    def open_cool(self, onset_step: int) -> CoolEntry | None:
        """The cool for this spike's onset that no rewarm has undone yet."""
        for c in reversed(self.cools):
            if c.onset_step == onset_step:
                return c if c.action == COOL_LR else None
        return None

    def rollbacks_near(self, onset_step: int, width: int) -> list[RollbackEntry]:
        """Earlier rollbacks whose onset lies within `width` steps of `onset_step`."""
        return [r for r in self.rollbacks if abs(r.onset_step - onset_step) <= width]

    def restarts_since(self, wall_time: float) -> list[RestartEntry]:
        return [r for r in self.restarts if r.wall_time >= wall_time]

    def crash_loop_length(self, wall_time: float, step: int, window_seconds: float,
                          healthy_steps: int) -> int:
        """How many restarts in a row each failed soon after the one before, without getting healthy.

        Counted back from a failure at (`wall_time`, `step`): the newest restart is part of the loop
        if this failure came within `window_seconds` after that restart was due to start (its
        decision time plus its backoff) *and* the run got fewer than `healthy_steps` steps past the
        checkpoint it resumed from; the one before it if the newest restart's own failure did the
        same; and so on. 0 means the last restart (if any) had a healthy stretch."""
        n, t, s = 0, wall_time, step
        for r in sorted(self.restarts, key=lambda r: r.wall_time, reverse=True):
            soon = r.wall_time <= t and t - (r.wall_time + r.backoff_seconds) <= window_seconds
            progressed = r.resume_step is not None and s - r.resume_step >= healthy_steps
            if not soon or progressed:
                break
            n, t, s = n + 1, r.wall_time, r.step
        return n

    def record(self, finding: Finding, decision: Decision) -> None:
        """Add `decision` if it was carried out and counts against a budget."""
        if decision.advisory:
            return
        if decision.action in ROLLBACK_ACTIONS and decision.target_step is not None:
            self.rollbacks.append(RollbackEntry(
                onset_step=onset_of(finding), target_step=decision.target_step,
                wall_time=finding.wall_time,
                lr_scale=decision.lr_scale if decision.lr_scale is not None else 1.0,
                cause=str(finding.evidence.get("cause", finding.kind)),
                lr_suspect=not sudden(finding)))
        elif decision.action in RESTART_ACTIONS:
            self.restarts.append(RestartEntry(
                wall_time=finding.wall_time, kind=finding.kind, step=finding.step,
                host=finding.evidence.get("host"), rank=finding.rank,
                backoff_seconds=float(decision.backoff_seconds or 0.0), resume_step=decision.target_step))

    def record_lr(self, finding: Finding, decision: Decision, scale_before: float) -> None:
        """Add a carried-out cool_lr / rewarm_lr (light: recorded when decided)."""
        if decision.advisory or decision.action not in LR_ACTIONS or decision.lr_scale is None:
            return
        self.cools.append(CoolEntry(onset_step=onset_of(finding), wall_time=finding.wall_time,
                                    scale_before=scale_before, scale_after=float(decision.lr_scale),
                                    action=decision.action))

    def to_dict(self) -> dict:
        return {"rollbacks": [asdict(r) for r in self.rollbacks],
                "restarts": [asdict(r) for r in self.restarts],
                "cools": [asdict(c) for c in self.cools], "hardware": [asdict(h) for h in self.hardware]}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(rollbacks=[RollbackEntry(**r) for r in d.get("rollbacks", [])],
                   restarts=[RestartEntry(**r) for r in d.get("restarts", [])],
                   cools=[CoolEntry(**c) for c in d.get("cools", [])],
                   hardware=[HardwareEntry(**h) for h in d.get("hardware", [])])


def sudden(finding: Finding) -> bool:
    """A divergence out of a normal loss (a poisoned update with nothing growing before it)."""
    return bool(finding.evidence.get("sudden"))


def onset_of(finding: Finding) -> int:
    return int(finding.evidence.get("onset_step", finding.step))


def _secs(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:g}h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g}min"
    return f"{s:g}s"


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


class Policy:
    @dataclass
    class Config:
        region_width_steps: Annotated[PositiveInt, doc(
            "divergences whose onsets lie within this many steps share a region")] = 250
        max_rollbacks_per_region: Annotated[NonNegativeInt, doc(
            "rollbacks allowed per region (1st plain, later ones with LR down); then stop")] = 3
        max_total_rollbacks: Annotated[NonNegativeInt, doc(
            "rollbacks allowed over the whole run; then stop")] = 20
        #: 2, because the loss recorded at step N is measured on the weights after update N-1:
        #: a spike first seen at step N may already be baked into a checkpoint saved at step N-1.
        min_steps_before_onset: Annotated[NonNegativeInt, doc(
            "the rollback target must be at least this many steps before the onset")] = 2
        data_skip_margin_steps: Annotated[NonNegativeInt, doc(
            "extra steps of data skipped past the onset")] = 10
        lr_scale_factor: Annotated[Fraction, doc(
            "LR scale multiplier on a repeat divergence in one region ...")] = 0.5
        lr_ramp_steps: Annotated[NonNegativeInt, doc(
            "... reached through a linear re-warm of this many steps")] = 100
        min_lr_scale: Annotated[Fraction, doc(
            "a repeat divergence that would push the LR scale below this stops instead")] = 0.05
        max_restarts: Annotated[NonNegativeInt, doc(
            "crash / hang restarts allowed within restart_window_seconds; then stop")] = 5
        restart_window_seconds: Annotated[Seconds, doc(
            "the window max_restarts and the OOM/host counters look back over")] = 3600.0
        backoff_base_seconds: Annotated[SecondsOrZero, doc(
            "a crash loop's restart backoff = min(base * 2**(loop length - 1), max); the first "
            "restart after a healthy stretch is immediate")] = 10.0
        backoff_max_seconds: Annotated[SecondsOrZero, doc("the restart backoff's upper bound")] = 600.0
        crash_loop_window_seconds: Annotated[Seconds, doc(
            "a failure within this many seconds after the previous restart was due to start "
            "(its decision + its backoff) continues a crash loop ...")] = 120.0
        crash_loop_healthy_steps: Annotated[NonNegativeInt, doc(
            "... unless the run got this many steps past the checkpoint that restart resumed from "
            "(a healthy stretch): then the restart is immediate, with no backoff")] = 10
        oom_layout_fallback_after: Annotated[NonNegativeInt, doc(
            "the n-th OOM within the restart window restarts on the next safer layout (0 = never)")] = 2
        exclude_node_after: Annotated[NonNegativeInt, doc(
            "the n-th crash on one host within the window excludes that host (0 = never)")] = 0
        exclude_on_hardware: Annotated[bool, doc(
            "repeated hardware findings naming a host exclude it (else they are recorded)")] = False
        exclude_hardware_after: Annotated[PositiveInt, doc(
            "with exclude_on_hardware: the n-th hardware finding naming one host (distinct patterns or "
            "alerts: each pattern reports once per host and generation) within hardware_window_seconds "
            "excludes it; the ones before are recorded")] = 2
        hardware_window_seconds: Annotated[Seconds, doc(
            "the window exclude_hardware_after counts over")] = 86400.0
        cool_lr_factor: Annotated[Fraction, doc(
            "a spike slow to recover (slow_recovery) multiplies the LR scale by this at once ...")] = 0.5
        rewarm_steps: Annotated[NonNegativeInt, doc(
            "... and once it is back in band the scale returns to its value before the cool over this many steps")] = 50
        fresh_restart_max_step: Annotated[NonNegativeInt, doc(
            "with no valid checkpoint, restart from scratch only below this step; else stop")] = 1000

        def __post_init__(self) -> None:
            if self.backoff_base_seconds > self.backoff_max_seconds:
                raise ValueError(f"backoff_base_seconds {self.backoff_base_seconds} > "
                                 f"backoff_max_seconds {self.backoff_max_seconds}")

    def __init__(self, config: "Policy.Config | None" = None) -> None:
        self.config = config or Policy.Config()

    # --- entry point ------------------------------------------------------------------------
    def decide(self, finding: Finding, state: RunState, history: History) -> Decision:
        if state.mode not in MODES:
            raise ValueError(f"unknown mode {state.mode!r}; expected one of {MODES}")
        d = self._ladder(finding, state, history)
        if state.mode == OFF:
            return Decision(RECORD, f"supervisor is off: recorded only (auto would {d.action}: "
                                    f"{d.reason})", RUNG_RECORD)
        if state.mode == ADVISE and d.action != NONE:
            return replace(d, advisory=True)
        return d

    def rollback_target(self, onset_step: int, state: RunState) -> int | None:
        """Newest valid checkpoint at least `min_steps_before_onset` before the onset.

        The pinned last-known-good step is the fallback when the catalog list has nothing
        suitable (e.g. not yet scanned)."""
        limit = onset_step - self.config.min_steps_before_onset
        cands = [c for c in state.valid_checkpoints if c <= limit]
        if cands:
            return max(cands)
        if state.last_known_good is not None and state.last_known_good <= limit:
            return state.last_known_good
        return None

    # --- the ladder -------------------------------------------------------------------------
    def _ladder(self, f: Finding, state: RunState, history: History) -> Decision:
        ev = f.evidence
        k = f.kind
        if k == LOSS_SPIKE:
            return Decision(RECORD, (
                f"loss spike at step {f.step}: {_fmt(ev.get('loss'))} vs median "
                f"{_fmt(ev.get('median'))} (z={_fmt(ev.get('z'))}); watching for recovery "
                f"within {ev.get('recovery_steps', '?')} steps"), RUNG_RECORD)
        if k == SPIKE_RECOVERED:
            return self._recovered(f, state, history)
        if k == SLOW_RECOVERY:
            return self._cool(f, state, history)
        if k in (NON_FINITE, GRAD_BLOWUP):
            return self._skip_update(f, state)
        if k == DIVERGENCE:
            return self._rollback(f, state, history)
        if k in (DEAD_RANK, OOM, HANG):
            return self._restart(f, state, history)
        if k == HARDWARE and self.config.exclude_on_hardware and ev.get("host"):
            return self._hardware(f, state, history)
        if k in (STRAGGLER, HARDWARE, MISSING_HEARTBEAT, SLOW_CONVERGENCE):
            return Decision(RECORD, f"{self._describe(f)}; recorded for a human", RUNG_RECORD)
        return Decision(NONE, f"no rule for finding kind {k!r}", RUNG_NONE)

    def _hardware(self, f: Finding, state: RunState, history: History) -> Decision:
        """Repeated hardware findings on one host exclude it; one alone is recorded (a single Xid
        line or a flapping alert should not cost a restart)."""
        c, host = self.config, f.evidence["host"]
        n = len(history.hardware_on(host, f.wall_time - c.hardware_window_seconds)) + 1
        if n >= c.exclude_hardware_after:
            return self._restart(replace(f, evidence=dict(f.evidence, hardware_count=n)), state, history)
        return Decision(RECORD, (
            f"{self._describe(f)}; hardware finding {n} on host {host} within "
            f"{_secs(c.hardware_window_seconds)}: recorded (excluded at {c.exclude_hardware_after})"), RUNG_RECORD)

    def _recovered(self, f: Finding, state: RunState, history: History) -> Decision:
        ev = f.evidence
        what = (f"loss spike at step {ev.get('onset_step')} recovered after "
                f"{ev.get('steps_to_recover')} steps (peak {_fmt(ev.get('peak'))}, now "
                f"{_fmt(ev.get('loss'))} <= band of median {_fmt(ev.get('median'))})")
        cool = history.open_cool(onset_of(f))
        if cool is None or not state.trainer_alive:
            return Decision(RECORD, f"{what}; no action", RUNG_RECORD)
        return Decision(REWARM_LR, (
            f"{what}; the LR was cooled to {cool.scale_after:g} for it: re-warming back to "
            f"{cool.scale_before:g} over {self.config.rewarm_steps} steps"), RUNG_SKIP,
            lr_scale=cool.scale_before, ramp_steps=self.config.rewarm_steps)

    def _cool(self, f: Finding, state: RunState, history: History) -> Decision:
        c, ev = self.config, f.evidence
        what = (f"loss spike at step {ev.get('onset_step')} still out of band after "
                f"{ev.get('patience_steps')} steps (level {_fmt(ev.get('level'))} > band "
                f"{_fmt(ev.get('band'))}, median {_fmt(ev.get('median'))})")
        nxt = (f"if the level of the {ev.get('level_window', 5)} steps after this one rises more than "
               f"{_fmt(100 * ev.get('worsening_tolerance', 0))}% above {_fmt(ev.get('level'))}, or it is not back by step "
               f"{onset_of(f) + int(ev.get('recovery_steps', 0))}, the policy rolls back")
        new_scale = state.lr_scale * c.cool_lr_factor
        if not state.trainer_alive:
            return Decision(RECORD, f"{what}; the trainer is not running; {nxt}", RUNG_RECORD)
        if new_scale < c.min_lr_scale:
            return Decision(RECORD, (
                f"{what}; cooling would push the LR scale to {new_scale:g} (< {c.min_lr_scale:g}): "
                f"watching only; {nxt}"), RUNG_RECORD)
        return Decision(COOL_LR, (
            f"{what}; cooling the LR scale {state.lr_scale:g} -> {new_scale:g} at once and "
            f"watching, work kept; {nxt}"), RUNG_SKIP, lr_scale=new_scale, ramp_steps=0)

    def _skip_update(self, f: Finding, state: RunState) -> Decision:
        what = self._describe(f)
        if not state.trainer_alive:
            return Decision(RECORD, f"{what}; the trainer is not running, nothing to skip",
                            RUNG_RECORD)
        if f.evidence.get("update_skipped"):
            how = "the trainer already skipped that update"
        else:
            how = ("the trainer's own guard did not skip it; skipping the next update as the "
                   "trainer receives this")
        return Decision(SKIP_UPDATE, f"{what}; {how}", RUNG_SKIP)

    def _rollback(self, f: Finding, state: RunState, history: History) -> Decision:
        c = self.config
        onset = onset_of(f)
        what = self._describe(f)
        near = history.rollbacks_near(onset, c.region_width_steps)
        if len(near) >= c.max_rollbacks_per_region:
            return Decision(STOP_PAGE, (
                f"{what}; already {len(near)} rollbacks within {c.region_width_steps} steps of "
                f"step {onset} (budget {c.max_rollbacks_per_region}): still unstable, stopping "
                f"with everything kept and paging a human"), RUNG_STOP)
        if len(history.rollbacks) >= c.max_total_rollbacks:
            return Decision(STOP_PAGE, (
                f"{what}; the run has used all {c.max_total_rollbacks} rollbacks: stopping with "
                f"everything kept and paging a human"), RUNG_STOP)
        target = self.rollback_target(onset, state)
        if target is None:
            return Decision(STOP_PAGE, (
                f"{what}; no valid checkpoint before step {onset} to roll back to: stopping "
                f"with everything kept and paging a human"), RUNG_STOP)
        # a cool for this spike applied to the trajectory the rollback throws away: undo it
        cool = history.open_cool(onset)
        base_scale = cool.scale_before if cool is not None else state.lr_scale
        margin = c.data_skip_margin_steps
        skip = (onset - target + margin) * state.batches_per_step
        span = f"steps {target + 1}-{onset} + {margin} margin"
        if state.batches_per_step != 1:
            span += f", {state.batches_per_step} batches per step"
        suspects = [r for r in near if r.lr_suspect]
        if not suspects or sudden(f):
            why = ""
            if near:
                why = (f"; rollback {len(near) + 1} of {c.max_rollbacks_per_region} in this region, LR kept: "
                       + (f"the loss {_fmt(f.evidence.get('loss'))} was normal (median "
                          f"{_fmt(f.evidence.get('loss_median'))}), so a batch or the hardware, not the LR, "
                          f"poisoned it" if sudden(f) else
                          "the earlier rollbacks here were for sudden poisoned updates, not instability"))
            lr_next = bool(suspects) or not sudden(f)
            nxt = (f"the next rollback also scales the LR by {c.lr_scale_factor:g}" if lr_next
                   else "roll back again, LR kept")
            return Decision(ROLLBACK, (
                f"{what}; rolling back to last-known-good step {target} and skipping {skip} "
                f"batches ({span}){why}{self._if_again(near, nxt)}"), RUNG_ROLLBACK, target_step=target,
                skip_batches=skip, lr_scale=base_scale)
        new_scale = base_scale * c.lr_scale_factor
        earlier = max(suspects, key=lambda r: r.wall_time)
        if new_scale < c.min_lr_scale:
            return Decision(STOP_PAGE, (
                f"{what}; another divergence near the rollback for onset {earlier.onset_step}, "
                f"but the LR scale would fall to {new_scale:g} (< {c.min_lr_scale:g}): stopping "
                f"with everything kept and paging a human"), RUNG_STOP)
        return Decision(ROLLBACK_LR_DOWN, (
            f"{what}; divergence again within {c.region_width_steps} steps of the rollback for "
            f"onset {earlier.onset_step} (rollback {len(near) + 1} of "
            f"{c.max_rollbacks_per_region} in this region); rolling back to last-known-good step "
            f"{target}, skipping {skip} batches ({span}) and scaling the LR by "
            f"{c.lr_scale_factor:g} to {new_scale:g} with a {c.lr_ramp_steps}-step re-warm"
            + self._if_again(near, f"scale the LR by {c.lr_scale_factor:g} again"
                             if new_scale * c.lr_scale_factor >= c.min_lr_scale else
                             f"stop and page (the LR scale would fall below {c.min_lr_scale:g})")),
            RUNG_ESCALATE, target_step=target, skip_batches=skip, lr_scale=new_scale,
            ramp_steps=c.lr_ramp_steps)

    def _if_again(self, near: list, nxt: str) -> str:
        """What the policy does if this rollback does not help (the reason's last clause)."""
        c = self.config
        left = c.max_rollbacks_per_region - len(near) - 1
        if left <= 0:
            return (f"; if it diverges again within {c.region_width_steps} steps: stop and page "
                    f"(this region's {c.max_rollbacks_per_region} rollbacks are spent)")
        return (f"; if it diverges again within {c.region_width_steps} steps: {nxt} "
                f"({left} more rollback{'s' if left != 1 else ''} in this region, then stop and page)")

    def _restart(self, f: Finding, state: RunState, history: History) -> Decision:
        c = self.config
        what = self._describe(f)
        recent = history.restarts_since(f.wall_time - c.restart_window_seconds)
        window = _secs(c.restart_window_seconds)
        if len(recent) >= c.max_restarts:
            return Decision(STOP_PAGE, (
                f"{what}; already {len(recent)} restarts in the last {window} (budget "
                f"{c.max_restarts}): stopping with everything kept and paging a human"),
                RUNG_STOP)
        if state.valid_checkpoints:
            target, where = max(state.valid_checkpoints), None
        elif state.last_known_good is not None:
            target, where = state.last_known_good, None
        elif state.current_step <= c.fresh_restart_max_step:
            target, where = 0, "from scratch (no valid checkpoint yet)"
        else:
            return Decision(STOP_PAGE, (
                f"{what}; no valid checkpoint to restart from at step {state.current_step}: "
                f"stopping with everything kept and paging a human"), RUNG_STOP)
        where = where or f"from checkpoint step {target}"
        loop = history.crash_loop_length(f.wall_time, f.step, c.crash_loop_window_seconds,
                                         c.crash_loop_healthy_steps)
        backoff = min(c.backoff_base_seconds * 2 ** (loop - 1), c.backoff_max_seconds) if loop else 0.0
        wait = ("at once (the last restart, if any, had a healthy stretch)" if not loop
                else f"after {backoff:g}s backoff (crash loop of {loop + 1})")
        tail = f"{where} {wait} (restart {len(recent) + 1} of {c.max_restarts} per {window})"
        common = dict(target_step=target, lr_scale=state.lr_scale, backoff_seconds=backoff)
        host = f.evidence.get("host")
        if f.kind == HARDWARE:
            n = f.evidence.get("hardware_count", 1)
            return Decision(EXCLUDE_NODE, (f"{what}; hardware finding {n} on host {host} within "
                                           f"{_secs(c.hardware_window_seconds)}: excluding it and restarting {tail}"),
                            RUNG_ESCALATE, node=host, **common)
        if c.exclude_node_after and host:
            same = [r for r in recent if r.host == host]
            if len(same) + 1 >= c.exclude_node_after:
                return Decision(EXCLUDE_NODE, (
                    f"{what}; crash {len(same) + 1} on host {host} within {window}: excluding it "
                    f"and restarting {tail}"), RUNG_ESCALATE, node=host, **common)
        if f.kind == OOM and c.oom_layout_fallback_after:
            ooms = sum(1 for r in recent if r.kind == OOM) + 1
            if ooms >= c.oom_layout_fallback_after:
                return Decision(RESTART, (
                    f"{what}; OOM {ooms} within {window}: restarting on the next safer layout "
                    f"{tail}"), RUNG_ESCALATE, next_layout=True, **common)
        if f.kind == HANG:
            return Decision(KILL_RESTART_HANG, (
                f"{what}; dumping stacks, killing the job and restarting {tail}"),
                RUNG_ROLLBACK, **common)
        return Decision(RESTART, f"{what}; restarting {tail}", RUNG_ROLLBACK, **common)

    # --- words ------------------------------------------------------------------------------
    def _describe(self, f: Finding) -> str:
        """One clause saying what was found, from the finding's evidence."""
        ev = f.evidence
        if f.kind == DIVERGENCE:
            cause = ev.get("cause")
            onset = onset_of(f)
            if cause == "no_recovery":
                seen = (f" (peak {_fmt(ev['peak'])}, median {_fmt(ev['median'])})"
                        if "peak" in ev and "median" in ev else "")
                return (f"loss spike at step {onset} did not recover within "
                        f"{ev.get('recovery_steps', f.step - onset)} steps{seen}")
            if cause == "cluster":
                spikes = ev.get("spike_steps") or []
                return (f"{len(spikes)} loss spikes within {ev.get('cluster_window_steps')} steps "
                        f"(steps {', '.join(str(s) for s in spikes)})")
            if cause == "severe":
                return (f"blow-up at step {onset}: loss {_fmt(ev.get('loss'))} is "
                        f"{_fmt(ev.get('loss_ratio'))}x its median {_fmt(ev.get('median'))} "
                        f"(>= {_fmt(ev.get('severe_loss_ratio'))}x) and grad norm "
                        f"{_fmt(ev.get('grad_norm'))} is {_fmt(ev.get('grad_ratio'))}x its median "
                        f"(>= {_fmt(ev.get('severe_grad_ratio'))}x)")
            if cause == "drift":
                return (f"loss spike at step {onset} ends a drift: loss {_fmt(ev.get('loss'))} is "
                        f"{_fmt(ev.get('loss_ratio'))}x its median {_fmt(ev.get('median'))} and the grad norm "
                        f"median of the {ev.get('drift_window')} steps before it was "
                        f"{_fmt(ev.get('grad_drift_ratio'))}x that of the {ev.get('drift_window')} before "
                        f"(>= {_fmt(ev.get('drift_grad_ratio'))}x): what grew the updates is still acting")
            if cause == "landed_high":
                return (f"loss spike at step {onset} dropped back in one step ({_fmt(ev.get('previous_loss'))} -> "
                        f"{_fmt(ev.get('loss'))}) but landed {_fmt(ev.get('landing_ratio'))}x the pre-spike "
                        f"trend {_fmt(ev.get('expected'))} (> 1 + {_fmt(ev.get('landing_tolerance'))}): "
                        f"the weights kept the damage")
            if cause == "landed_after_damage":
                return (f"loss spike at step {onset} dropped back in one step ({_fmt(ev.get('previous_loss'))} -> "
                        f"{_fmt(ev.get('loss'))}) after {ev.get('spike_steps')} steps whose summed excess over the "
                        f"median {_fmt(ev.get('median'))} was {_fmt(ev.get('damage'))} (>= "
                        f"{_fmt(ev.get('landing_damage'))}): the weights trained that long on what caused it")
            if cause == "stuck_high":
                return (f"loss spike at step {onset} is still at {_fmt(ev.get('level'))}, "
                        f"{_fmt(ev.get('level_ratio'))}x its median {_fmt(ev.get('median'))} after "
                        f"{ev.get('patience_steps')} steps (>= {_fmt(ev.get('stuck_level_ratio'))}x) with grad "
                        f"norms {_fmt(ev.get('grad_ratio'))}x theirs (>= {_fmt(ev.get('stuck_grad_ratio'))}x): the "
                        f"weights were thrown out of their basin, a cool would take longer than a rollback")
            if cause == "lr_burst":
                return (f"loss spike at step {ev.get('spike_onset_step', onset)} came with an off-schedule "
                        f"LR burst: steps {ev.get('burst_start')}-{ev.get('burst_end')} ran at up to "
                        f"{_fmt(ev.get('burst_peak_factor'))}x the schedule's peak LR and moved the weights "
                        f"{_fmt(ev.get('burst_displacement'))} extra normal steps (>= "
                        f"{_fmt(ev.get('burst_displacement_bar'))}): too far to come back by themselves")
            if cause == "poisoned_update":
                return (f"non-finite gradient at step {onset} reached the weights (update applied, "
                        f"grad norm {ev.get('grad_norm')}): every later step computes on poisoned "
                        f"weights")
            if cause == "worsening":
                return (f"loss spike at step {onset} is getting worse: level "
                        f"{_fmt(ev.get('level'))} is above {_fmt(ev.get('level_at_patience'))} "
                        f"(its level at patience) by more than "
                        f"{_fmt(100 * ev.get('worsening_tolerance', 0))}%")
            if cause == "non_finite_streak":
                return (f"non-finite {'/'.join(ev.get('fields', []))} for {ev.get('consecutive')} "
                        f"consecutive steps from step {onset}")
            return f"divergence at step {onset}"
        if f.kind == NON_FINITE:
            return f"non-finite {' and '.join(ev.get('fields', []))} at step {f.step}"
        if f.kind == GRAD_BLOWUP:
            if ev.get("rule") == "absolute_bound":
                return (f"pre-clip grad norm {_fmt(ev.get('grad_norm'))} at step {f.step} is above "
                        f"the bound {_fmt(ev.get('bound'))}")
            return (f"pre-clip grad norm {_fmt(ev.get('grad_norm'))} at step {f.step} is "
                    f"{_fmt(ev.get('ratio'))}x its median {_fmt(ev.get('median'))} "
                    f"(z={_fmt(ev.get('z'))})")
        if f.kind in (DEAD_RANK, OOM):
            sig = ev.get("signal_name")
            how = f"{sig} (exit {ev.get('exitcode')})" if sig else f"exit code {ev.get('exitcode')}"
            on = f" on {ev['host']}" if ev.get("host") else ""
            if f.kind == OOM:
                return f"rank {f.rank}{on} ran out of memory at step {f.step}, {how}"
            return f"rank {f.rank}{on} died with {how} at step {f.step}"
        if f.kind == HANG:
            silent = ""
            if f.rank is not None:
                if f.rank in ev.get("silent_ranks", [f.rank]):
                    silent = f"; rank {f.rank} stopped heartbeating"
                else:
                    phase = ev.get("rank_phases", {}).get(str(f.rank), "?")
                    silent = f"; rank {f.rank} is stuck outside the step (phase {phase})"
            basis = {"steps": "from step times", "startup": "startup",
                     "checkpoint": "checkpoint save", "pause": "after an announced pause"}
            return (f"no new step for {_fmt(ev.get('seconds_without_progress'))}s after step "
                    f"{f.step} (timeout {_fmt(ev.get('timeout_seconds'))}s "
                    f"{basis.get(ev.get('basis')) or str(ev.get('basis')).replace(':', ' ')})"
                    f"{silent}")
        if f.kind == MISSING_HEARTBEAT:
            return f"rank {f.rank} sent no heartbeat for {_fmt(ev.get('seconds_silent'))}s"
        if f.kind == STRAGGLER:
            return (f"rank {f.rank} is {_fmt(ev.get('ratio'))}x slower than its peers "
                    f"({ev.get('slow_samples')} of {ev.get('samples')} samples) at step {f.step}")
        if f.kind == HARDWARE:
            on = ev.get("host") or (f"rank {f.rank}" if f.rank is not None else "a node")
            return f"hardware sign '{ev.get('pattern')}' on {on}: {ev.get('detail')}"
        if f.kind == SLOW_CONVERGENCE:
            gap = ev.get("relative_gap")
            gap_s = f"{gap:.0%}" if isinstance(gap, (int, float)) else "?"
            return (f"smoothed loss {_fmt(ev.get('smoothed_loss'))} at step {f.step} is "
                    f"{gap_s} above the reference {_fmt(ev.get('reference_loss'))}")
        return f"{f.kind} at step {f.step}"


def explain(policy: "Policy.Config", loss_spike, non_finite) -> str:
    """The ladder with this run's numbers: each rung's trigger, what it does, its budget, and
    what comes next if it does not help (`titan-supervisor policy --explain`). Pure text."""
    p, ls = policy, loss_spike
    band = f"median·(1 + {ls.recovery_tolerance:g})"
    if ls.strict:
        landing = (f", unless it dropped back in one step (>= {100 * ls.landing_fraction:g}% of its peak excess) to "
                   f"more than {100 * ls.landing_tolerance:g}% above the pre-spike trend (power law, at most "
                   f"{ls.trend_horizon} steps ahead) -> rung 3, or after a spike whose summed excess over the median "
                   f"(sum of loss/median - 1, at most 1 per step) reached {ls.landing_damage:g} -> rung 3 (the "
                   f"weights trained that long on its cause).")
        stuck = (f"; unless the level (mean of the last {ls.level_window} losses) is already >= "
                 f"{ls.stuck_level_ratio:g}x the median while its grad norms are >= {ls.stuck_grad_ratio:g}x theirs "
                 f"(the weights, not the batches) -> rung 3 at once")
        strict_rb = (f"a spike that ends a drift (the grad-norm median of the {ls.drift_window} steps before it >= "
                     f"{ls.drift_grad_ratio:g}x that of the {ls.drift_window} before those); a spike that landed high "
                     f"or after long damage (rung 1); a spike stuck high at patience (rung 2); a spike with an "
                     f"off-schedule LR burst (LR / supervisor scale > {ls.lr_burst.factor:g}x the schedule's peak for "
                     f"at most {ls.lr_burst.max_steps} steps) that moved the weights >= {ls.burst_displacement:g} "
                     f"extra normal steps (sum of LR/peak - 1), judged when the burst ends; ")
    else:
        landing = "."
        stuck = ""
        strict_rb = ""
    return "\n".join([
        "Divergence ladder (loss and gradients); each rung says what happens if it does not help.",
        f"strict rules       {'on' if ls.strict else 'off'} ([detect.loss_spike] strict): "
        + ("also roll back spikes that come back into their band by themselves but probably left the run "
           "behind (drift end, landings, stuck high, LR bursts; below)." if ls.strict else
           "a spike that comes back into its band by itself is never rolled back; set it to also roll back "
           "drift ends, high landings, spikes stuck high with blown-up gradients and large LR bursts."),
        f"rung 1 record      loss spike: robust z > {ls.z_threshold:g} and > {100 * ls.min_relative_jump:g}% above the "
        f"median of the last {ls.window} losses. Watched; back under {band} -> recorded as recovered{landing}",
        f"rung 2 skip_update non-finite or blown-up gradient on one step whose update the trainer skipped: recorded "
        f"(the guard already skipped it). {non_finite.max_consecutive} non-finite steps in a row -> rung 3.",
        f"rung 2 cool_lr     the spike is still above {band} after {ls.patience_steps} steps (slow_recovery): LR "
        f"scale x{p.cool_lr_factor:g} at once, no work thrown away; one cool per spike, never below "
        f"{p.min_lr_scale:g}{stuck}. Back in band -> rewarm_lr to the scale before "
        f"the cool over {p.rewarm_steps} steps. Worse (mean of the {ls.level_window} losses after patience > "
        f"{100 * ls.worsening_tolerance:g}% above the level at patience) or not back by onset + "
        f"{ls.recovery_steps} steps -> rung 3.",
        f"rung 3 rollback    at once for: a blow-up (loss >= {ls.severe_loss_ratio:g}x its median and grad norm >= "
        f"{ls.severe_grad_ratio:g}x its median at the onset); a non-finite gradient whose update reached the "
        f"weights; {strict_rb}"
        f"{ls.cluster_size} spikes within {ls.cluster_window_steps} steps; and the cases above. Back to the newest "
        f"valid checkpoint >= {p.min_steps_before_onset} steps before the onset, skipping the data up to the onset "
        f"+ {p.data_skip_margin_steps} steps; a cool for that spike is undone. Budget: "
        f"{p.max_rollbacks_per_region} per {p.region_width_steps}-step region, {p.max_total_rollbacks} per run.",
        f"rung 4 rollback_lr_down  another divergence within {p.region_width_steps} steps of a rollback: roll back and "
        f"scale the LR by {p.lr_scale_factor:g} with a {p.lr_ramp_steps}-step re-warm (OPT). A sudden poisoned update "
        f"(non-finite gradient applied while the loss was at most {non_finite.sudden_loss_ratio:g}x the median of "
        f"the last {non_finite.loss_window} losses: a batch or hardware, not the LR) is a plain rollback and does not count as instability "
        f"(it still uses the region's budget).",
        f"rung 5 stop_page   region or run budget spent, LR scale would fall below {p.min_lr_scale:g}, or nothing "
        f"valid to roll back to: stop with everything kept and page a human.",
        "",
        "Process ladder (crashes, hangs, OOM):",
        f"restart            dead rank / OOM / hang: from the newest valid checkpoint, at once after a healthy "
        f"stretch; in a crash loop (a failure within {_secs(p.crash_loop_window_seconds)} of the last restart, "
        f"fewer than {p.crash_loop_healthy_steps} steps past its checkpoint) "
        f"after a backoff of {p.backoff_base_seconds:g}s doubling to {p.backoff_max_seconds:g}s; {p.max_restarts} per "
        f"{_secs(p.restart_window_seconds)}, then stop_page.",
        f"next layout        OOM number {p.oom_layout_fallback_after or 'never (off)'} within the window: restart on "
        f"the next [preflight] layout that passes preflight (journaled by name; none left -> same layout + page).",
        f"exclude_node       crash number {p.exclude_node_after or 'never (off)'} on one host"
        + (f", or hardware finding number {p.exclude_hardware_after} naming it within "
           f"{_secs(p.hardware_window_seconds)} (Xid / ECC log patterns, each once per host and generation; "
           f"Alertmanager / NVML alerts; the ones before are recorded)" if p.exclude_on_hardware
           else "; hardware findings are recorded (policy.exclude_on_hardware is off)")
        + ": the node is drained and the run restarts on the rest (a lost node that returns grows back at the "
        "next checkpoint, an excluded one only when readmitted); on one node, refused with a page naming the "
        "node and a restart there.",
    ])
