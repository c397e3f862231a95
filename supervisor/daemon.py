"""The supervisor daemon: wiring and the reconcile loop (docs/architecture.md).

One data path: ``StepRecord -> detectors -> Finding -> policy -> Decision -> remedy -> journal +
metrics + annotations``. The detectors and the policy are pure; side effects live in the parts
wired here, each owning one concern: `Generations` (launch/stop/adopt), `DirectiveChannel` (send, acknowledge),
`ActionRunner` (one heavy action at a time), `Remedies` (action -> what to do), `CheckpointLedger`
(quarantine, pins, retention), `RunStatus` (state transitions), `IncidentTracker`.

Reconcile loop: every `launch.poll_interval_s` the daemon compares what it wants (a generation
running the run to its last step, or nothing when paused/stopped/finished) with what it observes
(rank exits, heartbeats, step progress) and hands every difference to the policy as a finding.
With `[launch] warm_spare` it also wants one spare generation parked while the run is active
(started only once the current generation trains and no action runs; `_reconcile_spare`).

Crash-only: durable state is the journal (SQLite) and the checkpoint folder. A daemon restarted
after any crash re-reads the journal, re-adopts the running generation, journals what it missed
from the trainer's spool, and finishes any action whose intent was journaled without an outcome.
Training never waits for the daemon.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import statistics
import time
from pathlib import Path

from supervisor import log
from supervisor.actions import ActionRunner, DecisionLoop
from supervisor.interval_advisor import IntervalAdvisor
from supervisor.checkpoints import Catalog
from supervisor.detect.findings import CRITICAL, DEAD_RANK, HARDWARE, SPIKE_RECOVERED, Finding
from supervisor.detect.suite import DetectorSuite
from supervisor.directives import DirectiveChannel
from supervisor.alert_receiver import AlertReceiver
from supervisor.auth import token_matches, trainer_token_hashes
from supervisor.dead_letter import DeadLetters, private_dirs
from supervisor.generations import Generations, PreflightFailed
from supervisor.grow import GROW, GrowBack, PastGrow
from supervisor.health import Health, LoopLagGuard
from supervisor.incidents import IncidentTracker
from supervisor.journal import Journal
from supervisor.launch.agents import AgentLauncher, LaunchError
from supervisor.launch.local import LaunchSpec, LocalLauncher
from supervisor.nodes import NodeRegistry
from supervisor.ledger import CheckpointLedger
from supervisor.metrics import Metrics
from supervisor.pager import Pager
from supervisor.policy import History, Policy, RunState
from supervisor.protocol import Heartbeat, StepRecord, TelemetryBatch, TelemetryReply
from supervisor.remedies import Remedies
from supervisor.run_plan import LayoutFallback, trainer_flags
from supervisor.run_state import AT_REST, RunStatus
from supervisor.settings import ConfigError, Settings
from supervisor.spool import SpoolError, read_spool, spool_path

TRAINER_TOKEN_ENV = "TITAN_SUPERVISOR_TRAINER_TOKEN"


def _delegate(owner: str, name: str) -> property:
    """`sup.<x>` reads (and, for tests and fixtures, writes) the one owner's attribute."""
    return property(lambda self: getattr(getattr(self, owner), name),
                    lambda self, value: setattr(getattr(self, owner), name, value))


