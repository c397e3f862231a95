"""Prometheus metrics of the daemon (DESIGN.md §2, §3): what Prometheus scrapes at /metrics.

Each `Metrics` owns its own ``CollectorRegistry`` (never the process-global default), so tests
and several supervisors in one process do not collide.

Failure model and guarantees:
- Updating a metric never raises on odd values: NaN / inf losses are exported as-is (that is
  what a non-finite step looks like), and unknown states or kinds simply add a label value.
- Gauges fed from step records follow the newest record by wall time; a late or resent older
  record does not move them backwards (counters it carries are still counted).
- ``titan_last_checkpoint_age_seconds`` is computed at scrape time from the stored save time,
  so it keeps growing while nothing saves; it is absent until a checkpoint is known.
- ``dropped_records`` on a StepRecord is the trainer process's running total (see
  training/telemetry.py), so ``titan_dropped_records_total`` grows by its increase per
  generation (a new generation is a new process whose count starts at 0); resent or
  reordered records never count twice.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector


def _field(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


class _CheckpointAge(Collector):
    """``<ns>_last_checkpoint_age_seconds`` = now - last save time, evaluated per scrape."""

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self._name = name
        self._clock = clock
        self.saved_at: float | None = None

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self._name, "Seconds since the newest checkpoint was saved.")

    def collect(self) -> Iterable[Metric]:
        fam = GaugeMetricFamily(self._name, "Seconds since the newest checkpoint was saved.")
        if self.saved_at is not None:
            fam.add_metric([], max(0.0, self._clock() - self.saved_at))
        yield fam


class Metrics:
    """All ``titan_*`` series, with update methods for step records, findings, incidents,
    decisions, actions and checkpoints."""

    @dataclass
    class Config:
        namespace: str = "titan"
        states: tuple[str, ...] = ("starting", "running", "recovering", "paused", "stopped",
                                   "failed", "finished")

    def __init__(self, config: Config | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or Metrics.Config()
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_wall = -math.inf
        self._dropped_seen: dict[int, int] = {}  # generation -> highest running total seen
        self._state: str | None = None
        self._known_states: list[str] = list(self.config.states)
        ns = self.config.namespace
        r = self.registry

        def g(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{ns}_{name}", doc, labels, registry=r)

        def c(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{ns}_{name}", doc, labels, registry=r)

        self.up = g("up", "1 while a training generation is running under the supervisor.")
        self.step = g("step", "Newest optimizer step reported by rank 0.")
        self.loss = g("loss", "Training loss at the newest step.")
        self.grad_norm = g("grad_norm", "Pre-clip total gradient norm at the newest step.")
        self.lr = g("lr", "Learning rate at the newest step (after lr_scale).")
        self.lr_scale = g("lr_scale", "LR scale the supervisor applied (1 = as scheduled).")
        self.tokens_per_second = g("tokens_per_second", "Training throughput, tokens per second.")
        self.step_seconds = g("step_seconds", "Wall seconds of the newest step.")
        self.peak_memory_gib = g("peak_memory_gib", "Peak accelerator memory at the newest step.")
        self.generation = g("generation", "Current generation (process restart count of the job).")
        self.last_step_timestamp = g("last_step_timestamp_seconds",
                                     "Wall time of the newest step record (Unix seconds).")
        self.state = g("supervisor_state", "1 for the supervisor's current state, else 0.",
                       ("state",))
        self.open_incidents = g("open_incidents", "Incidents open or acked, not yet closed.")
        self.last_checkpoint_step = g("last_checkpoint_step", "Step of the newest valid checkpoint.")
        self.goodput_ratio = g("goodput_ratio",
                               "Productive training time / wall time since the run started.")
        self.checkpoint_interval = g("checkpoint_interval_steps", "Current checkpoint interval.")
        self.recommended_checkpoint_interval = g(
            "recommended_checkpoint_interval_steps",
            "Checkpoint interval that minimizes expected lost time (Young/Daly).")
        self.incidents = c("incidents", "Incidents opened, by kind.", ("kind",))
        self.findings = c("findings", "Detector findings, by kind.", ("kind",))
        self.decisions = c("decisions", "Policy decisions, by action.", ("action", "advisory"))
        self.actions = c("actions", "Actions carried out, by kind and result.", ("kind", "result"))
        self.lost_steps = c("lost_steps", "Optimizer steps redone after rollbacks and restarts.")
        self.lost_gpu_hours = c("lost_gpu_hours", "GPU hours lost to incidents.")
        self.dropped_records = c("dropped_records",
                                 "Telemetry records the trainer dropped (daemon slow or away).")
        self.updates_skipped = c("updates_skipped", "Optimizer updates the trainer skipped.")
        self.restarts = c("restarts", "Generations restarted by the supervisor.")
        self.run_info = Info(f"{ns}_run", "The supervised run.", registry=r)
        self._ckpt_age = _CheckpointAge(f"{ns}_last_checkpoint_age_seconds", clock)
        r.register(self._ckpt_age)
        for s in self._known_states:
            self.state.labels(state=s).set(0)

    # -- updates ---------------------------------------------------------------------------

    def observe_step(self, record: Any) -> None:
        """Update from a StepRecord (or a mapping with the same field names)."""
        with self._lock:
            gen = int(_field(record, "generation", 0) or 0)
            total = int(_field(record, "dropped_records", 0) or 0)
            seen = self._dropped_seen.get(gen, 0)
            if total > seen:
                self.dropped_records.inc(total - seen)
                self._dropped_seen[gen] = total
            if _field(record, "update_skipped", False):
                self.updates_skipped.inc()
            wall = float(_field(record, "wall_time", 0.0) or 0.0)
            if wall < self._last_wall:
                return
            self._last_wall = wall
            self.step.set(_field(record, "step"))
            self.generation.set(_field(record, "generation"))
            self.loss.set(_field(record, "loss"))
            self.grad_norm.set(_field(record, "grad_norm"))
            self.lr.set(_field(record, "lr"))
            self.lr_scale.set(_field(record, "lr_scale", 1.0))
            self.tokens_per_second.set(_field(record, "tokens_per_s"))
            self.step_seconds.set(_field(record, "step_seconds"))
            self.peak_memory_gib.set(_field(record, "peak_mem_gib", 0.0) or 0.0)
            self.last_step_timestamp.set(wall)

    def observe_finding(self, kind: str) -> None:
        self.findings.labels(kind=kind).inc()

    def observe_incident(self, kind: str) -> None:
        self.incidents.labels(kind=kind).inc()

    def observe_decision(self, action: str, advisory: bool = False) -> None:
        self.decisions.labels(action=action, advisory=str(bool(advisory)).lower()).inc()

    def observe_action(self, kind: str, result: str) -> None:
        """Count one finished action; ``result`` is done | failed | abandoned."""
        self.actions.labels(kind=kind, result=result).inc()
        if kind == "restart" and result == "done":
            self.restarts.inc()

    def set_state(self, state: str) -> None:
        with self._lock:
            if state not in self._known_states:
                self._known_states.append(state)
            for s in self._known_states:
                self.state.labels(state=s).set(1 if s == state else 0)
            self._state = state

    @property
    def current_state(self) -> str | None:
        return self._state

    def set_up(self, up: bool) -> None:
        self.up.set(1 if up else 0)

    def set_open_incidents(self, n: int) -> None:
        self.open_incidents.set(n)

    def set_checkpoint(self, step: int, saved_at: float | None = None) -> None:
        """The newest valid checkpoint and when it was saved (default: now)."""
        self.last_checkpoint_step.set(step)
        self._ckpt_age.saved_at = self._clock() if saved_at is None else float(saved_at)

    def set_goodput(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"goodput ratio must be in [0, 1], got {ratio}")
        self.goodput_ratio.set(ratio)

    def add_lost(self, steps: int = 0, gpu_hours: float = 0.0) -> None:
        if steps < 0 or gpu_hours < 0:
            raise ValueError("lost steps and GPU hours only grow")
        self.lost_steps.inc(steps)
        self.lost_gpu_hours.inc(gpu_hours)

    def inc_restarts(self, n: int = 1) -> None:
        """For restarts not carried out through `observe_action` (e.g. adopted on startup)."""
        self.restarts.inc(n)

    def set_checkpoint_interval(self, steps: int) -> None:
        self.checkpoint_interval.set(steps)

    def set_recommended_checkpoint_interval(self, steps: int) -> None:
        self.recommended_checkpoint_interval.set(steps)

    def set_run_info(self, run_id: str, **labels: str) -> None:
        self.run_info.info({"run_id": run_id, **{k: str(v) for k, v in labels.items()}})

    # -- exposition ------------------------------------------------------------------------

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
