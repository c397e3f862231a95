"""Which rank's death caused a generation's failure, from torchrun's failure report.

torchrun names a "Root Cause (first observed failure)", but "first" is the earliest timestamp
among the failures seen in one monitor pass, at one-second resolution, ties broken by rank.
When a rank is SIGKILLed, its peers' collectives break ("Connection closed by peer") and, since
ranks exit at once on an exception, a peer can be seen dead in the same pass; torchrun then named
rank 0 (exit 1) as the root cause of rank 1's SIGKILL (the Kubernetes dead-rank drill, CI,
2026-12-01). The rule here: a rank killed by a signal nobody sends to stop a run (not SIGTERM,
SIGINT or SIGHUP) is the cause and its peers' exceptions the symptom; otherwise torchrun's
root cause stands. Pure text in, answer out.
"""

from __future__ import annotations

import re
import signal

_ROOT_HEADER = "Root Cause (first observed failure):"
_ENTRY = re.compile(r"\brank\s*:\s*(\d+)\b.*?\bexitcode\s*:\s*(-?\d+)", re.S)
# what torchrun, the daemon or an operator send to stop ranks: never a root cause by themselves
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _entries(text: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for m in _ENTRY.finditer(text)]


def _hard_signal(code: int) -> bool:
    return code < 0 and -code not in _STOP_SIGNALS


def root_cause(text: str) -> tuple[int, int] | None:
    """(rank, exit code) of the failure that caused the others, or None without a report.

    Reads the last report in ``text`` (a log may hold more than one)."""
    at = text.rfind(_ROOT_HEADER)
    if at < 0:
        return None
    start = text.rfind("Failures:", 0, at)
    root = _entries(text[at:])[:1]
    if not root:
        return None
    others = _entries(text[start:at]) if start >= 0 else []
    if _hard_signal(root[0][1]):
        return root[0]
    return next((e for e in others if _hard_signal(e[1])), root[0])
