"""Alertmanager webhook receiver: firing alerts about a node become `hardware` findings.

Alertmanager (webhook version 4) POSTs to `/v1/alerts`. A firing alert labelled with a node
(`NODE_LABELS`, first match wins; `instance`'s `:port` is dropped) is handed to the hardware
detector and from there to the policy like any other finding; resolved alerts and alerts without a
node label are ignored and listed in the reply so a misrouted rule is visible.

Off the request path (issue "hostile input": 1,000 alerts in one call were journaled and acted on
inside the request, starving the loop into false hang kills): `receive` only validates, de-duplicates
and enqueues, and answers 202 at once; `drain` (a task the daemon runs) hands queued alerts to the
detector one at a time, yielding to the loop between them. Failure model: the queue is bounded; an
alert already seen for the same (name, node, rank) within `Config.dedupe_s` is dropped as a
duplicate; more than `Config.per_node_per_minute` alerts for one node, or `Config.per_minute` in
all, are dropped and counted (`titan_supervisor_errors_total{kind="alert_dropped"}`), never
queued. A `rank` label must be a plain decimal below 65536, else the alert is ignored (listed).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from supervisor.config_types import PositiveInt, Seconds, doc
from supervisor.hosts import is_node_name, strip_port
from supervisor.wire import ascii_int

NODE_LABELS = ("node", "Hostname", "hostname", "host", "kubernetes_node", "nodename", "instance")
MAX_BODY = 4 * 1024 * 1024


class AlertmanagerAlert(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = ""


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook body (version 4)."""

    model_config = ConfigDict(extra="allow")
    version: str
    status: Literal["firing", "resolved"]
    alerts: list[AlertmanagerAlert] = Field(max_length=1000)
    receiver: str = ""
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""


def node_of(labels: dict[str, str]) -> str | None:
    host = next((labels[k] for k in NODE_LABELS if labels.get(k)), None)
    return None if host is None else strip_port(host)  # instance = host:port or [v6]:port


def rank_of(labels: dict[str, str]) -> tuple[bool, int | None]:
    """(usable, rank): no rank label is (True, None); a label that is not a plain rank is (False, None)."""
    rank = labels.get("rank")
    if rank is None:
        return True, None
    n = ascii_int(rank, max_digits=5)
    if n is None or n >= 65536:
        return False, None
    return True, n


class AlertReceiver:
    @dataclass
    class Config:
        queue_size: Annotated[PositiveInt, doc("alerts waiting to be turned into findings")] = 1000
        dedupe_s: Annotated[Seconds, doc("the same alert (name, node, rank) within this is a duplicate")] = 300.0
        per_node_per_minute: Annotated[PositiveInt, doc("alerts accepted per node per minute")] = 10
        per_minute: Annotated[PositiveInt, doc("alerts accepted per minute in all")] = 60

    def __init__(self, suite, on_finding: Callable, current_step: Callable[[], int], config: Config | None = None,
                 *, on_drop: Callable[[int], None] = lambda n: None, clock: Callable[[], float] = time.time) -> None:
        self._suite, self._on_finding, self._step = suite, on_finding, current_step
        self.config = config or AlertReceiver.Config()
        self._on_drop, self._clock = on_drop, clock
        self._queue: deque[tuple[str, str, int | None, str, float]] = deque()
        self._seen: dict[tuple[str, str, int | None], float] = {}
        self._recent: deque[tuple[float, str]] = deque()  # (accepted at, node) within the last minute
        self._wake = asyncio.Event()

    def receive(self, payload: AlertmanagerPayload) -> dict:
        """Validate, de-duplicate, cap and enqueue; never journals or acts (see the module docstring)."""
        now = self._clock()
        self._expire(now)
        queued, ignored, dropped = [], [], 0
        for i, al in enumerate(payload.alerts):
            name = al.labels.get("alertname", "")
            host = node_of(al.labels)
            ok, rank = rank_of(al.labels)
            why = ("resolved" if al.status != "firing" else
                   f"no node label ({', '.join(NODE_LABELS)})" if host is None else
                   "node label is not a node name (letters, digits, _ . : @ -, at most 255)"
                   if not is_node_name(host) else
                   "rank label is not a rank number below 65536" if not ok else None)
            if why is not None:
                ignored.append({"index": i, "alertname": name, "why": why})
                continue
            key = (name or "alert", host, rank)
            if now - self._seen.get(key, -1e18) < self.config.dedupe_s:
                ignored.append({"index": i, "alertname": name, "why": "duplicate"})
                continue
            per_node = sum(1 for _, h in self._recent if h == host)
            if (len(self._queue) >= self.config.queue_size or len(self._recent) >= self.config.per_minute
                    or per_node >= self.config.per_node_per_minute):
                dropped += 1
                continue
            self._seen[key] = now
            self._recent.append((now, host))
            detail = al.annotations.get("summary") or al.annotations.get("description") or name
            self._queue.append((key[0], host, rank, f"{name}: {detail}"[:500], now))
            queued.append({"alertname": key[0], "host": host})
        if dropped:
            self._on_drop(dropped)
        if queued:
            self._wake.set()
        return {"received": len(payload.alerts), "queued": queued, "dropped": dropped, "ignored": ignored}

    def _expire(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] >= 60.0:
            self._recent.popleft()
        if len(self._seen) > 4 * self.config.queue_size:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.config.dedupe_s}

    @property
    def pending(self) -> int:
        return len(self._queue)

    def process_one(self) -> list:
        """Hand the oldest queued alert to the hardware detector; its findings go to the daemon."""
        if not self._queue:
            return []
        name, host, rank, detail, at = self._queue.popleft()
        out = []
        for f in self._suite.observe_alert(name, wall_time=at, step=self._step(), detail=detail, rank=rank,
                                           host=host):
            self._on_finding(f)
            out.append(f)
        return out

    async def drain(self) -> None:
        """Run forever in the daemon's loop: process queued alerts, yielding between them."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                self.process_one()
                await asyncio.sleep(0)
