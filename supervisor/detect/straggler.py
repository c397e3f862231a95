"""Stragglers: one rank persistently slower than its peers.

In synchronous training the slowest rank sets the pace, so a rank that is `ratio` × slower
than the median of the *other* ranks costs the whole job. Samples are the per-rank step
times gathered every K steps (`rank_step_seconds`); a single slow sample is noise (a GC
pause, a page fault), so a rank is a straggler when it was slow in at least `min_hits` of
its last `samples` gathered samples. One finding per episode; the episode ends once the
rank's last `samples` samples are all clean. A change in the number of ranks (a reshard)
starts over.
"""

from __future__ import annotations

from typing import Annotated

from collections import deque
from dataclasses import dataclass

from supervisor.detect.findings import STRAGGLER, WARNING, Finding
from supervisor.detect.robust import median
from supervisor.config_types import PositiveFloat, PositiveInt, doc


class StragglerDetector:
    @dataclass
    class Config:
        ratio: Annotated[PositiveFloat, doc("slow = rank time > ratio * median of its peers' times")] = 1.5
        min_hits: Annotated[PositiveInt, doc("slow in at least this many ...")] = 3
        samples: Annotated[PositiveInt, doc("... of the last this many gathered samples")] = 5

        def __post_init__(self) -> None:
            if self.min_hits > self.samples:
                raise ValueError(f"min_hits {self.min_hits} > samples {self.samples}")

    def __init__(self, config: "StragglerDetector.Config | None" = None) -> None:
        self.config = config or StragglerDetector.Config()
        self.reset()

    def reset(self) -> None:
        self._world: int | None = None
        self._hits: list[deque[bool]] = []
        self._in_episode: list[bool] = []

    def observe(self, record) -> list[Finding]:
        times = record.rank_step_seconds
        if not times or len(times) < 2:
            return []
        c = self.config
        if len(times) != self._world:
            self._world = len(times)
            self._hits = [deque(maxlen=c.samples) for _ in times]
            self._in_episode = [False] * len(times)
        out = []
        for rank, t in enumerate(times):
            peers = median([x for i, x in enumerate(times) if i != rank])
            self._hits[rank].append(peers > 0 and t > c.ratio * peers)
            hits = sum(self._hits[rank])
            if not self._in_episode[rank] and hits >= c.min_hits:
                self._in_episode[rank] = True
                out.append(Finding(
                    kind=STRAGGLER, step=record.step, severity=WARNING,
                    wall_time=record.wall_time, rank=rank,
                    evidence={"seconds": t, "peer_median_seconds": peers,
                              "ratio": round(t / peers, 3) if peers > 0 else None,
                              "slow_samples": hits, "samples": len(self._hits[rank]),
                              "rank_step_seconds": list(times)},
                ))
            elif self._in_episode[rank] and hits == 0 and len(self._hits[rank]) == c.samples:
                self._in_episode[rank] = False
        return out