class Supervisor:
    def __init__(self, settings: Settings, *, logger=None) -> None:
        self.settings = s = settings
        self.log = logger or log.get()
        self.workdir = s.run.workdir.resolve()
        private_dirs(self.workdir / "supervisor")  # 0700: journal, dead letters (hostile-input issue)
        self.journal = j = Journal.open(s.journal_path, s.journal)
        self.metrics = Metrics()
        self.health = Health(self.metrics, self.log)
        self.metrics.set_run_info(s.run.run_id, preset=s.run.preset)
        self.catalog = Catalog(self.workdir / "checkpoint", self.workdir / "quarantine", s.checkpoints.catalog)
        self.ledger = CheckpointLedger(self.catalog, j, self.log)
        self.suite = DetectorSuite(s.detector_config(), reference=self._reference_curve())
        self.decisions = DecisionLoop(Policy(s.policy_config()), History.from_dict(j.get_meta("policy_history") or {}))
        self.metrics.set_policy_budget(self.decisions.policy.config, self.decisions.history, time.time())
        self.status = RunStatus(j, self.metrics, self.log, total_steps=s.run.steps)
        j.on_write_error = self._journal_write_error
        self.nodes = NodeRegistry(s.launch.agents.registry_config(), journal=j, log=self.log,
                                  on_kernel_event=self._on_kernel_event)
        self.grow = GrowBack(s.launch.agents.grow_config())  # pure: fed by _reconcile_nodes
        self._grows: list[PastGrow] | None = None  # the journal's grow actions, read once when first needed
        self.metrics.set_excluded_nodes(self._excluded_nodes() | self.nodes.excluded)
        self.annotator, annotations = self._annotations()  # None, None unless [grafana] url is set
        self.incidents = IncidentTracker(j, self.metrics, listener=annotations, log=self.log)
        self.directives = DirectiveChannel(j, spool_path(self.workdir), max_acks=s.daemon.directive_acks_kept,
                                           poll_s=s.launch.directive_poll_s)
        self.generations = Generations(self._launcher(), j, self.log, self.metrics,
                                       spec=self._spec, stop_grace_s=s.launch.stop_grace_s, run_id=s.run.run_id,
                                       hooks=self)
        self.pager = Pager(s.page.webhook_url, j, self.metrics, self.log, context=self._page_context,
                           attempts=s.page.attempts, max_wait_s=s.page.backoff_max_s, timeout_s=s.page.timeout_s)
        self.step_times: list[float] = []
        self.remedies = Remedies(generations=self.generations, ledger=self.ledger, directives=self.directives,
                                 pager=self.pager, journal=j, status=self.status, suite=self.suite,
                                 metrics=self.metrics, log=self.log, step_times=self.step_times,
                                 ranks=self.ranks, directive_timeout_s=s.launch.directive_timeout_s,
                                 poll_s=s.launch.directive_poll_s, stack_dump_chars=s.launch.stack_dump_chars,
                                 layouts=LayoutFallback(s))
        self.runner = ActionRunner(self.decisions, self.remedies, j, self.metrics, self.log, spawn=self.spawn,
                                   context=lambda: {"generation": self.generation, "from_step": self.last_step},
                                   on_done=self._action_done, listener=annotations)
        self.dead_letters = DeadLetters(self.workdir / "supervisor" / "dead-letter.jsonl", self.health)
        self.alerts = AlertReceiver(self.suite, self.on_finding, lambda: self.last_step, s.server.alerts,
                                    on_drop=lambda n: self.health.metrics_only("alert_dropped", n))
        self.loop_guard = LoopLagGuard(LoopLagGuard.Config(), s.launch.poll_interval_s)
        self.interval = IntervalAdvisor(s.checkpoints, s.run.checkpoint_interval, s.run.preset, j, self.metrics)
        self.mode = j.get_meta("mode", s.mode)
        # per rank, per optimizer step (gradient accumulation): the trainer's `started` event says
        self.batches_per_step: int = int(j.get_meta("batches_per_step", 1) or 1)
        self.metrics.bind_mode(lambda: self.mode)
        self.url = ""  # set by the server once bound
        self.last_record: StepRecord | None = None
        self._steps_buffer: list[StepRecord] = []
        self._tasks: set[asyncio.Task] = set()
        self._lkg_candidate: int | None = None
        self._last_record_generation: int | None = None
        j.record_run(s.run.run_id, {"preset": s.run.preset, "workdir": str(self.workdir)})
        # The secret the ranks present on telemetry/heartbeats: made fresh by each daemon process and
        # handed to the ranks it launches; only hashes are journaled, so a restarted daemon still
        # admits the ranks of a re-adopted generation. Never logged.
        self.trainer_token: str | None = None
        self._trainer_hashes: list[str] = []
        self._refused, self._refused_logged_at = 0, -1e9  # heartbeats refused, logged at most every 10 s
        if s.server.require_trainer_token:
            self.trainer_token = secrets.token_urlsafe(32)
            self._trainer_hashes = trainer_token_hashes(j, self.trainer_token)

    def _launcher(self):
        """The launcher `launch.backend` names (the Kubernetes client is imported only when used), or
        torchft replica groups when `fault_tolerance.mode` says so."""
        launch = self.settings.launch
        if self.settings.fault_tolerance.mode == "torchft":
            from supervisor.launch.torchft import TorchftLauncher

            return TorchftLauncher(self.settings.fault_tolerance, self.workdir / "logs", launch.local)
        if launch.backend == "kubernetes":
            from supervisor.launch.kubernetes import KubernetesLauncher

            return KubernetesLauncher(launch.kubernetes, stop_grace_s=launch.stop_grace_s)
        if launch.backend == "agents":
            return AgentLauncher(self.nodes, launch.agents, stop_grace_s=launch.stop_grace_s)
        return LocalLauncher(self.workdir / "logs", launch.local,
                             spares_dir=self.workdir / "spares" if launch.warm_spare else None)

    # -- views of the owners' state, for the API, the CLI and tests ---------------------------------
    state = _delegate("status", "state")
    last_step = _delegate("status", "last_step")
    lr_scale = _delegate("status", "lr_scale")
    total_steps = _delegate("status", "total_steps")
    finished = _delegate("status", "finished")
    generation = _delegate("generations", "id")
    gen = _delegate("generations", "current")
    action = _delegate("runner", "current")
    pending = _delegate("directives", "pending")
    last_known_good = property(lambda self: self.ledger.last_known_good)
    # ranks per node of the current generation: the run's nproc_per_node unless a reshard changed it
    ranks = property(lambda self: self.generations.ranks or self.settings.run.nproc_per_node)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Re-adopt or launch, and finish whatever the last daemon left half done."""
        self.spawn(self.metrics.watch_loop_lag())
        self.spawn(self.alerts.drain())
        last = self.journal.last_generation()
        adopted = False
        self.generations.kill_stale_spare()
        if last is not None:
            self.generations.id = int(last["id"])
            self.status.lr_scale = float(last.get("lr_scale") or 1.0)
            if last.get("state") == "running" and self.generations.adopt(last, self.status.lr_scale):
                adopted = True
                self.suite.reset_generation(self.generation, time.time(), resume_step=None,
                                            world_size=getattr(self.gen, "world_size", self.ranks))
                self._catch_up_from_spool()
                self.status.set("running")
        prior = self.journal.get_meta("state")
        if prior in AT_REST and not adopted:
            newest = self.journal.recent_steps(limit=1)
            self.status.last_step = int(newest[-1]["step"]) if newest else 0
            self.status.finish() if prior == "finished" else self.status.set(prior)
            return
        unfinished = self.journal.unfinished_actions()
        if unfinished:
            self.spawn(self._finish_unfinished(unfinished))
        elif not adopted:
            # A first start begins from scratch; a run whose trainer vanished with the daemon
            # (a machine reboot) resumes from its newest valid checkpoint.
            load = None if last is None else self.ledger.load_target()
            await self.launch(load, reason="initial start" if last is None else "restart after the trainer was lost")

    async def launch(self, load_step: int | None, *, reason: str) -> None:
        try:
            await self.generations.launch(load_step=load_step, skip_batches=self.remedies.carried_skip(load_step),
                                          lr_scale=self.status.lr_scale, reason=reason)
        except PreflightFailed:
            pass  # state "failed", paged (before_launch); the service exits non-zero
        except LaunchError:
            self.status.set("failed")  # paged (launch_failed); the service exits non-zero
            self.status.finished.set()

    async def _finish_unfinished(self, rows: list[dict]) -> None:
        for row in rows:
            await self.runner.resume(row)
        if self.gen is None and not self.status.at_rest:
            await self.launch(self.ledger.load_target(), reason="no generation after resuming actions")

    def _catch_up_from_spool(self) -> None:
        """Rebuild the detectors' windows from the trainer's spool and journal the steps the daemon
        missed while it was down. Findings from this replay are not acted on again."""
        journaled = {r["step"] for r in self.journal.recent_steps(limit=self.settings.daemon.catchup_journal_steps, generation=self.generation)}
        segment: list[StepRecord] = []
        missed: list[StepRecord] = []
        for obj in read_spool(spool_path(self.workdir), strict=False):
            if "kind" in obj or obj.get("generation") != self.generation:
                continue
            try:
                rec = StepRecord.model_validate(obj)
            except ValueError:
                continue
            if segment and rec.step <= segment[-1].step:
                segment = []  # a rollback rewound the steps: only the live segment matters
            segment.append(rec)
            if rec.step not in journaled:
                missed.append(rec)
        for rec in segment:
            self.suite.observe_record(rec)
            self.status.last_step = rec.step
        if missed:
            self.journal.add_steps(missed)
            self.log.info("journaled steps missed while down", count=len(missed))

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self.generations.keep_spare(keep=False, start=False)
        self._flush_steps()
        if self.annotator is not None:  # send what is queued, but never wait long for Grafana
            await asyncio.to_thread(self.annotator.close, self.settings.grafana.timeout_s)
        self.journal.close()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task crashed", error=repr(task.exception()))

    # -- generation hooks (called by Generations) ----------------------------------------------------
    def _spec(self, generation: int, *, load_step, skip_batches: int, lr_scale: float, ramp_steps: int = 0,
              layout_index: int | None = None) -> LaunchSpec:
        r = self.settings.run
        return LaunchSpec(generation=generation, nproc=self.ranks, preset=r.preset, workdir=self.workdir,
                          supervisor_url=self.url, run_id=r.run_id, load_step=load_step,
                          skip_batches=skip_batches, lr_scale=lr_scale, lr_ramp_steps=ramp_steps,
                          steps=self.status.total_steps, checkpoint_interval=self.interval.current,
                          faults=r.faults, extra_args=trainer_flags(self.settings, layout_index), python=r.python,
                          env=dict(r.env, **({TRAINER_TOKEN_ENV: self.trainer_token} if self.trainer_token else {})),
                          optimizer_json=self._optimizer_json())

    def before_launch(self) -> None:
        if not self.settings.preflight.enabled:
            return
        try:
            self.run_preflight()
        except PreflightFailed as e:
            self.log.error("preflight failed: launch refused", error=str(e))
            self.status.set("failed")
            self.pager.page(f"launch refused by preflight: {e}")
            self.status.finished.set()
            raise

    def on_launch(self, generation: int, load_step: int | None, nproc: int, lr_scale: float) -> None:
        self.directives.clear()
        self.suite.reset_generation(generation, time.time(), resume_step=load_step, world_size=nproc)
        self.status.lr_scale = lr_scale
        self.status.set("starting")

    def launch_failed(self, generation: int, error: Exception) -> None:
        """The launcher could not start a generation (node agents: too few nodes, a node failed to
        start or confirm): a human must know; the remedy that asked fails and says why."""
        self.log.error("generation could not start", generation=generation, error=str(error)[:1000])
        self.pager.page(f"generation {generation} could not start: {error}")

    def on_stop(self) -> None:
        self.suite.end_generation()  # exits from here on are ours, not findings

    def _optimizer_json(self) -> str:
        o = self.settings.optimizer.overrides()
        return json.dumps(o) if o else ""

    def _annotations(self):
        """The Grafana annotator and the incident/action listener posting to it (supervisor/annotations.py)."""
        g = self.settings.grafana
        if not g.url:
            return None, None
        from supervisor.annotations import GrafanaAnnotator, IncidentAnnotations

        annotator = GrafanaAnnotator(GrafanaAnnotator.Config(
            url=g.url, token=g.read_token(), dashboard_uid=g.dashboard_uid, timeout_s=g.timeout_s,
            attempts=g.attempts, backoff_initial_s=g.backoff_initial_s, backoff_max_s=g.backoff_max_s,
            queue_size=g.queue_size), logger=self.log)
        return annotator, IncidentAnnotations(annotator, self.settings.run.run_id)

    def _journal_write_error(self, error) -> None:
        self.metrics.observe_journal_write_error()
        self.log.error("journal write failed", error=repr(error)[:300])

    def _excluded_nodes(self) -> set[str]:
        return {str(a["outcome"]["node"]) for a in self.journal.actions(limit=10_000)
                if a["kind"] == "exclude_node" and a["state"] == "done" and isinstance(a.get("outcome"), dict)
                and a["outcome"].get("excluded") and a["outcome"].get("node")}

    def _on_kernel_event(self, node: str, ev) -> None:
        """A node agent's kernel-log match (Xid, ECC): a hardware finding naming the node."""
        for f in self.suite.observe_log(ev.line, wall_time=time.time(), step=self.last_step, host=node):
            self.on_finding(f)

    def _page_context(self) -> dict:
        return {"run_id": self.settings.run.run_id, "state": self.state, "step": self.last_step,
                "generation": self.generation}

    def _reference_curve(self):
        path = self.settings.convergence.reference_spool
        if path is None:
            return None
        from supervisor.detect.convergence import reference_from_spool_lines

        try:
            curve = reference_from_spool_lines(read_spool(Path(path), strict=True))
        except SpoolError as e:
            raise ConfigError(f"convergence.reference_spool: {e}") from None
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
            report = preflight(build_plan(self.settings, psutil.virtual_memory().total / 2**30), pf.thresholds)
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
            if not pf.override_reason:
                raise PreflightFailed("preflight found errors (set preflight.override_reason to launch anyway):\n" + text)
            self.log.warning("preflight errors overridden", reason=pf.override_reason, report=text)
            self.journal.set_meta("preflight_override", {"reason": pf.override_reason, "at": time.time()})
        elif report.all_issues():
            self.log.info("preflight", report=text)
        return summary

    # -- telemetry ----------------------------------------------------------------------------------
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
        return TelemetryReply(accepted=len(batch.records), directives=list(self.directives.pending.values()))

    def trainer_allowed(self, presented: str | None) -> bool:
        """The trainer token check (always True when none is required)."""
        if self.trainer_token is None:
            return True
        return bool(presented) and token_matches(presented, self._trainer_hashes)

    def heartbeat(self, hb: Heartbeat, *, agent: str | None = None) -> str | None:
        """Feed a heartbeat of the current generation; a refusal reason for a rank or pid that is not
        one of this generation's (nothing is recorded then: a forged pid must never be signalled).
        ``agent``: relayed in that node agent's report, which must run the rank (`note_rank_pid`)."""
        if hb.run_id != self.settings.run.run_id or hb.generation != self.generation:
            return None
        why = self.generations.note_rank_pid(hb.rank, hb.pid, ranks=self.ranks, agent=agent)
        if why is not None:
            self.heartbeat_refused(hb, why)
            return why
        self.metrics.observe_heartbeat(hb)
        for f in self.suite.observe_heartbeat(hb):
            self.on_finding(f)
        return None

    def heartbeat_refused(self, hb: Heartbeat, why: str) -> None:
        """Count a refused heartbeat (and log it, at most every 10 s: a flood must not fill the log)."""
        self.health.metrics_only("heartbeat_refused")
        self._refused += 1
        if time.monotonic() - self._refused_logged_at >= 10.0:
            self.log.warning("heartbeat refused", rank=hb.rank, pid=hb.pid, why=why,
                             refused_since_last_log=self._refused)
            self._refused, self._refused_logged_at = 0, time.monotonic()

    def _on_record(self, rec: StepRecord) -> None:
        if self.state in ("starting", "recovering") and self._last_record_generation != self.generation:
            self.status.set("running")  # the first step of a new generation
        self._last_record_generation = self.generation
        self._steps_buffer.append(rec)
        self.last_record = rec
        if not self.runner.busy:
            self.incidents.training_resumed(rec.step)
        self.metrics.observe_step(rec)
        self.status.last_step = rec.step
        if math.isfinite(rec.step_seconds) and not rec.update_skipped:
            self.step_times.append(rec.step_seconds)
            del self.step_times[:-self.settings.daemon.step_time_window]
        for f in self.suite.observe_record(rec):
            self.on_finding(f)
        self._maybe_pin_last_known_good(rec.step)
        self._update_goodput()

    def _flush_steps(self) -> None:
        """Journal the buffered steps. A batch that fails is retried record by record; a record that
        still fails goes to the dead-letter file with the reason, so one poisoned record never
        wedges the pipeline (the buffer is always emptied)."""
        rows, self._steps_buffer = self._steps_buffer, []
        if not rows:
            return
        try:
            self.journal.add_steps(rows)
            return
        except Exception as e:  # noqa: BLE001 - any failure is handled record by record below
            batch_error = e
        for rec in rows:
            try:
                self.journal.add_steps([rec])
            except Exception as e:  # noqa: BLE001
                self.dead_letters.put("step", rec, e)
        self.log.warning("step batch failed to journal; retried record by record", error=repr(batch_error))

    def _on_event(self, ev) -> None:
        if ev.kind == "checkpoint_saved":
            self.ledger.saved(ev.step, str(self.workdir / "checkpoint" / f"step-{ev.step}"), ev.seconds, ev.wall_time)
            self.metrics.set_checkpoint(ev.step, saved_at=ev.wall_time, save_seconds=ev.seconds)
            if self.incidents.current is None:
                self._lkg_candidate = ev.step
            self._advise_interval()
            if self.settings.checkpoints.catalog.keep_last:
                self.ledger.apply_retention()
        elif ev.kind == "directive_applied":
            self.directives.applied(ev)
            self.log.info("directive applied", id=ev.directive_id, directive=ev.directive, ok=ev.ok,
                          detail=ev.detail, step=ev.step)
        elif ev.kind == "started":
            self.status.last_step = ev.step
            if ev.batches_per_step != self.batches_per_step:  # gradient accumulation changed (a reshard)
                self.batches_per_step = ev.batches_per_step
                self.journal.set_meta("batches_per_step", ev.batches_per_step)
            self.log.info("trainer started", generation=self.generation, step=ev.step, world_size=ev.world_size,
                          dp_degree=ev.dp_degree, batches_per_step=ev.batches_per_step,
                          samples_consumed=ev.samples_consumed)
        elif ev.kind == "finished":
            self.log.info("trainer finished", generation=self.generation, step=ev.step, reason=ev.reason)
            self.status.trainer_finished = (ev.step, ev.reason)
            self.suite.end_generation()  # ranks going quiet now is expected, not a finding
            if self.gen is not None:
                self.gen.exit_expected = True

    def _advise_interval(self) -> None:
        """Young/Daly: apply the recommended checkpoint interval to the live trainer."""
        change = self.interval.recommend(self.step_times, self.generations.first_start, time.time(),
                                         may_apply=not self.runner.busy and self.generations.alive())
        if change is not None:
            self.runner.send_directive("set_checkpoint_interval", change.params, change.directive, actor="policy",
                                       request_id=None, reason=change.reason)
            self.log.info("checkpoint interval", steps=change.steps, was=change.params["was"], reason=change.reason)

    def _maybe_pin_last_known_good(self, step: int) -> None:
        """A checkpoint with healthy telemetry after it becomes the pinned last-known-good."""
        c = self._lkg_candidate
        if c is not None and self.incidents.current is None and step >= c + self.settings.checkpoints.lkg_healthy_steps:
            self.ledger.pin_last_known_good(c)
            self._lkg_candidate = None

    def _update_goodput(self) -> None:
        start = self.generations.first_start
        if start is None or not self.step_times or time.time() <= start:
            return
        useful = self.last_step * statistics.median(self.step_times)
        self.metrics.set_goodput(min(1.0, useful / (time.time() - start)))

    # -- findings -> decisions ----------------------------------------------------------------------
    def run_state(self) -> RunState:
        return RunState(current_step=self.last_step, generation=self.generation,
                        valid_checkpoints=self.ledger.valid_steps(), last_known_good=self.last_known_good,
                        batches_per_step=self.batches_per_step, lr_scale=self.lr_scale, trainer_alive=self.generations.alive(),
                        mode=self.mode)

    def on_finding(self, f: Finding) -> None:
        """The one entry point for findings: journal, decide (unless an action runs), act."""
        self.metrics.observe_finding(f.kind)
        if self.incidents.open_for(f, self.generation):
            self._lkg_candidate = None
        fid = self.journal.add_finding(f.kind, f.step, f.severity, f.evidence, incident_id=self.incidents.current,
                                       rank=f.rank, wall_time=f.wall_time)
        self.log.info("finding", kind=f.kind, step=f.step, severity=f.severity, rank=f.rank, evidence=f.evidence)
        decision = self.decisions.decide(f, self.run_state())
        if f.kind == HARDWARE:  # counted per host by the history: durable before the next one comes
            self.journal.set_meta("policy_history", self.decisions.history.to_dict())
        if decision is None:
            self.log.info("finding while an action runs: recorded, no new decision", kind=f.kind,
                          action=self.decisions.in_flight.kind)
            return
        did = self.journal.add_decision(decision.action, decision.to_dict(), decision.reason,
                                        incident_id=self.incidents.current, finding_id=fid, advisory=decision.advisory)
        self.metrics.observe_decision(decision.action, decision.advisory)
        self.log.info("decision", action=decision.action, reason=decision.reason, advisory=decision.advisory)
        if f.kind == SPIKE_RECOVERED:
            self.incidents.close("spike recovered by itself")
        if decision.acts:
            self.runner.begin(decision, f, did)

    def _action_done(self, a) -> None:
        self.journal.set_meta("policy_history", self.decisions.history.to_dict())
        if a.kind == "exclude_node":
            self.metrics.set_excluded_nodes(self._excluded_nodes() | self.nodes.excluded)
        self.metrics.set_policy_budget(self.decisions.policy.config, self.decisions.history, time.time())
        if not self.status.at_rest:
            self.incidents.close_when_training_resumes(f"{a.kind} done (action {a.id})")

    # -- reconcile loop -----------------------------------------------------------------------------
    async def reconcile_forever(self) -> None:
        while not self.finished.is_set():
            try:
                await self.reconcile_once()
            except Exception as e:  # noqa: BLE001 - the loop must survive a bad tick
                self.log.error("reconcile tick failed", error=repr(e))
            self.last_reconcile_at = time.monotonic()  # read by the systemd watchdog (service.py)
            await asyncio.sleep(self.settings.launch.poll_interval_s)
            self._check_own_stall(time.monotonic() - self.last_reconcile_at)

    def _check_own_stall(self, slept_s: float) -> None:
        """The hang detector must not blame the ranks for the daemon's own stall: when the loop ran
        late, heartbeats that arrived meanwhile are still queued, so hang deadlines are deferred."""
        stalled = self.loop_guard.stalled(slept_s)
        if stalled is not None:
            self.health.metrics_only("loop_stall")
            self.log.warning("event loop stalled; hang deadlines deferred", seconds=round(stalled, 3))
            self.suite.expect_pause(time.time() + stalled)

    async def reconcile_once(self) -> None:
        """Observed vs desired: rank exits and silent deadlines become findings; a generation that
        ended is closed and, if the run should still be training, handed to the policy."""
        gen = self.gen
        self.generations.flush_pids(due_only=True)  # rank pids still unjournaled (batched: see Generations)
        if gen is not None:
            for ex in gen.poll():
                self.log.warning("rank exited", generation=gen.generation, rank=ex.rank, exitcode=ex.exitcode,
                                 pid=ex.pid)
                if ex.exitcode != 0 and not gen.stopping:
                    for f in self.suite.observe_exit(ex.rank if ex.rank is not None else 0, ex.exitcode,
                                                     ex.wall_time, self.last_step, generation=gen.generation,
                                                     log_lines=ex.log_tail, host=ex.host,
                                                     oom_killed=ex.oom_killed):
                        self.on_finding(f)
            if gen.exited is not None and self.gen is gen and not self.runner.busy:
                self._on_generation_exit(gen)
        self._reconcile_nodes()
        for f in self.suite.tick(time.time()):
            self.on_finding(f)
        self._reconcile_spare()

    def _reconcile_spare(self) -> None:
        """A warm spare is kept while the run is active; a new one starts only once the current
        generation trains and no action runs, so its start-up never competes with a restart's."""
        keep = self.settings.launch.warm_spare and not self.status.at_rest
        start = keep and self.status.state == "running" and self.generations.alive() and not self.runner.busy
        self.generations.keep_spare(keep=keep, start=start)

    def _reconcile_nodes(self) -> None:
        """Desired nodes (live agents, not excluded) vs the running generation's: a node that
        returned grows the run back at the next checkpoint (`GrowBack` decides, purely; the `grow`
        remedy stops and restarts). Only for node agents, only while training runs undisturbed."""
        gen = self.gen
        s = self.settings
        if (s.launch.backend != "agents" or s.fault_tolerance.mode == "torchft" or gen is None
                or self.runner.busy or self.state != "running" or self.mode != "auto" or not gen.alive()):
            return
        live, have = self.nodes.live_since(), tuple(getattr(gen, "nodes", ()) or ())
        past = self._past_grows() if set(live) - set(have) else []
        valid = self.ledger.valid_steps()
        plan = self.grow.tick(now=time.time(), step=self.last_step, newest_checkpoint=valid[-1] if valid else None,
                              in_generation=have, live_since=live, expected=tuple(s.launch.agents.nodes), past=past,
                              final_step=self.total_steps)
        if plan is None:
            return
        self.grow.started(plan)
        self.log.warning("growing back", reason=plan.reason, nodes_from=plan.nodes_from, nodes_to=plan.nodes_to)
        self.runner.start(GROW, plan.params(), actor="policy", request_id=None)
        self._past_grows().append(PastGrow(time.time(), plan.returned))

    def _past_grows(self) -> list[PastGrow]:
        """The grow-backs the anti-flap budget counts (`GrowBack` applies the window)."""
        if self._grows is None:
            self._grows = [PastGrow(float(a.get("created_at") or 0.0), tuple((a.get("params") or {}).get("returned") or ()))
                           for a in self.journal.actions(limit=10_000) if a["kind"] == GROW]
        return self._grows

    def _on_generation_exit(self, gen) -> None:
        finished, self.status.trainer_finished = self.status.trainer_finished, None
        self.generations.ended(gen, finished[1] if finished else "exited")
        self.suite.end_generation()
        if gen.exited == 0 and finished is not None:
            if finished[1] == "completed":
                self._flush_steps()
                self.incidents.close("run completed")
                self.log.info("run finished", step=finished[0])
                self.status.finish()
            elif not self.status.at_rest:
                self.status.set("stopped")
        elif not self.status.at_rest:
            # Died without a finding that led to an action (e.g. killed before any rank pid was
            # known): a dead rank, for the policy to decide.
            self.on_finding(Finding(kind=DEAD_RANK, step=self.last_step, severity=CRITICAL, wall_time=time.time(),
                                    evidence={"exitcode": gen.exited, "detail": "torchrun exited"}))
