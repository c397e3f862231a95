"""The supervisor daemon: watch every step, decide, act, remember.

One data path (DESIGN.md §3): ``StepRecord -> detectors -> Finding -> policy -> Decision ->
remedy -> journal + metrics``. The detectors and the policy are pure; everything with side
effects lives here and in ``supervisor.remedies`` and ``supervisor.launch``.

Reconcile loop: every ``poll_interval`` the daemon compares what it wants (a generation
running the run to its last step, or nothing when stopped/paused/finished) with what it
observes (rank processes, heartbeats, step progress) and acts on the difference through the
policy. At most one action runs at a time.

Crash-only: all durable state is in the journal (SQLite) and the checkpoint folder. A daemon
restarted after any crash, SIGKILL included, re-reads the journal, re-adopts the running
generation, replays the trainer's spool for what it missed, and finishes any action whose
intent was journaled without an outcome. Training never waits for the daemon.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import log
from supervisor.checkpoints import Catalog
from supervisor.detect.findings import CRITICAL, DEAD_RANK, HANG, OOM, SPIKE_RECOVERED, Finding
from supervisor.detect.suite import DetectorSuite
from supervisor.journal import Journal
from supervisor.launch.local import Generation, LaunchSpec, LocalLauncher
from supervisor.metrics import Metrics
from supervisor.policy import (RECORD, ROLLBACK_ACTIONS, RESTART_ACTIONS, SKIP_UPDATE, STOP_PAGE, Decision,
                               History, Policy, RunState)

LIGHT_ACTIONS = frozenset({SKIP_UPDATE, RECORD})
from supervisor.protocol import Directive, Heartbeat, StepRecord, TelemetryBatch, TelemetryReply
from supervisor.settings import ConfigError, Settings

def _num(x: float):
    """JSON has no NaN: non-finite numbers are reported as strings."""
    return x if math.isfinite(x) else str(x)


TRAINER_TOKEN_ENV = "TITAN_SUPERVISOR_TRAINER_TOKEN"


class PreflightFailed(RuntimeError):
    """The plan about to launch has errors (and no override reason)."""


STATES = ("starting", "running", "recovering", "paused", "stopped", "failed", "finished")


@dataclass
class ActiveAction:
    """The one action in flight (journaled intent -> running -> done/failed)."""

    id: int
    kind: str
    params: dict
    finding: Finding | None
    decision: Decision | None
    directive_id: str | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    ack_ok: bool = False
    ack_detail: str = ""


class Supervisor:
    def __init__(self, settings: Settings, *, logger=None) -> None:
        self.settings = s = settings
        self.log = logger or log.get()
        self.workdir = s.run.workdir.resolve()
        (self.workdir / "supervisor").mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(s.journal_path)
        self.catalog = Catalog(self.workdir / "checkpoint", self.workdir / "quarantine",
                               Catalog.Config(keep_last=s.checkpoints.keep_last,
                                              in_progress_grace_s=s.checkpoints.in_progress_grace_s))
        self.metrics = Metrics()
        self.metrics.set_run_info(s.run.run_id, preset=s.run.preset)
        self.suite = DetectorSuite(s.detector_config(), reference=self._reference_curve())
        self.policy = Policy(s.policy_config())
        self.history = History.from_dict(self.journal.get_meta("policy_history", {}) or {})
        self.launcher = LocalLauncher(self.workdir / "logs")
        self.mode = self.journal.get_meta("mode", s.mode)
        self.url = ""  # set by the server once bound
        self.gen: Generation | None = None
        self.generation = -1
        self.state = "starting"
        self.last_step = 0
        self.total_steps: int | None = s.run.steps
        self.lr_scale = 1.0
        self.action: ActiveAction | None = None
        self.pending: dict[str, Directive] = {}
        self.directive_acks: dict[str, object] = {}  # directive id -> its DirectiveApplied event
        self.incident_id: int | None = None
        self.lkg_candidate: int | None = None
        self.finished = asyncio.Event()
        self._steps_buffer: list[StepRecord] = []
        self._step_times: list[float] = []
        self._first_start: float | None = self.journal.get_meta("first_start")
        self._tasks: set[asyncio.Task] = set()
        self._valid_cache: list[int] | None = None
        self._first_record_of_gen = True
        self.last_record: StepRecord | None = None
        self._trainer_finished = None
        self._close_on_next_record: str | None = None
        from supervisor.model_table import PRESET_TRAINING

        preset = PRESET_TRAINING.get(s.run.preset)
        self.checkpoint_interval = s.run.checkpoint_interval or (preset.checkpoint_interval if preset else None)
        if self.checkpoint_interval:
            self.metrics.set_checkpoint_interval(self.checkpoint_interval)
        self.recommended_interval = None
        self.journal.record_run(s.run.run_id, {"preset": s.run.preset, "workdir": str(self.workdir)})
        # The per-run secret the ranks present on telemetry/heartbeats (kept across daemon
        # restarts so a re-adopted generation still gets in). Never logged.
        self.trainer_token: str | None = None
        if s.server.require_trainer_token:
            import secrets

            self.trainer_token = self.journal.get_meta("trainer_token") or secrets.token_urlsafe(32)
            self.journal.set_meta("trainer_token", self.trainer_token)

    # ------------------------------------------------------------------ lifecycle ---------
    async def start(self) -> None:
        """Re-adopt or launch, and finish whatever the last daemon left half done."""
        last = self.journal.last_generation()
        resumed = False
        if last is not None:
            self.generation = int(last["id"])
            self.lr_scale = float(last.get("lr_scale") or 1.0)
            if last.get("state") == "running":
                resumed = self._adopt(last)
        prior_state = self.journal.get_meta("state")
        if prior_state in ("finished", "stopped", "paused") and not resumed:
            self._set_state(prior_state)
            newest = self.journal.recent_steps(limit=1)
            self.last_step = int(newest[-1]["step"]) if newest else 0
            if prior_state == "finished":
                self.finished.set()
            return
        unfinished = self.journal.unfinished_actions()
        if unfinished:
            for a in unfinished:
                self._spawn(self._resume_action(a))
        elif not resumed:
            # A first start begins from scratch; a run whose trainer vanished with the daemon
            # (a machine reboot) resumes from its newest valid checkpoint.
            load, reason = (None, "initial start") if last is None else (self._newest_valid_step(), "restart after the trainer was lost")
            try:
                await self._launch(load_step=load, skip_batches=0, lr_scale=self.lr_scale, reason=reason)
            except PreflightFailed:
                return  # state "failed", paged; the service exits non-zero

    def _adopt(self, last: dict) -> bool:
        pids = last.get("pids") or []
        meta = self.journal.get_meta(f"generation_{self.generation}") or {}
        spec = self._spec(self.generation, load_step=last.get("load_step"), skip_batches=last.get("skip_batches") or 0,
                          lr_scale=self.lr_scale)
        gen = self.launcher.adopt(spec, int(meta.get("torchrun_pid", 0) or 0),
                                  {int(k): int(v) for k, v in (meta.get("rank_pids") or {}).items()})
        if gen is None:
            self.journal.record_generation_end(self.generation, reason="not running when the daemon restarted",
                                               state="lost")
            return False
        self.gen = gen
        self._first_record_of_gen = False
        self.suite.reset_generation(self.generation, time.time(), resume_step=None,
                                    world_size=self.settings.run.nproc_per_node)
        self._catch_up_from_spool()
        self._set_state("running")
        self.log.info("adopted generation", generation=self.generation, pid=gen.pid, pids=pids,
                      last_step=self.last_step)
        return True

    def _catch_up_from_spool(self) -> None:
        """Feed the trainer's spool through the detectors (to rebuild their windows) and journal
        the steps the daemon missed while it was down. Findings from the replay are not acted
        on again: the journal already holds what was decided then."""
        from supervisor.spool import read_spool, spool_path

        journaled = {r["step"] for r in self.journal.recent_steps(limit=100_000, generation=self.generation)}
        missed: list[StepRecord] = []
        segment: list[StepRecord] = []
        for obj in read_spool(spool_path(self.workdir), strict=False):
            if "kind" in obj:
                if obj["kind"] == "checkpoint_saved":
                    self._valid_cache = None
                continue
            if obj.get("generation") != self.generation:
                continue
            try:
                rec = StepRecord.model_validate(obj)
            except Exception:
                continue
            if segment and rec.step <= segment[-1].step:
                segment = []  # a rollback rewound the steps: only the live segment matters
            segment.append(rec)
            if rec.step not in journaled:
                missed.append(rec)
        for rec in segment:
            self.suite.observe_record(rec)
            self.last_step = rec.step
        if missed:
            self.journal.add_steps(missed)
            self.log.info("journaled steps missed while down", count=len(missed))

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self._flush_steps()
        self.journal.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("action task crashed", error=repr(task.exception()))

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.log.info("state", state=state, previous=self.state)
        self.state = state
        self.metrics.set_state(state)
        self.journal.set_meta("state", state)

    # ------------------------------------------------------------------ launching ----------
    def _spec(self, generation: int, *, load_step, skip_batches: int, lr_scale: float, ramp_steps: int = 0) -> LaunchSpec:
        r = self.settings.run
        return LaunchSpec(generation=generation, nproc=r.nproc_per_node, preset=r.preset, workdir=self.workdir,
                          supervisor_url=self.url, run_id=r.run_id, load_step=load_step,
                          skip_batches=skip_batches, lr_scale=lr_scale, lr_ramp_steps=ramp_steps,
                          steps=self.total_steps, checkpoint_interval=self.checkpoint_interval,
                          faults=r.faults, extra_args=list(r.trainer_args), python=r.python,
                          env=dict(r.env, **({TRAINER_TOKEN_ENV: self.trainer_token} if self.trainer_token else {})),
                          optimizer_json=self._optimizer_json())

    def _reference_curve(self):
        path = self.settings.convergence.reference_spool
        if path is None:
            return None
        from supervisor.detect.convergence import reference_from_spool_lines

        from supervisor.spool import SpoolError, read_spool

        try:
            lines = read_spool(Path(path), strict=True)
        except SpoolError as e:
            raise ConfigError(f"convergence.reference_spool: {e}") from None
        curve = reference_from_spool_lines(lines)
        if len(curve) < 2:
            raise ConfigError(f"convergence.reference_spool {path}: too few usable records for a reference curve")
        return curve

    def run_preflight(self) -> dict:
        """Lint the plan about to launch; journal every finding; raise on errors unless overridden."""
        import psutil

        from supervisor.preflight import exit_code, format_report, preflight
        from supervisor.run_plan import build_plan

        pf = self.settings.preflight
        try:
            report = preflight(build_plan(self.settings, psutil.virtual_memory().total / 2**30))
        except ValueError as e:
            raise PreflightFailed(f"preflight could not read the plan: {e}") from None
        summary = report.to_dict()
        self.journal.set_meta("preflight", summary)
        for issue in report.all_issues():
            if issue.level in ("error", "warning"):
                self.journal.add_finding(f"preflight_{issue.level}", self.last_step,
                                         "critical" if issue.level == "error" else "warning", issue.to_dict())
        text = format_report(report)
        if exit_code(report) != 0:
            if pf.override_reason:
                self.log.warning("preflight errors overridden", reason=pf.override_reason, report=text)
                self.journal.set_meta("preflight_override", {"reason": pf.override_reason, "at": time.time()})
            else:
                raise PreflightFailed("preflight found errors (set preflight.override_reason to launch anyway):\n" + text)
        elif report.all_issues():
            self.log.info("preflight", report=text)
        return summary

    def _optimizer_json(self) -> str:
        o = self.settings.optimizer.overrides()
        return json.dumps(o) if o else ""

    async def _launch(self, *, load_step, skip_batches: int, lr_scale: float, ramp_steps: int = 0, reason: str) -> None:
        if self.settings.preflight.enabled:
            try:
                self.run_preflight()
            except PreflightFailed as e:
                from supervisor.remedies import page

                self.log.error("preflight failed: launch refused", error=str(e))
                self._set_state("failed")
                page(self, f"launch refused by preflight: {e}")
                self.finished.set()
                raise
        self.generation += 1
        spec = self._spec(self.generation, load_step=load_step, skip_batches=skip_batches, lr_scale=lr_scale,
                          ramp_steps=ramp_steps)
        self.pending.clear()
        self.suite.reset_generation(self.generation, time.time(), resume_step=load_step,
                                    world_size=spec.nproc)
        self.gen = await asyncio.to_thread(self.launcher.start, spec)
        self.lr_scale = lr_scale
        self._first_record_of_gen = True
        if self._first_start is None:
            self._first_start = time.time()
            self.journal.set_meta("first_start", self._first_start)
        self.journal.record_generation_start(generation=self.generation, run_id=self.settings.run.run_id,
                                             load_step=load_step or 0, skip_batches=skip_batches, lr_scale=lr_scale,
                                             layout={"nproc_per_node": spec.nproc})
        self.journal.set_meta(f"generation_{self.generation}", {"torchrun_pid": self.gen.pid, "rank_pids": {}})
        self.metrics.generation.set(self.generation)
        self.metrics.set_up(True)
        self._set_state("starting")
        self.log.info("generation started", generation=self.generation, load_step=load_step,
                      skip_batches=skip_batches, lr_scale=lr_scale, reason=reason, pid=self.gen.pid,
                      command=" ".join(spec.command()))

    async def _stop_generation(self, reason: str, *, grace_s: float | None = None) -> None:
        gen = self.gen
        if gen is None:
            return
        gen.stopping = True  # exits from here on are ours, not findings
        self.suite.end_generation()
        grace = self.settings.launch.stop_grace_s if grace_s is None else grace_s
        await asyncio.to_thread(gen.stop, grace)
        self.journal.record_generation_end(gen.generation, exit_code=gen.exited, reason=reason,
                                           state="stopped")
        self.log.info("generation stopped", generation=gen.generation, reason=reason)
        self.gen = None

    # ------------------------------------------------------------------ telemetry ----------
    def ingest(self, batch: TelemetryBatch) -> TelemetryReply:
        if batch.run_id != self.settings.run.run_id or batch.generation != self.generation:
            self.log.warning("telemetry from another generation ignored", run_id=batch.run_id,
                             generation=batch.generation, current=self.generation)
            return TelemetryReply(accepted=0)
        for ev in batch.events:
            self._on_event(ev)
        for rec in batch.records:
            self._on_record(rec)
        self._flush_steps()
        return TelemetryReply(accepted=len(batch.records), directives=list(self.pending.values()))

    def heartbeat(self, hb: Heartbeat) -> None:
        if hb.run_id != self.settings.run.run_id or hb.generation != self.generation:
            return
        if self.gen is not None and hb.rank not in self.gen.rank_pids:
            self.gen.note_rank_pid(hb.rank, hb.pid)
            self.journal.set_meta(f"generation_{self.generation}",
                                  {"torchrun_pid": self.gen.pid, "rank_pids": self.gen.rank_pids})
            self.journal.set_generation_pids(self.generation, sorted(self.gen.rank_pids.values()))
        for f in self.suite.observe_heartbeat(hb):
            self._on_finding(f)

    def _on_record(self, rec: StepRecord) -> None:
        if self._first_record_of_gen:
            self._first_record_of_gen = False
            if self.state in ("starting", "recovering"):
                self._set_state("running")
        self._steps_buffer.append(rec)
        self.last_record = rec
        if self._close_on_next_record and self.action is None:
            self._close_incident(f"{self._close_on_next_record}; training resumed at step {rec.step}")
            self._close_on_next_record = None
        self.metrics.observe_step(rec)
        self.last_step = rec.step
        if math.isfinite(rec.step_seconds) and not rec.update_skipped:
            self._step_times.append(rec.step_seconds)
            del self._step_times[:-500]
        for f in self.suite.observe_record(rec):
            self._on_finding(f)
        self._maybe_pin_lkg(rec)
        self._update_goodput()

    def _flush_steps(self) -> None:
        if self._steps_buffer:
            self.journal.add_steps(self._steps_buffer)
            self._steps_buffer = []

    def _on_event(self, ev) -> None:
        kind = ev.kind
        if kind == "checkpoint_saved":
            self._valid_cache = None
            self.journal.record_checkpoint(ev.step, path=str(self.workdir / "checkpoint" / f"step-{ev.step}"),
                                           state="valid", save_seconds=ev.seconds, at=ev.wall_time)
            self.metrics.set_checkpoint(ev.step, saved_at=ev.wall_time)
            if self.incident_id is None:
                self.lkg_candidate = ev.step
            self._recommend_interval()
            if self.settings.checkpoints.keep_last:
                for info in self.catalog.apply_retention():
                    self.journal.record_checkpoint(info.step, state="deleted_by_retention")
        elif kind == "directive_applied":
            self.pending.pop(ev.directive_id, None)
            self.directive_acks[ev.directive_id] = ev  # read by operator commands (control.py)
            if len(self.directive_acks) > 1000:
                self.directive_acks.pop(next(iter(self.directive_acks)))
            a = self.action
            if a is not None and a.directive_id == ev.directive_id:
                a.ack_ok, a.ack_detail = ev.ok, ev.detail
                a.acked.set()
            self.log.info("directive applied", id=ev.directive_id, directive=ev.directive, ok=ev.ok,
                          detail=ev.detail, step=ev.step)
        elif kind == "started":
            self.last_step = ev.step
            self.log.info("trainer started", generation=self.generation, step=ev.step, world_size=ev.world_size)
        elif kind == "finished":
            self.log.info("trainer finished", generation=self.generation, step=ev.step, reason=ev.reason)
            self._trainer_finished = (ev.step, ev.reason)
            self.suite.end_generation()  # ranks going quiet now is expected, not a finding
            if self.gen is not None:
                self.gen.exit_expected = True

    def _recommend_interval(self) -> None:
        """Young/Daly: checkpoint every sqrt(2 * C * MTBF) seconds, C = measured save cost, MTBF
        from the journal's failure history (a configured prior until failures are seen)."""
        from supervisor.checkpoint_interval import mtbf_from_failures, recommend_interval_steps

        c = self.settings.checkpoints
        fh = self.journal.failure_history()
        if not fh.save_seconds or not self._step_times:
            return
        now = time.time()
        since = fh.observed_since or self._first_start or now - 1
        mtbf = mtbf_from_failures(fh.failure_times, since, max(now, since + 1e-3), prior_mtbf_s=c.mtbf_prior_hours * 3600)
        rec = recommend_interval_steps(statistics.median(fh.save_seconds), mtbf, statistics.median(self._step_times),
                                       min_steps=c.min_interval_steps, max_steps=c.max_interval_steps)
        self.recommended_interval = rec
        self.metrics.set_recommended_checkpoint_interval(rec.steps)
        current = self.checkpoint_interval
        if not c.adaptive or self.action is not None or self.gen is None or self.gen.exited is not None:
            return
        if current is not None and abs(rec.steps - current) <= 0.2 * current:
            return  # hysteresis: the estimate moves a little with every save
        reason = (f"Young/Daly: {rec.formula} with C={rec.inputs['save_cost_s']:.3g}s, "
                  f"MTBF={rec.inputs['mtbf_s']:.4g}s, step={rec.inputs['step_seconds']:.3g}s "
                  f"-> every {rec.steps} steps (was {current})")
        intent = self.journal.action_intent("set_checkpoint_interval", {"steps": rec.steps, "was": current,
                                                                        "inputs": rec.inputs})
        a = ActiveAction(intent.id, "set_checkpoint_interval", {"steps": rec.steps}, None, None)
        self.journal.action_running(a.id)
        d = self.send_directive(a, kind="set_checkpoint_interval", n=rec.steps, reason=reason[:500])
        self.journal.action_done(a.id, {"directive": d.id, "steps": rec.steps})
        self.checkpoint_interval = rec.steps
        self.metrics.set_checkpoint_interval(rec.steps)
        self.log.info("checkpoint interval", steps=rec.steps, was=current, reason=reason)

    def _maybe_pin_lkg(self, rec: StepRecord) -> None:
        """A checkpoint with healthy telemetry after it becomes the pinned last-known-good."""
        c = self.lkg_candidate
        if c is None or self.incident_id is not None or rec.step < c + 3:
            return
        old = set(self.catalog.pinned)
        try:
            self.catalog.pin(c)
        except (LookupError, ValueError) as e:
            self.log.warning("cannot pin last-known-good", step=c, error=str(e))
            self.lkg_candidate = None
            return
        for s in old - {c}:
            self.catalog.unpin(s)
            self.journal.record_checkpoint(s, pinned=False)
        self.journal.record_checkpoint(c, pinned=True, note="last-known-good")
        self.journal.set_meta("last_known_good", c)
        self.lkg_candidate = None

    @property
    def last_known_good(self) -> int | None:
        return self.journal.get_meta("last_known_good")

    def _update_goodput(self) -> None:
        if self._first_start is None or not self._step_times:
            return
        elapsed = time.time() - self._first_start
        if elapsed <= 0:
            return
        useful = self.last_step * statistics.median(self._step_times)
        self.metrics.set_goodput(min(1.0, useful / elapsed))

    # ------------------------------------------------------------------ findings -> decisions
    def _valid_steps(self) -> list[int]:
        if self._valid_cache is None:
            self._valid_cache = self.catalog.valid_steps()
        return self._valid_cache

    def run_state(self) -> RunState:
        return RunState(current_step=self.last_step, generation=self.generation,
                        valid_checkpoints=self._valid_steps(), last_known_good=self.last_known_good,
                        batches_per_step=1, lr_scale=self.lr_scale,
                        trainer_alive=self.gen is not None and self.gen.exited is None, mode=self.mode)

    def _on_finding(self, f: Finding) -> None:
        self.metrics.observe_finding(f.kind)
        if self.incident_id is None and f.kind != SPIKE_RECOVERED and f.severity != "info":
            self.incident_id = self.journal.open_incident(f.kind, f.step, summary=f.kind,
                                                          generation=self.generation, at=f.wall_time)
            self.metrics.observe_incident(f.kind)
            self.lkg_candidate = None
        fid = self.journal.add_finding(f.kind, f.step, f.severity, f.evidence, incident_id=self.incident_id,
                                       rank=f.rank, wall_time=f.wall_time)
        self.log.info("finding", kind=f.kind, step=f.step, severity=f.severity, rank=f.rank, evidence=f.evidence)
        if self.action is not None:
            self.log.info("finding while an action runs: recorded, no new decision", kind=f.kind,
                          action=self.action.kind)
            return
        decision = self.policy.decide(f, self.run_state(), self.history)
        did = self.journal.add_decision(decision.action, decision.to_dict(), decision.reason,
                                        incident_id=self.incident_id, finding_id=fid, advisory=decision.advisory)
        self.metrics.observe_decision(decision.action, decision.advisory)
        self.log.info("decision", action=decision.action, reason=decision.reason, advisory=decision.advisory)
        if f.kind == SPIKE_RECOVERED and self.incident_id is not None:
            self._close_incident("spike recovered by itself")
        if decision.acts and not decision.advisory:
            self._begin_action(decision, f, did)

    def _close_incident(self, resolution: str) -> None:
        if self.incident_id is not None:
            self.journal.close_incident(self.incident_id, resolution)
            self.incident_id = None

    # ------------------------------------------------------------------ actions ------------
    def _begin_action(self, decision: Decision, finding: Finding | None, decision_id: int | None,
                      *, actor: str = "policy", request_id: str | None = None) -> ActiveAction:
        params = {k: v for k, v in decision.to_dict().items() if k not in ("reason",)}
        params["generation"] = self.generation
        params["from_step"] = self.last_step
        intent = self.journal.action_intent(decision.action, params, actor=actor, decision_id=decision_id,
                                            request_id=request_id)
        a = ActiveAction(intent.id, decision.action, params, finding, decision)
        if decision.action in LIGHT_ACTIONS:
            self._run_light(a)  # no waiting involved: done before the next finding is decided
            return a
        self.action = a
        self._spawn(self._run_action(a))
        return a

    def _run_light(self, a: ActiveAction) -> None:
        from supervisor import remedies

        self.journal.action_running(a.id)
        outcome = remedies.light(self, a)
        self.journal.action_done(a.id, outcome)
        self.metrics.observe_action(a.kind, "done")
        self.log.info("action done", id=a.id, kind=a.kind, outcome=outcome)
        if self.incident_id is not None and self.state not in ("stopped", "paused", "finished"):
            self._close_on_next_record = f"{a.kind} done (action {a.id})"

    async def _run_action(self, a: ActiveAction) -> None:
        from supervisor import remedies

        self.journal.action_running(a.id)
        self.log.info("action", id=a.id, kind=a.kind, params=a.params)
        try:
            outcome = await remedies.carry_out(self, a)
            self.journal.action_done(a.id, outcome)
            self.metrics.observe_action(a.kind, "done")
            if a.finding is not None and a.decision is not None:
                self.history.record(a.finding, a.decision)
                self.journal.set_meta("policy_history", self.history.to_dict())
            if self.state not in ("stopped", "paused", "finished"):
                self._close_on_next_record = f"{a.kind} done (action {a.id})"
            self.log.info("action done", id=a.id, kind=a.kind, outcome=outcome)
        except Exception as e:  # noqa: BLE001 - an action failing must not kill the daemon
            self.journal.action_failed(a.id, {"error": repr(e)})
            self.metrics.observe_action(a.kind, "failed")
            self.log.error("action failed", id=a.id, kind=a.kind, error=repr(e))
        finally:
            if self.action is a:
                self.action = None

    async def _resume_action(self, row: dict) -> None:
        """Finish an action a previous daemon journaled but did not complete (crash-only)."""
        from supervisor import remedies

        kind = row["kind"]
        params = row.get("params") or {}
        decision = Decision.from_dict({k: v for k, v in params.items() if k in Decision.__dataclass_fields__}
                                      | {"action": kind, "reason": params.get("reason", "resumed")}) \
            if kind in (set(ROLLBACK_ACTIONS) | set(RESTART_ACTIONS) | {STOP_PAGE}) else None
        a = ActiveAction(int(row["id"]), kind, params, None, decision,
                         directive_id=params.get("directive_id"))
        self.action = a
        self.log.info("resuming unfinished action", id=a.id, kind=kind, state=row.get("state"))
        try:
            outcome = await remedies.resume(self, a, row)
            if row.get("state") == "intent":
                self.journal.action_running(a.id)
            self.journal.action_done(a.id, outcome)
            self.metrics.observe_action(kind, "done")
            self.log.info("resumed action done", id=a.id, kind=kind, outcome=outcome)
        except Exception as e:  # noqa: BLE001
            if row.get("state") == "intent":
                self.journal.action_running(a.id)
            self.journal.action_failed(a.id, {"error": repr(e), "resumed": True})
            self.log.error("resumed action failed", id=a.id, kind=kind, error=repr(e))
        finally:
            if self.action is a:
                self.action = None
            if self.gen is None and self.state not in ("stopped", "finished", "paused"):
                await self._launch(load_step=self._newest_valid_step(), skip_batches=0, lr_scale=self.lr_scale,
                                   reason="no generation after resuming actions")

    def _newest_valid_step(self) -> int | None:
        """The newest valid checkpoint; corrupt ones met on the way are quarantined (never
        loaded, never deleted)."""
        from supervisor.remedies import _resolve_target

        try:
            return _resolve_target(self, 10**12)
        except LookupError:
            return None

    def send_directive(self, a: ActiveAction, **fields) -> Directive:
        d = Directive(id=f"a{a.id}", **fields)
        a.directive_id = d.id
        params = dict(a.params, directive_id=d.id)
        a.params = params
        self.journal.set_meta(f"action_{a.id}_directive", d.model_dump())
        self.pending[d.id] = d
        return d

    def status(self) -> dict:
        r = self.last_record
        a = self.action
        return {
            "run_id": self.settings.run.run_id, "state": self.state, "mode": self.mode,
            "generation": self.generation, "step": self.last_step, "total_steps": self.total_steps,
            "loss": _num(r.loss) if r else None, "grad_norm": _num(r.grad_norm) if r else None,
            "tokens_per_s": r.tokens_per_s if r else None, "lr": r.lr if r else None, "lr_scale": self.lr_scale,
            "last_known_good": self.last_known_good,
            "open_incidents": [i["id"] for i in self.journal.incidents(state="unresolved", limit=50)],
            "action": {"id": a.id, "kind": a.kind, "params": a.params} if a else None,
            "trainer_pids": dict(self.gen.rank_pids) if self.gen else {},
            "checkpoint_interval": self.checkpoint_interval,
            "recommended_checkpoint_interval": (
                {"steps": self.recommended_interval.steps, "seconds": self.recommended_interval.seconds,
                 "formula": self.recommended_interval.formula, "inputs": self.recommended_interval.inputs,
                 "clamped": self.recommended_interval.clamped}
                if self.recommended_interval else None),
        }

    # ------------------------------------------------------------------ reconcile loop -----
    async def reconcile_forever(self) -> None:
        interval = self.settings.launch.poll_interval_s
        while not self.finished.is_set():
            try:
                await self.reconcile_once()
            except Exception as e:  # noqa: BLE001 - the loop must survive a bad tick
                self.log.error("reconcile tick failed", error=repr(e))
            self.last_reconcile_at = time.monotonic()  # read by the systemd watchdog (service.py)
            await asyncio.sleep(interval)

    async def reconcile_once(self) -> None:
        now = time.time()
        gen = self.gen
        if gen is not None:
            for ex in gen.poll():
                self.log.warning("rank exited", generation=gen.generation, rank=ex.rank, exitcode=ex.exitcode,
                                 pid=ex.pid)
                if ex.exitcode != 0 and not gen.stopping:
                    for f in self.suite.observe_exit(ex.rank if ex.rank is not None else 0, ex.exitcode,
                                                     ex.wall_time, self.last_step, generation=gen.generation,
                                                     log_lines=ex.log_tail):
                        self._on_finding(f)
            if gen.exited is not None and self.gen is gen and self.action is None:
                await self._on_generation_exit(gen)
        for f in self.suite.tick(now):
            self._on_finding(f)

    async def _on_generation_exit(self, gen: Generation) -> None:
        finished = getattr(self, "_trainer_finished", None)
        self.journal.record_generation_end(gen.generation, exit_code=gen.exited,
                                           reason=finished[1] if finished else "exited", state="exited")
        self.gen = None
        self.suite.end_generation()
        if gen.exited == 0 and finished is not None:
            step, reason = finished
            self._trainer_finished = None
            if reason == "completed":
                self._flush_steps()
                self._close_incident("run completed")
                self._set_state("finished")
                self.log.info("run finished", step=step)
                self.finished.set()
            elif self.state not in ("paused", "stopped"):
                self._set_state("stopped")
            return
        if self.state in ("paused", "stopped", "finished"):
            return
        # A generation died without a finding that led to an action (e.g. killed before any
        # rank pid was known): treat it as a dead rank so the policy decides.
        f = Finding(kind=DEAD_RANK, step=self.last_step, severity=CRITICAL, wall_time=time.time(),
                    evidence={"exitcode": gen.exited, "detail": "torchrun exited"})
        self._on_finding(f)
