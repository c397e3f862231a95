"""Incidents as Grafana annotations (docs/architecture.md §3: "journal + metrics + annotations").

Each incident event — opened, acted, resolved — becomes an annotation (Grafana HTTP API
`POST /api/annotations`, through `grafana-client`) tagged `titan-supervisor`, `run:<run_id>`,
`event:<event>`, `kind:<kind>` and, when an action is involved, `action:<action>`; the run
overview dashboard overlays them on the loss curve by the `run:` tag.

Failure model: the daemon never waits for Grafana. `post()` only puts the event on a bounded
queue; one background thread sends, retrying each annotation with exponential backoff
(tenacity) and then giving up on it (counted in `failed`, logged). A full queue drops the new
event (counted in `dropped`). Tags are bounded enums and the run id, never free text; the text
of the annotation carries the details. Nothing here touches the journal: an annotation lost is
a picture missing, never a decision missing.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tenacity import Retrying, stop_after_attempt, wait_exponential

from supervisor.wire import web_text

EVENTS = ("opened", "acted", "resolved")


@dataclass(frozen=True)
class AnnotationEvent:
    event: str  # opened | acted | resolved
    run_id: str
    kind: str  # incident kind (loss_spike, dead_rank, ...)
    text: str
    at: float  # Unix seconds
    action: str | None = None
    incident_id: int | None = None

    def tags(self) -> list[str]:
        tags = ["titan-supervisor", f"run:{self.run_id}", f"event:{self.event}", f"kind:{self.kind}"]
        if self.action:
            tags.append(f"action:{self.action}")
        return tags


class GrafanaAnnotator:
    """Posts incident events to Grafana from a background thread; `post` never blocks."""

    @dataclass
    class Config:
        url: str  # e.g. https://grafana.example.com (an org's base URL, without /api)
        token: str = field(default="", repr=False)  # service account token (Editor); never logged
        dashboard_uid: str | None = None  # None: organization-wide annotations
        timeout_s: float = 5.0
        attempts: int = 5
        backoff_initial_s: float = 0.5
        backoff_max_s: float = 30.0
        queue_size: int = 1000

        def __post_init__(self) -> None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"grafana.url must be an http(s) URL, got {self.url!r}")
            if self.attempts < 1 or self.queue_size < 1 or self.timeout_s <= 0:
                raise ValueError("grafana: attempts and queue_size must be >= 1, timeout_s > 0")

    def __init__(self, config: Config, *, logger: Any = None,
                 on_result: Callable[[AnnotationEvent, bool], None] | None = None) -> None:
        from grafana_client import GrafanaApi

        self.config = config
        self.log = logger
        self.on_result = on_result
        self.api = GrafanaApi.from_url(config.url, credential=config.token or None, timeout=config.timeout_s)
        self.sent = self.failed = self.dropped = 0
        self._q: queue.Queue[AnnotationEvent | None] = queue.Queue(maxsize=config.queue_size)
        self._thread = threading.Thread(target=self._run, name="grafana-annotations", daemon=True)
        self._thread.start()

    # -- the daemon's side ------------------------------------------------------------------

    def post(self, event: str, *, run_id: str, kind: str, text: str, at: float | None = None,
             action: str | None = None, incident_id: int | None = None) -> bool:
        """Queue one incident event; False (and counted) when the queue is full."""
        if event not in EVENTS:
            raise ValueError(f"annotation event must be one of {EVENTS}, got {event!r}")
        ev = AnnotationEvent(event, run_id, kind, text, time.time() if at is None else at, action, incident_id)
        try:
            self._q.put_nowait(ev)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to `timeout`), then stop the thread."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # -- the sender thread ------------------------------------------------------------------

    def _send(self, ev: AnnotationEvent) -> None:
        c = self.config
        title = f"{ev.kind} {ev.event}" + (f" ({ev.action})" if ev.action else "")
        ref = f" [incident {ev.incident_id}]" if ev.incident_id is not None else ""
        self.api.annotations.add_annotation(dashboard_uid=c.dashboard_uid, time_from=int(ev.at * 1000),
                                            tags=ev.tags(), text=f"{title}{ref}: {web_text(ev.text)}")

    def _run(self) -> None:
        c = self.config
        while True:
            ev = self._q.get()
            if ev is None:
                return
            ok = True
            try:
                for attempt in Retrying(stop=stop_after_attempt(c.attempts), reraise=True,
                                        wait=wait_exponential(multiplier=c.backoff_initial_s, max=c.backoff_max_s)):
                    with attempt:
                        self._send(ev)
                self.sent += 1
            except Exception as e:  # noqa: BLE001 - Grafana being away must never matter
                ok = False
                self.failed += 1
                if self.log is not None:
                    self.log.warning("grafana annotation failed", annotation=ev.event, kind=ev.kind, error=repr(e)[:300])
            if self.on_result is not None:
                self.on_result(ev, ok)


class IncidentAnnotations:
    """The daemon's listener on `IncidentTracker` and `ActionRunner`: opened, acted and resolved
    become annotations. It remembers the open incident's kind so an action's annotation carries
    it (`operator` when no incident is open); `record` decisions are not an act and are not posted."""

    SILENT_ACTIONS = frozenset({"record"})

    def __init__(self, annotator: GrafanaAnnotator, run_id: str) -> None:
        self.annotator, self.run_id = annotator, run_id
        self._open: tuple[int, str] | None = None

    def incident_opened(self, incident_id: int, kind: str, step: int, at: float | None) -> None:
        self._open = (incident_id, kind)
        self.annotator.post("opened", run_id=self.run_id, kind=kind, text=f"{kind} at step {step}", at=at,
                            incident_id=incident_id)

    def incident_closed(self, incident_id: int, kind: str, resolution: str) -> None:
        self._open = None
        self.annotator.post("resolved", run_id=self.run_id, kind=kind, text=resolution[:500], incident_id=incident_id)

    def action_finished(self, kind: str, action_id: int, ok: bool, outcome: dict) -> None:
        if kind in self.SILENT_ACTIONS:
            return
        incident, incident_kind = self._open if self._open else (None, "operator")
        summary = ", ".join(f"{k}={v}" for k, v in outcome.items() if isinstance(v, (int, float, str, bool)))
        self.annotator.post("acted", run_id=self.run_id, kind=incident_kind, action=kind, incident_id=incident,
                            text=f"action {action_id} {'done' if ok else 'FAILED'}: {summary}"[:500])
