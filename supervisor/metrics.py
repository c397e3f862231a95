"""Prometheus metrics of the daemon (docs/architecture.md §2, §3): what Prometheus scrapes at /metrics.

The contract is the `SERIES` table below: every series with its type, unit, labels and meaning.
The registry is built from it and `docs/metrics.md` is generated from it
(`python -m supervisor.metrics_doc`), so the documentation cannot drift from the exposition;
`tests/unit/test_metrics_contract.py` checks both, and `promtool check metrics` on a scrape.

Naming follows Prometheus conventions: base units (seconds, bytes), `_total` on counters, unit
suffixes, `titan_run_info` for run identity, and bounded label sets only (kind/cause/action
enums, rank, node, HTTP route template and status code) — never a step number or free text.

Each `Metrics` owns its own ``CollectorRegistry`` (never the process-global default), so tests
and several supervisors in one process do not collide.

Failure model and guarantees:
- Updating a metric never raises on odd values: NaN / inf losses are exported as-is (that is
  what a non-finite step looks like), and unknown states or kinds simply add a label value.
- Gauges fed from step records follow the newest record by wall time; a late or resent older
  record does not move them backwards (counters it carries are still counted).
- Ages (checkpoint, last step, heartbeat per rank) are computed at scrape time from stored wall
  times, so they keep growing while nothing arrives; each is absent until its first event.
- ``dropped_records`` (and ``dropped_heartbeats``) on a StepRecord is the trainer process's running
  total (see training/telemetry.py), so ``titan_telemetry_dropped_records_total`` (and
  ``..._heartbeats_total``) grows by its increase per
  generation (a new generation is a new process whose count starts at 0); resent or
  reordered records never count twice.
- Restarts, rollbacks and lost work are attributed to the kind of the incident open when they
  happen (``observe_incident``), else ``operator``; the daemon has one open incident at a time.
- Scrape-time callbacks (``bind_mode``) that raise are skipped for that scrape, never fail it.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               Info, disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from supervisor.policy import MODES
from supervisor.protocol import record_field
from supervisor.run_state import STATES

# `*_created` series double the series count and Prometheus 2.x stores them as plain gauges:
# off for the whole (daemon) process.
disable_created_metrics()

GIB = 1024 ** 3
ROLLBACK_KINDS = frozenset({"rollback", "rollback_lr_down"})
RESTART_KINDS = frozenset({"restart", "kill_restart_hang", "exclude_node"})
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SAVE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class Series:
    """One line of the metrics contract (name without the namespace prefix)."""

    name: str
    type: str  # gauge | counter | histogram | info
    unit: str
    labels: tuple[str, ...]
    help: str


SERIES: tuple[Series, ...] = (
    Series("run", "info", "", ("run_id", "preset"), "Identity of the supervised run (value 1)."),
    Series("trainer_up", "gauge", "", (), "1 while a training generation is running under the supervisor."),
    Series("supervisor_state", "gauge", "", ("state",), "1 for the supervisor's current state, else 0."),
    Series("policy_mode", "gauge", "", ("mode",), "1 for the policy mode in force (auto, advise, off), else 0."),
    Series("policy_budget_remaining", "gauge", "", ("budget",),
           "Policy ladder budget left: rollbacks_run, rollbacks_region (newest region), restarts_window."),
    Series("human_needed", "gauge", "", (),
           "1 after the policy stopped the run and paged (budget exhausted) until it runs again."),
    Series("step", "gauge", "", (), "Newest optimizer step reported by rank 0."),
    Series("loss", "gauge", "", (), "Training loss at the newest step (NaN/Inf exported as-is)."),
    Series("grad_norm", "gauge", "", (), "Pre-clip total gradient norm at the newest step."),
    Series("lr", "gauge", "", (), "Learning rate at the newest step (after lr_scale)."),
    Series("lr_scale", "gauge", "", (), "LR scale the supervisor applied (1 = as scheduled)."),
    Series("tokens_per_second", "gauge", "tokens/s", (), "Training throughput at the newest step."),
    Series("step_seconds", "gauge", "seconds", (), "Wall seconds of the newest step (rank 0)."),
    Series("step_duration_seconds", "histogram", "seconds", (), "Distribution of step wall seconds (rank 0)."),
    Series("rank_step_seconds", "gauge", "seconds", ("rank", "node"),
           "Per-rank seconds of the newest gathered step (outside collective waits; every K steps)."),
    Series("rank_heartbeat_age_seconds", "gauge", "seconds", ("rank", "node"),
           "Seconds since each rank's last heartbeat of the current generation (scrape time)."),
    Series("last_step_age_seconds", "gauge", "seconds", (), "Seconds since the newest step record arrived (scrape time)."),
    Series("last_step_timestamp_seconds", "gauge", "seconds", (), "Wall time of the newest step record (Unix seconds)."),
    Series("peak_memory_bytes", "gauge", "bytes", (), "Peak accelerator memory at the newest step."),
    Series("generation", "gauge", "", (), "Current generation (process restart count of the job)."),
    Series("open_incidents", "gauge", "", ("kind",), "Incidents open (or acked) and not yet closed, by kind."),
    Series("incidents_total", "counter", "", ("kind",), "Incidents opened, by kind."),
    Series("findings_total", "counter", "", ("kind",), "Detector findings, by kind."),
    Series("decisions_total", "counter", "", ("action", "advisory"), "Policy decisions, by action."),
    Series("actions_total", "counter", "", ("kind", "result"), "Actions carried out, by kind and result."),
    Series("restarts_total", "counter", "", ("cause",), "Generations restarted by the supervisor, by incident kind."),
    Series("rollbacks_total", "counter", "", ("cause",), "Rollbacks carried out, by incident kind (operator for commands)."),
    Series("lost_steps_total", "counter", "", ("kind",), "Optimizer steps redone after rollbacks and restarts, by incident kind."),
    Series("lost_gpu_seconds_total", "counter", "seconds", ("kind",),
           "GPU-seconds lost to incidents (steps redone x step time x GPUs), by incident kind."),
    Series("updates_skipped_total", "counter", "", (), "Optimizer updates the trainer skipped."),
    Series("goodput_ratio", "gauge", "ratio", (),
           "Effective training time ratio (ETTR): final step x median step time / wall time since the run started."),
    Series("checkpoint_last_step", "gauge", "", (), "Step of the newest valid checkpoint."),
    Series("checkpoint_age_seconds", "gauge", "seconds", (), "Seconds since the newest checkpoint was saved (scrape time)."),
    Series("checkpoint_save_seconds", "gauge", "seconds", (), "Wall seconds the newest checkpoint save took."),
    Series("checkpoint_save_duration_seconds", "histogram", "seconds", (), "Distribution of checkpoint save seconds."),
    Series("checkpoint_interval_steps", "gauge", "steps", (), "Checkpoint interval applied to the trainer."),
    Series("checkpoint_interval_seconds", "gauge", "seconds", (),
           "Applied checkpoint interval in seconds (steps x median step time); the stale alert compares the age with it."),
    Series("recommended_checkpoint_interval_steps", "gauge", "steps", (),
           "Checkpoint interval that minimizes expected lost time (Young/Daly)."),
    Series("telemetry_dropped_records_total", "counter", "", (),
           "Telemetry records the trainer dropped (daemon slow or away)."),
    Series("telemetry_dropped_heartbeats_total", "counter", "", (),
           "Heartbeats of rank 0 its node agent's relay did not take (agent gone or refusing; agents backend)."),
    Series("http_requests_total", "counter", "", ("route", "code"),
           "HTTP requests answered, by route template and status code (4xx on /v1/telemetry = refused telemetry)."),
    Series("http_request_duration_seconds", "histogram", "seconds", ("route",),
           "HTTP handling latency by route template (ingest latency on /v1/telemetry)."),
    Series("journal_write_errors_total", "counter", "", (),
           "Journal (SQLite) write transactions that failed: disk full, I/O error, locked. Each is a lost record."),
    Series("nodes_excluded", "gauge", "", (),
           "Nodes the supervisor excluded from the run (drained, training goes on without them)."),
    Series("event_loop_lag_seconds", "gauge", "seconds", (),
           "How late the daemon's asyncio loop ran a 1 s timer (a blocked loop delays every decision)."),
    Series("supervisor_errors_total", "counter", "", ("kind",),
           "Faults of the daemon itself and refused input, by kind (journal_write, dead_letter, disk_full, "
           "heartbeat_refused, rate_limited, body_too_large, alert_dropped, loop_stall)."),
)

#: the kinds of `supervisor_errors_total` (bounded; `Metrics.error` refuses others)
ERROR_KINDS = ("journal_write", "dead_letter", "disk_full", "heartbeat_refused", "rate_limited", "body_too_large",
               "alert_dropped", "loop_stall")


class _ScrapeTime(Collector):
    """Series computed when Prometheus scrapes: ages from stored wall times, the policy mode."""

    def __init__(self, owner: "Metrics") -> None:
        self.m = owner

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        m, ns, now = self.m, self.m.config.namespace, self.m._clock()
        doc = {s.name: s.help for s in SERIES}

        def fam(name: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{ns}_{name}", doc[name], labels=list(labels))

        ckpt, last, hb, mode = (fam("checkpoint_age_seconds"), fam("last_step_age_seconds"),
                                fam("rank_heartbeat_age_seconds", ("rank", "node")), fam("policy_mode", ("mode",)))
        with m._lock:
            if m._ckpt_saved_at is not None:
                ckpt.add_metric([], max(0.0, now - m._ckpt_saved_at))
            if m._last_step_seen_at is not None:
                last.add_metric([], max(0.0, now - m._last_step_seen_at))
            for rank, (seen, host) in sorted(m._heartbeats.items()):
                hb.add_metric([str(rank), host], max(0.0, now - seen))
        if m._mode_source is not None:
            try:
                current = str(m._mode_source())
                for md in sorted(set(m.config.modes) | {current}):
                    mode.add_metric([md], 1.0 if md == current else 0.0)
            except Exception:  # noqa: BLE001 - a scrape never fails for a callback
                pass
        yield from (ckpt, last, hb, mode)


class Metrics:
    """All ``titan_*`` series, with update methods for step records, heartbeats, findings,
    incidents, decisions, actions, checkpoints and HTTP requests."""

    @dataclass
    class Config:
        namespace: str = "titan"
        states: tuple[str, ...] = STATES
        modes: tuple[str, ...] = MODES
        loop_lag_period_s: float = 1.0

    def __init__(self, config: Config | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or Metrics.Config()
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_wall = -math.inf
        # (field, generation) -> highest running total seen
        self._dropped_seen: dict[tuple[str, int], int] = {}
        self._state: str | None = None
        self._known_states: list[str] = list(self.config.states)
        self._incident_kind: str | None = None
        self._ckpt_saved_at: float | None = None
        self._last_step_seen_at: float | None = None
        self._heartbeats: dict[int, tuple[float, str]] = {}  # rank -> (received at, host)
        self._hb_generation: int | None = None
        self._mode_source: Callable[[], str] | None = None
        self._median_step_s: float | None = None
        self._interval_steps: int | None = None
        self._step_window: list[float] = []  # recent non-skipped step seconds (median)
        self.m: dict[str, Any] = {}
        self._build()
        self.generation = self.m["generation"]  # the daemon sets it on launch
        for s in self._known_states:
            self.m["supervisor_state"].labels(state=s).set(0)
        self.m["human_needed"].set(0)
        for kind in ERROR_KINDS:
            self.m["supervisor_errors_total"].labels(kind=kind)  # exported as 0 from the start
        self.m["nodes_excluded"].set(0)
        self._excluded: set[str] = set()

    def _build(self) -> None:
        ns, r = self.config.namespace, self.registry
        buckets = {"step_duration_seconds": STEP_BUCKETS, "http_request_duration_seconds": LATENCY_BUCKETS,
                   "checkpoint_save_duration_seconds": SAVE_BUCKETS}
        scrape_time = {"checkpoint_age_seconds", "last_step_age_seconds", "rank_heartbeat_age_seconds",
                       "policy_mode"}
        for s in SERIES:
            if s.name in scrape_time:
                continue
            full = f"{ns}_{s.name}"
            if s.type == "gauge":
                self.m[s.name] = Gauge(full, s.help, s.labels, registry=r)
            elif s.type == "counter":
                self.m[s.name] = Counter(full.removesuffix("_total"), s.help, s.labels, registry=r)
            elif s.type == "histogram":
                self.m[s.name] = Histogram(full, s.help, s.labels, buckets=buckets[s.name], registry=r)
            elif s.type == "info":
                self.m[s.name] = Info(full, s.help, registry=r)
        r.register(_ScrapeTime(self))

    # -- step records and heartbeats ------------------------------------------------------

    def observe_step(self, record: Any) -> None:
        """Update from a StepRecord (or a mapping with the same field names)."""
        m = self.m
        with self._lock:
            gen = int(record_field(record, "generation", 0) or 0)
            for field, series in (("dropped_records", "telemetry_dropped_records_total"),
                                  ("dropped_heartbeats", "telemetry_dropped_heartbeats_total")):
                total = int(record_field(record, field, 0) or 0)
                seen = self._dropped_seen.get((field, gen), 0)
                if total > seen:
                    m[series].inc(total - seen)
                    self._dropped_seen[(field, gen)] = total
            if record_field(record, "update_skipped", False):
                m["updates_skipped_total"].inc()
            secs = record_field(record, "step_seconds")
            if secs is not None and math.isfinite(secs):
                m["step_duration_seconds"].observe(secs)
                if not record_field(record, "update_skipped", False):
                    self._step_window = (self._step_window + [float(secs)])[-500:]
                    self._median_step_s = statistics.median(self._step_window)
                    self._update_interval_seconds()
            wall = float(record_field(record, "wall_time", 0.0) or 0.0)
            if wall < self._last_wall:
                return
            self._last_wall = wall
            self._last_step_seen_at = self._clock()
            for name, fld in (("step", "step"), ("generation", "generation"), ("loss", "loss"),
                              ("grad_norm", "grad_norm"), ("lr", "lr"), ("tokens_per_second", "tokens_per_s"),
                              ("step_seconds", "step_seconds")):
                m[name].set(record_field(record, fld))
            m["lr_scale"].set(record_field(record, "lr_scale", 1.0))
            m["peak_memory_bytes"].set((record_field(record, "peak_mem_gib", 0.0) or 0.0) * GIB)
            m["last_step_timestamp_seconds"].set(wall)
            for rank, t in enumerate(record_field(record, "rank_step_seconds", None) or []):
                host = self._heartbeats.get(rank, (0.0, ""))[1]
                m["rank_step_seconds"].labels(rank=str(rank), node=host).set(t)

    def observe_heartbeat(self, hb: Any) -> None:
        """A rank's heartbeat of the current generation (a new generation forgets the old ranks)."""
        gen = int(record_field(hb, "generation", 0) or 0)
        with self._lock:
            if self._hb_generation != gen:
                self._heartbeats.clear()
                self.m["rank_step_seconds"].clear()
                self._hb_generation = gen
            self._heartbeats[int(record_field(hb, "rank"))] = (self._clock(), str(record_field(hb, "host", "") or ""))

    # -- findings, incidents, decisions, actions --------------------------------------------

    def error(self, kind: str, n: int = 1) -> None:
        """Count a fault or a refusal (`ERROR_KINDS`)."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.m["supervisor_errors_total"].labels(kind=kind).inc(n)

    def observe_finding(self, kind: str) -> None:
        self.m["findings_total"].labels(kind=kind).inc()

    def observe_incident(self, kind: str) -> None:
        """An incident opened; restarts, rollbacks and lost work are attributed to it until closed."""
        with self._lock:
            if self._incident_kind is not None:
                self.m["open_incidents"].labels(kind=self._incident_kind).set(0)
            self._incident_kind = kind
            self.m["incidents_total"].labels(kind=kind).inc()
            self.m["open_incidents"].labels(kind=kind).set(1)

    def observe_incident_closed(self) -> None:
        with self._lock:
            if self._incident_kind is not None:
                self.m["open_incidents"].labels(kind=self._incident_kind).set(0)
            self._incident_kind = None

    @property
    def cause(self) -> str:
        """What restarts/rollbacks/lost work are attributed to right now."""
        return self._incident_kind or "operator"

    def observe_decision(self, action: str, advisory: bool = False) -> None:
        self.m["decisions_total"].labels(action=action, advisory=str(bool(advisory)).lower()).inc()

    def observe_action(self, kind: str, result: str, outcome: dict | None = None) -> None:
        """Count one finished action; ``result`` is done | failed | abandoned | sent. An
        ``exclude_node`` done with ``outcome["excluded"]`` true adds its node to the excluded set."""
        self.m["actions_total"].labels(kind=kind, result=result).inc()
        if result != "done":
            return
        if kind == "exclude_node" and outcome and outcome.get("excluded") and outcome.get("node"):
            self.set_excluded_nodes(self._excluded | {str(outcome["node"])})
        if kind in RESTART_KINDS:
            self.m["restarts_total"].labels(cause=self.cause).inc()
        elif kind in ROLLBACK_KINDS:
            self.m["rollbacks_total"].labels(cause=self.cause).inc()
        elif kind == "stop_page":
            self.m["human_needed"].set(1)

    def set_state(self, state: str) -> None:
        with self._lock:
            if state not in self._known_states:
                self._known_states.append(state)
            for s in self._known_states:
                self.m["supervisor_state"].labels(state=s).set(1 if s == state else 0)
            self._state = state
            if state == "running":
                self.m["human_needed"].set(0)

    @property
    def current_state(self) -> str | None:
        return self._state

    def bind_mode(self, source: Callable[[], str]) -> None:
        """``titan_policy_mode`` reads the mode from ``source`` at every scrape."""
        self._mode_source = source

    def set_policy_budget(self, config: Any, history: Any, now: float) -> None:
        """Budget left per rung, from the policy's Config and History (supervisor/policy.py)."""
        b = self.m["policy_budget_remaining"]
        b.labels(budget="rollbacks_run").set(config.max_total_rollbacks - len(history.rollbacks))
        newest = max(history.rollbacks, key=lambda r: r.wall_time, default=None)
        near = history.rollbacks_near(newest.onset_step, config.region_width_steps) if newest else []
        b.labels(budget="rollbacks_region").set(config.max_rollbacks_per_region - len(near))
        recent = history.restarts_since(now - config.restart_window_seconds)
        b.labels(budget="restarts_window").set(config.max_restarts - len(recent))

    def set_excluded_nodes(self, nodes) -> None:
        """The nodes excluded from the run so far (the daemon restores them from the journal)."""
        with self._lock:
            self._excluded = set(nodes)
            self.m["nodes_excluded"].set(len(self._excluded))

    def observe_journal_write_error(self) -> None:
        self.m["journal_write_errors_total"].inc()

    def set_up(self, up: bool) -> None:
        self.m["trainer_up"].set(1 if up else 0)

    # -- checkpoints, goodput, lost work ----------------------------------------------------

    def set_checkpoint(self, step: int, saved_at: float | None = None,
                       save_seconds: float | None = None) -> None:
        """The newest valid checkpoint, when it was saved (default: now) and how long it took."""
        self.m["checkpoint_last_step"].set(step)
        with self._lock:
            self._ckpt_saved_at = self._clock() if saved_at is None else float(saved_at)
        if save_seconds is not None and math.isfinite(save_seconds) and save_seconds >= 0:
            self.m["checkpoint_save_seconds"].set(save_seconds)
            self.m["checkpoint_save_duration_seconds"].observe(save_seconds)

    def set_goodput(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"goodput ratio must be in [0, 1], got {ratio}")
        self.m["goodput_ratio"].set(ratio)

    def add_lost(self, steps: int = 0, gpu_hours: float = 0.0, kind: str | None = None) -> None:
        """Work redone after a rollback/restart, attributed to ``kind`` (default: the open incident)."""
        if steps < 0 or gpu_hours < 0:
            raise ValueError("lost steps and GPU hours only grow")
        k = kind or self.cause
        self.m["lost_steps_total"].labels(kind=k).inc(steps)
        self.m["lost_gpu_seconds_total"].labels(kind=k).inc(gpu_hours * 3600.0)

    def inc_restarts(self, n: int = 1, cause: str | None = None) -> None:
        """For restarts not carried out through `observe_action` (e.g. adopted on startup)."""
        self.m["restarts_total"].labels(cause=cause or self.cause).inc(n)

    def set_checkpoint_interval(self, steps: int) -> None:
        self.m["checkpoint_interval_steps"].set(steps)
        self._interval_steps = steps
        self._update_interval_seconds()

    def _update_interval_seconds(self) -> None:
        if self._interval_steps and self._median_step_s:
            self.m["checkpoint_interval_seconds"].set(self._interval_steps * self._median_step_s)

    def set_recommended_checkpoint_interval(self, steps: int) -> None:
        self.m["recommended_checkpoint_interval_steps"].set(steps)

    def set_run_info(self, run_id: str, preset: str = "") -> None:
        self.m["run"].info({"run_id": run_id, "preset": str(preset)})

    # -- the daemon itself ------------------------------------------------------------------

    def observe_http(self, route: str, code: int, seconds: float) -> None:
        self.m["http_requests_total"].labels(route=route, code=str(code)).inc()
        self.m["http_request_duration_seconds"].labels(route=route).observe(seconds)

    def instrument(self, app: Any) -> None:
        """Count and time every request of a FastAPI/Starlette ``app`` by route template.

        A plain ASGI middleware, not Starlette's ``@app.middleware("http")``: that one runs every
        request in an extra anyio task group, which cost the heartbeat hot path more than the
        daemon's own work on it (bench/ingest.py)."""
        metrics = self

        def wrap(inner):
            async def count(scope, receive, send):  # noqa: ANN001 - ASGI
                if scope["type"] != "http":
                    return await inner(scope, receive, send)
                t0 = time.perf_counter()
                code = [500]

                async def send_status(message):
                    if message["type"] == "http.response.start":
                        code[0] = message["status"]
                    await send(message)

                try:
                    await inner(scope, receive, send_status)
                finally:
                    route = scope.get("route")  # set by the router on this same scope
                    metrics.observe_http(getattr(route, "path", None) or "unmatched", code[0],
                                         time.perf_counter() - t0)
            return count

        self.add_asgi_middleware(app, wrap)

    @staticmethod
    def add_asgi_middleware(app: Any, wrap) -> None:  # noqa: ANN001
        """Add ``wrap(inner_app) -> ASGI callable`` as the app's outermost middleware so far."""
        app.add_middleware(_AsgiWrap, wrap=wrap)

    async def watch_loop_lag(self) -> None:
        """Run forever in the daemon's loop: how late a periodic timer fires is the loop lag."""
        period = self.config.loop_lag_period_s
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(period)
            self.m["event_loop_lag_seconds"].set(max(0.0, loop.time() - t0 - period))

    # -- exposition ------------------------------------------------------------------------

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class _AsgiWrap:
    """Starlette middleware shim: ``wrap(app)`` returns the ASGI callable to run instead."""

    def __init__(self, app, wrap) -> None:  # noqa: ANN001 - ASGI
        self._call = wrap(app)

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        await self._call(scope, receive, send)
