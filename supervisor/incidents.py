"""Incidents: one open incident at a time, opened by the first finding that matters and closed
when training resumes after the action that answered it (or when a spike recovers by itself, or
the run completes). Everything is journaled; this class only keeps the id of the open one."""

from __future__ import annotations

from supervisor.detect.findings import SPIKE_RECOVERED, Finding


class IncidentTracker:
    def __init__(self, journal, metrics) -> None:
        self._journal, self._metrics = journal, metrics
        self.current: int | None = None
        self._close_on_resume: str | None = None

    def open_for(self, f: Finding, generation: int) -> bool:
        """Open an incident for `f` unless one is open or `f` is informational. True if opened."""
        if self.current is not None or f.kind == SPIKE_RECOVERED or f.severity == "info":
            return False
        self.current = self._journal.open_incident(f.kind, f.step, summary=f.kind, generation=generation,
                                                   at=f.wall_time)
        self._metrics.observe_incident(f.kind)
        return True

    def close(self, resolution: str) -> None:
        if self.current is not None:
            self._journal.close_incident(self.current, resolution)
            self._metrics.observe_incident_closed()
            self.current = None

    def close_when_training_resumes(self, resolution: str) -> None:
        if self.current is not None:
            self._close_on_resume = resolution

    def training_resumed(self, step: int) -> None:
        if self._close_on_resume:
            self.close(f"{self._close_on_resume}; training resumed at step {step}")
            self._close_on_resume = None
