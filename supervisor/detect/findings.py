"""What a detector says: one `Finding` per noticed event (docs/architecture.md §3).

A finding is a plain, immutable fact ("the loss at step 57 is 9 MADs above its median"),
never a decision; the policy turns findings into decisions. Findings are journaled, so they
round-trip through `to_dict()` / `from_dict()` as strict JSON: detectors put non-finite
numbers into `evidence` as the strings "nan", "inf", "-inf" (see `json_safe`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# --- kinds (the one place they are spelled) ------------------------------------------------
NON_FINITE = "non_finite"
LOSS_SPIKE = "loss_spike"
SPIKE_RECOVERED = "spike_recovered"
SLOW_RECOVERY = "slow_recovery"
GRAD_BLOWUP = "grad_blowup"
DIVERGENCE = "divergence"
HANG = "hang"
MISSING_HEARTBEAT = "missing_heartbeat"
DEAD_RANK = "dead_rank"
OOM = "oom"
STRAGGLER = "straggler"
HARDWARE = "hardware"
SLOW_CONVERGENCE = "slow_convergence"

KINDS: frozenset[str] = frozenset(
    {NON_FINITE, LOSS_SPIKE, SPIKE_RECOVERED, SLOW_RECOVERY, GRAD_BLOWUP, DIVERGENCE, HANG, MISSING_HEARTBEAT,
     DEAD_RANK, OOM, STRAGGLER, HARDWARE, SLOW_CONVERGENCE}
)

INFO = "info"
WARNING = "warning"
CRITICAL = "critical"
SEVERITIES: tuple[str, ...] = (INFO, WARNING, CRITICAL)


_RANK_TAG = re.compile(r"\[rank(\d{1,6})\]:")


def tagged_rank(line: str) -> int | None:
    """The rank a log line names as its writer (``[rankN]: ``, the tag torch.distributed's
    excepthook puts on every line of an uncaught exception), or None for an untagged line.

    A generation's log interleaves every rank, so the rank whose exit is being classified is not
    always the one whose line shows the cause; the line's own tag is the better witness."""
    m = _RANK_TAG.match(line)
    return int(m.group(1)) if m else None


def by_writer(lines: Iterable[str], n: int, first: int | None = None) -> tuple[list[str], list[str]]:
    """(each rank's last ``n`` tagged lines, ``first``'s ahead and then by rank; the untagged lines).

    The evidence of how a generation died, however much its ranks and torchrun wrote after it:
    a dead rank's exit (supervisor/launch/local.py) and a pod's termination message
    (supervisor/launch/torchrun_report.py) both carry it."""
    tagged: dict[int, list[str]] = {}
    rest: list[str] = []
    for line in lines:
        r = tagged_rank(line)
        (rest if r is None else tagged.setdefault(r, [])).append(line)
    order = ([first] if first in tagged else []) + sorted(r for r in tagged if r != first)
    return [line for r in order for line in tagged[r][-n:]], rest


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats spelled as strings, so evidence is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Finding:
    """One thing a detector noticed at `step` (time from the record, never a clock).

    `rank` names the rank the finding is about when there is one (straggler, dead rank,
    missing heartbeat, a hang blamed on a silent rank); `evidence` holds the numbers that
    justify it, so a human reading the journal can check the call.
    """

    kind: str
    step: int
    severity: str
    wall_time: float
    evidence: dict = field(default_factory=dict)
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "step": self.step,
            "severity": self.severity,
            "wall_time": self.wall_time,
            "evidence": json_safe(dict(self.evidence)),
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        try:
            return cls(
                kind=d["kind"],
                step=int(d["step"]),
                severity=d["severity"],
                wall_time=float(d["wall_time"]),
                evidence=dict(d.get("evidence") or {}),
                rank=None if d.get("rank") is None else int(d["rank"]),
            )
        except KeyError as e:
            raise ValueError(f"finding is missing field {e.args[0]!r}") from None
