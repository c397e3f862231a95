"""Incidents: one open incident at a time, opened by the first finding that matters and closed
when training resumes after the action that answered it (or when a spike recovers by itself, or
the run completes). Everything is journaled; this class only keeps the id and kind of the open one.

An optional listener (`IncidentListener`, e.g. `supervisor.annotations.IncidentAnnotations`) hears
each open and close after the journal has it; a listener that raises is logged by the caller's
logger and never stops the incident's life cycle (the journal is the record, the rest is a view).
"""

from __future__ import annotations

from typing import Protocol

from supervisor.detect.findings import SPIKE_RECOVERED, Finding


class IncidentListener(Protocol):
    def incident_opened(self, incident_id: int, kind: str, step: int, at: float | None) -> None: ...

    def incident_closed(self, incident_id: int, kind: str, resolution: str) -> None: ...


class IncidentTracker:
    def __init__(self, journal, metrics, listener: IncidentListener | None = None, log=None) -> None:
        self._journal, self._metrics = journal, metrics
        self._listener, self._log = listener, log
        self.current: int | None = None
        self.kind: str | None = None
        self._close_on_resume: str | None = None

    def open_for(self, f: Finding, generation: int) -> bool:
        """Open an incident for `f` unless one is open or `f` is informational. True if opened."""
        if self.current is not None or f.kind == SPIKE_RECOVERED or f.severity == "info":
            return False
        self.current = self._journal.open_incident(f.kind, f.step, summary=f.kind, generation=generation,
                                                   at=f.wall_time)
        self.kind = f.kind
        self._metrics.observe_incident(f.kind)
        self._tell("incident_opened", self.current, f.kind, f.step, f.wall_time)
        return True

    def close(self, resolution: str) -> None:
        if self.current is not None:
            closed, kind = self.current, self.kind or ""
            self._journal.close_incident(closed, resolution)
            self._metrics.observe_incident_closed()
            self.current = self.kind = None
            self._tell("incident_closed", closed, kind, resolution)

    def close_when_training_resumes(self, resolution: str) -> None:
        if self.current is not None:
            self._close_on_resume = resolution

    def training_resumed(self, step: int) -> None:
        if self._close_on_resume:
            self.close(f"{self._close_on_resume}; training resumed at step {step}")
            self._close_on_resume = None

    def _tell(self, method: str, *args) -> None:
        if self._listener is None:
            return
        try:
            getattr(self._listener, method)(*args)
        except Exception as e:  # noqa: BLE001 - a view failing never changes an incident
            if self._log is not None:
                self._log.warning("incident listener failed", event=method, error=repr(e)[:300])
