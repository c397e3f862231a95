"""Per-route-class rate limits for the daemon's HTTP surface (token buckets).

Why: a local process flooding one route (heartbeats, commands, alerts) must not take the event
loop away from the trainer's telemetry and the reconcile loop. Each class of route has its own
bucket, so a flood of commands does not starve heartbeats and vice versa; a request over the
limit is answered 429 before its body is read (cheap), and counted.

Failure model: the buckets are in memory and per process; a restarted daemon starts full. The
limits are generous for legitimate use (a 64-rank node beats ~64 times a second; rank 0 posts
a few telemetry batches a second; each node agent reports once a second, 2,048 of them at
16,384 ranks; an on-call human issues a few commands a minute).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Callable

from supervisor.config_types import PositiveFloat, doc

#: route classes: path prefix -> class (first match wins; anything else is "read")
ROUTE_CLASSES = (("/v1/heartbeat", "trainer"), ("/v1/telemetry", "trainer"), ("/v1/nodes/report", "agent"), ("/v1/alerts", "alerts"),
                 ("/v1/commands", "command"), ("/v1/policy", "command"), ("/v1/proposals/", "command"),
                 ("/v1/incidents/", "command"))


def route_class(method: str, path: str) -> str:
    for prefix, cls in ROUTE_CLASSES:
        if path.startswith(prefix) and (cls != "command" or method == "POST"):
            return cls
    return "read"


class RateLimiter:
    @dataclass
    class Config:
        trainer_per_s: Annotated[PositiveFloat, doc("heartbeats + telemetry posts per second")] = 2000.0
        agent_per_s: Annotated[PositiveFloat, doc(
            "node agents' reports per second (one per node per report interval: 2,048 nodes at 1 Hz "
            "are 2,048 a second)")] = 5000.0
        command_per_s: Annotated[PositiveFloat, doc("operator commands per second")] = 20.0
        alerts_per_s: Annotated[PositiveFloat, doc("Alertmanager webhook posts per second")] = 20.0
        read_per_s: Annotated[PositiveFloat, doc("reads (status, audit, /metrics, ...) per second")] = 200.0
        burst_s: Annotated[PositiveFloat, doc("a bucket holds this many seconds' worth of requests")] = 2.0

    def __init__(self, config: Config | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or RateLimiter.Config()
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # class -> [tokens, last refill time]

    def rate(self, cls: str) -> float:
        return float(getattr(self.config, f"{cls}_per_s"))

    def allow(self, cls: str) -> bool:
        """Take one token from the class's bucket; False (and nothing taken) when it is empty."""
        now = self._clock()
        rate = self.rate(cls)
        cap = rate * self.config.burst_s
        b = self._buckets.setdefault(cls, [cap, now])
        b[0] = min(cap, b[0] + (now - b[1]) * rate)
        b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True
