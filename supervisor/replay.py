"""Offline replay: the decisions the daemon would have made on a telemetry spool.

`replay(lines)` runs the same `DetectorSuite` and `Policy` as the daemon over the parsed
JSON lines of a trainer spool, so thresholds can be tuned on a past run without a
cluster. Pure: no files, no clock; time is the records' `wall_time`.

Lines understood:
- a StepRecord dict (protocol.py; an optional `"kind": "step"` is tolerated);
- `{"kind": "checkpoint_saved", "step": N, ...}`: N joins the valid checkpoints;
- `{"kind": "started", "step": C, ...}`: the next record starts a new segment that resumes
  from checkpoint C at that wall time (without it, segments are inferred as below);
- `{"kind": "finished", ...}`: the generation ended (no hang after it);
- anything else with a `kind` (e.g. `directive_applied`) is accepted and ignored.
A malformed step record or checkpoint event raises `ReplayError` naming the line.

How the daemon is simulated:
- Segments. A record of a newer generation, or one whose step is not above the highest step
  of the current segment (the trainer went back to C+1 after a rollback), starts a new
  segment: the suite is reset with `resume_step` = C (from the `started` event, else the
  record's step - 1) at the time of the `started` event or of the previous record, and
  checkpoints newer than C are quarantined (dropped from the valid list), as the daemon
  does. Records of an older generation are ignored.
- Time. Before each record, the suite is ticked at each pending deadline earlier than the
  record's wall time, so a gap in the spool longer than the stall timeout is a `hang`
  detected at exactly the deadline (a record landing exactly on it counts as in time).
  Spools hold no heartbeats, so no `missing_heartbeat` is replayed.
- Actions. Decisions go through the daemon's own `DecisionLoop` (supervisor/actions.py): while a
  rollback or restart is in flight, findings get no decision, and a carried-out one counts
  against its rung's budget once it has landed. A rollback or restart quarantines the checkpoints newer than its target and sets the LR scale at once.
  The daemon resets the detectors only when the action has landed, i.e. when the trainer
  comes back at C+1, and so does replay: the records that follow the decision are held
  back (they are the old trajectory, still running until the directive is applied). If the
  spool then rewinds or moves to a newer generation (a supervised run), the held records
  are dropped and the new segment starts as above. If it does not within
  `apply_lag_records` records (an unsupervised run), the action is taken as executed at
  the finding's wall time: the suite is reset to the target step (windows
  rebuilt from the baseline as of that step) and the held records are fed as if they were
  the post-action trajectory, so a run that stays bad climbs the ladder. Records still
  held when the spool ends are dropped: whether and how the action landed is unknown.
  `stop_page` ends the replay: the daemon would have stopped the run there.
- The LR scale starts from the first record's and changes only by simulated decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from supervisor.actions import DecisionLoop
from supervisor.detect.findings import Finding
from supervisor.detect.suite import DetectorSuite
from supervisor.policy import AUTO, LR_ACTIONS, RESTART_ACTIONS, ROLLBACK_ACTIONS, STOP_PAGE, Decision, Policy, RunState
from supervisor.protocol import CheckpointSaved, StepRecord, TrainerStarted


class ReplayError(ValueError):
    """A spool line that cannot be replayed (the message names the line)."""


@dataclass
class _Pending:
    """A rollback/restart decided but not yet seen to land in the spool."""

    kind: str
    target: int
    wall_time: float
    finding: Finding
    decision: Decision
    held: list[StepRecord] = field(default_factory=list)


class _Simulation:
    def __init__(self, suite_config, policy_config, mode, batches_per_step, checkpoints,
                 last_known_good, reference, apply_lag_records) -> None:
        self.suite = DetectorSuite(suite_config, reference=reference)
        self.loop = DecisionLoop(Policy(policy_config))
        self.mode = mode
        self.batches_per_step = batches_per_step
        self.checkpoints: set[int] = set(checkpoints)
        self.last_known_good = last_known_good
        self.apply_lag_records = apply_lag_records
        self.pairs: list[tuple[Finding, Decision]] = []
        self.generation: int | None = None
        self.max_step: int | None = None  # highest step fed in the current segment
        self.last_wall: float | None = None
        self.lr_scale: float | None = None
        self.started: TrainerStarted | None = None
        self.pending: _Pending | None = None
        self.stopped = False

    # --- lines ------------------------------------------------------------------------------
    def feed(self, n: int, line: dict) -> None:
        if not isinstance(line, dict):
            raise ReplayError(f"line {n}: expected a JSON object, got {type(line).__name__}")
        kind = line.get("kind")
        try:
            if kind in (None, "step"):
                body = {k: v for k, v in line.items() if k != "kind"}
                self.record(StepRecord.model_validate(body))
            elif kind == "checkpoint_saved":
                self.checkpoints.add(CheckpointSaved.model_validate(line).step)
            elif kind == "started":
                self.started = TrainerStarted.model_validate(line)
            elif kind == "finished":
                self.suite.end_generation()
        except ValidationError as e:
            what = "step record" if kind in (None, "step") else f"{kind} event"
            raise ReplayError(f"line {n}: not a valid {what}: {e}") from None

    def record(self, rec: StepRecord) -> None:
        if self.generation is not None and rec.generation < self.generation:
            return
        rewind = (self.generation is None or rec.generation > self.generation
                  or self.started is not None  # a process (re)start is always a new segment
                  or (self.max_step is not None and rec.step <= self.max_step))
        if self.pending is not None:
            if rewind:
                self._landed()  # the held records were superseded
            else:
                self.pending.held.append(rec)
                self.last_wall = rec.wall_time
                if len(self.pending.held) > self.apply_lag_records:
                    self._land_pending()
                return
        if rewind:
            self._new_segment(rec)
        self._tick_until(rec.wall_time)
        if self.stopped:
            return
        self.max_step = rec.step if self.max_step is None else max(self.max_step, rec.step)
        self.last_wall = rec.wall_time
        for f in self.suite.observe_record(rec):
            self._decide(f)
            if self.stopped:
                return

    def _new_segment(self, rec: StepRecord) -> None:
        st = self.started
        resume = st.step if st is not None else rec.step - 1
        now = st.wall_time if st is not None else (self.last_wall or rec.wall_time)
        if self.lr_scale is None:
            self.lr_scale = rec.lr_scale
        self.generation = rec.generation
        self.max_step = None
        self.started = None
        self._quarantine_after(resume)
        self.suite.reset_generation(rec.generation, now, resume_step=resume)

    def _land_pending(self) -> None:
        """No sign of the action in the spool: take it as executed and replay what followed."""
        p = self._landed()
        self.suite.reset_generation(self.generation or 0, p.wall_time, resume_step=p.target)
        self.max_step = p.target
        for rec in p.held:
            if self.stopped:
                return
            self.record(rec)

    def _tick_until(self, wall_time: float) -> None:
        seen: set[float] = set()
        while not self.stopped and self.pending is None:
            d = self.suite.next_deadline()
            if d is None or d >= wall_time or d in seen:
                return
            seen.add(d)
            for f in self.suite.tick(d):
                self._decide(f)
                if self.stopped:
                    return

    def _landed(self) -> _Pending:
        p = self.pending
        assert p is not None
        self.pending = None
        self.loop.finished(p.finding, p.decision, ok=True)
        return p

    # --- decisions --------------------------------------------------------------------------
    def _decide(self, f: Finding) -> None:
        state = RunState(current_step=self.max_step or f.step, generation=self.generation or 0,
                         valid_checkpoints=sorted(self.checkpoints),
                         last_known_good=self.last_known_good,
                         batches_per_step=self.batches_per_step,
                         lr_scale=self.lr_scale if self.lr_scale is not None else 1.0,
                         trainer_alive=True, mode=self.mode)
        d = self.loop.decide(f, state)
        if d is None:
            return  # like the daemon: one action at a time, findings meanwhile get no decision
        self.pairs.append((f, d))
        if not d.acts:
            return
        if d.action in LR_ACTIONS:
            self.lr_scale = d.lr_scale  # light: a directive, applied at the next step boundary
        elif d.action == STOP_PAGE:
            self.stopped = True
        elif d.action in ROLLBACK_ACTIONS or d.action in RESTART_ACTIONS:
            target = d.target_step or 0
            self._quarantine_after(target)
            if d.lr_scale is not None:
                self.lr_scale = d.lr_scale
            self.pending = _Pending(kind=d.action, target=target, wall_time=f.wall_time, finding=f, decision=d)
            self.loop.started(self.pending)

    def _quarantine_after(self, step: int) -> None:
        self.checkpoints = {c for c in self.checkpoints if c <= step}
        if self.last_known_good is not None and self.last_known_good > step:
            self.last_known_good = None


def replay(lines: Iterable[dict], *, suite_config: DetectorSuite.Config | None = None,
           policy_config: Policy.Config | None = None, mode: str = AUTO,
           batches_per_step: int = 1, checkpoints: Iterable[int] = (),
           last_known_good: int | None = None,
           reference: Sequence[tuple[float, float]] | None = None,
           apply_lag_records: int = 100) -> list[tuple[Finding, Decision]]:
    """(finding, decision) pairs, in order, that the daemon would have produced.

    `checkpoints` / `last_known_good`: valid checkpoint steps known before the spool starts;
    `reference`: [(tokens_seen, loss)] of an earlier run, for slow-convergence findings;
    `apply_lag_records`: records after an action within which the spool must show it landed
    (a rewind or a new generation) before replay simulates it (see the module docstring)."""
    sim = _Simulation(suite_config, policy_config, mode, batches_per_step, checkpoints,
                      last_known_good, reference, apply_lag_records)
    for n, line in enumerate(lines, 1):
        sim.feed(n, line)
        if sim.stopped:
            break
    return sim.pairs


def format_decisions(pairs: Iterable[tuple[Finding, Decision]]) -> str:
    """One line per finding: step, kind, severity, action, rung and the reason."""
    out = []
    for f, d in pairs:
        flag = " (advisory)" if d.advisory else ""
        who = f" rank {f.rank}" if f.rank is not None else ""
        out.append(f"step {f.step:>7}  {f.kind:<17} {f.severity:<8}{who} -> {d.action}"
                   f"{flag} [rung {d.rung}]: {d.reason}")
    return "\n".join(out) if out else "no findings: the daemon would have done nothing"
