"""A rank process exited: `dead_rank`, or `oom` when the evidence says out-of-memory.

The finding names the rank whose own (tagged) line shows the OOM when that is not the rank whose
exit arrived first: a peer's collective breaks at once, and which exit is seen first is a race.

Exit codes are decoded the two ways they reach us: a negative code is a signal number
(Python's subprocess: -9 = SIGKILL), a code above 128 is 128 + signal (a shell or torchrun
reporting it: 137 = SIGKILL). OOM is called only on evidence: the kernel OOM killer flag
(`oom_killed`, e.g. from cgroup memory events) or a log line matching `oom_patterns`
(CUDA/torch OOM messages). A bare SIGKILL is not assumed to be an OOM.

One finding per generation: when one rank dies the launcher tears the others down, and
their exits (SIGTERM, nonzero codes) are consequences, not new incidents. Exit code 0 is a
normal exit and raises nothing.
"""

from __future__ import annotations

from typing import Annotated

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field

from supervisor.detect.findings import CRITICAL, DEAD_RANK, OOM, Finding, tagged_rank
from supervisor.config_types import Strings, check_regexes, doc

DEFAULT_OOM_PATTERNS: tuple[str, ...] = (
    r"CUDA out of memory",
    r"OutOfMemoryError",
    r"HIP out of memory",
    r"\bout of memory\b",
    r"Out of memory: Killed process",
    r"oom[-_ ]kill",
    r"RESOURCE_EXHAUSTED",
)


def signal_of(exitcode: int) -> int | None:
    """The signal number an exit code stands for, or None for an ordinary exit."""
    if exitcode < 0:
        return -exitcode
    if exitcode > 128 and exitcode - 128 < 64:
        return exitcode - 128
    return None


def signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


class DeadRankDetector:
    @dataclass
    class Config:
        oom_patterns: Annotated[Strings, doc(
            "regexes (case-insensitive) that mark a log line as an out-of-memory death")] = field(
            default_factory=lambda: DEFAULT_OOM_PATTERNS)

        def __post_init__(self) -> None:
            check_regexes(self.oom_patterns)

    def __init__(self, config: "DeadRankDetector.Config | None" = None) -> None:
        self.config = config or DeadRankDetector.Config()
        self._oom_re = [re.compile(p, re.IGNORECASE) for p in self.config.oom_patterns]
        self.reset()

    def reset(self) -> None:
        self._reported = False

    def oom_line(self, lines: Iterable[str]) -> str | None:
        for line in lines:
            if any(r.search(line) for r in self._oom_re):
                return line.strip()[:500]
        return None

    def observe_exit(self, rank: int, exitcode: int, wall_time: float, step: int, *,
                     oom_killed: bool = False, log_lines: Iterable[str] = (),
                     host: str | None = None) -> list[Finding]:
        if exitcode == 0 or self._reported:
            return []
        self._reported = True
        signum = signal_of(exitcode)
        oom_match = self.oom_line(log_lines)
        is_oom = oom_killed or oom_match is not None
        witness = tagged_rank(oom_match) if oom_match is not None and not oom_killed else None
        return [Finding(
            kind=OOM if is_oom else DEAD_RANK, step=step, severity=CRITICAL,
            wall_time=wall_time, rank=rank if witness is None else witness,
            evidence={"exitcode": exitcode, "signal": signum, "signal_name": signal_name(signum),
                      "oom_killed": bool(oom_killed), "oom_log_line": oom_match, "host": host,
                      "exited_rank": rank},
        )]
