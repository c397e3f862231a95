"""Alertmanager webhook receiver: firing alerts about a node become `hardware` findings.

Alertmanager (webhook version 4) POSTs to `/v1/alerts`. A firing alert labelled with a node
(`NODE_LABELS`, first match wins; `instance`'s `:port` is dropped) is handed to the hardware
detector and from there to the policy like any other finding; resolved alerts and alerts without a
node label are ignored and listed in the reply so a misrouted rule is visible.
"""

from __future__ import annotations

import time
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    if host is not None and ":" in host and not host.startswith("["):
        host = host.rsplit(":", 1)[0]  # instance = host:port
    return host


class AlertReceiver:
    def __init__(self, suite, on_finding: Callable, current_step: Callable[[], int]) -> None:
        self._suite, self._on_finding, self._step = suite, on_finding, current_step

    def receive(self, payload: AlertmanagerPayload) -> dict:
        now = time.time()
        planned, ignored = [], []
        for i, al in enumerate(payload.alerts):
            name = al.labels.get("alertname", "")
            host = node_of(al.labels)
            if al.status != "firing":
                ignored.append({"index": i, "alertname": name, "why": "resolved"})
            elif host is None:
                ignored.append({"index": i, "alertname": name, "why": f"no node label ({', '.join(NODE_LABELS)})"})
            else:
                rank = al.labels.get("rank")
                rank_n = int(rank) if rank is not None and rank.isdigit() else None
                detail = al.annotations.get("summary") or al.annotations.get("description") or name
                planned.append((name or "alert", host, rank_n, f"{name}: {detail}"[:500]))
        findings = []
        for name, host, rank, detail in planned:
            for f in self._suite.observe_alert(name, wall_time=now, step=self._step(), detail=detail, rank=rank,
                                               host=host):
                self._on_finding(f)
                findings.append({"kind": f.kind, "host": host, "alert": name})
        return {"received": len(payload.alerts), "findings": findings, "ignored": ignored}
