"""Hardware trouble seen from outside the numbers: log lines and external alerts.

GPUs and HBM cause most unplanned interruptions of large runs (Llama 3: 30 % GPU, 17 % HBM),
and the signs often show up in logs (NVIDIA Xid, ECC errors, NCCL transport errors) or as
an alert (NVML exporter, Alertmanager) before or as a rank dies. Each named pattern
reports once per (host or rank, pattern) per generation, so a log flood is one finding.
Failure model: patterns are heuristics; a miss costs nothing extra (the crash is still
caught as a dead rank), a false match only records a warning.
"""

from __future__ import annotations

from typing import Annotated

import re
from dataclasses import dataclass, field

from supervisor.detect.findings import HARDWARE, WARNING, Finding, tagged_rank
from supervisor.config_types import StringPairs, check_regexes, doc

DEFAULT_HARDWARE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("xid", r"\bXid\b"),
    ("ecc", r"(uncorrectable|double[- ]bit) ECC|ECC error"),
    ("fell_off_bus", r"fallen off the bus"),
    ("nvlink", r"NVLink.*error"),
    ("illegal_memory_access", r"illegal memory access|unspecified launch failure"),
    ("nccl_transport", r"NCCL.*(unhandled system error|Net/IB|ibv_|remote process exited)"),
    ("row_remap", r"row[- ]remap"),
)


class HardwareDetector:
    @dataclass
    class Config:
        patterns: Annotated[StringPairs, doc(
            "(name, regex) pairs, matched case-insensitively against log lines")] = field(
            default_factory=lambda: DEFAULT_HARDWARE_PATTERNS)

        def __post_init__(self) -> None:
            check_regexes(p for _, p in self.patterns)

    def __init__(self, config: "HardwareDetector.Config | None" = None) -> None:
        self.config = config or HardwareDetector.Config()
        self._res = [(name, re.compile(rx, re.IGNORECASE)) for name, rx in self.config.patterns]
        self.reset()

    def reset(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def _emit(self, name: str, source: str, detail: str, *, wall_time: float, step: int,
              rank: int | None, host: str | None) -> list[Finding]:
        key = (host or f"rank{rank}", name)
        if key in self._seen:
            return []
        self._seen.add(key)
        return [Finding(kind=HARDWARE, step=step, severity=WARNING, wall_time=wall_time,
                        rank=rank, evidence={"pattern": name, "source": source,
                                             "detail": detail[:500], "host": host})]

    def observe_log(self, line: str, *, wall_time: float, step: int, rank: int | None = None,
                    host: str | None = None) -> list[Finding]:
        for name, rx in self._res:
            if rx.search(line):
                tagged = tagged_rank(line)  # a peer's line in the exit's evidence names its own rank
                return self._emit(name, "log", line.strip(), wall_time=wall_time, step=step,
                                  rank=rank if tagged is None else tagged, host=host)
        return []

    def observe_alert(self, name: str, *, wall_time: float, step: int, detail: str = "",
                      rank: int | None = None, host: str | None = None) -> list[Finding]:
        """An external alert (NVML exporter, Alertmanager) about a node or rank."""
        return self._emit(f"alert:{name}", "alert", detail or name, wall_time=wall_time,
                          step=step, rank=rank, host=host)
