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

from supervisor.detect.findings import by_writer

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


#: the kubelet keeps at most this much of a container's termination message file
MESSAGE_BYTES = 4096


def _compact_report(text: str) -> tuple[int, str] | None:
    """(where the last report starts, the report without its tracebacks), or None without one."""
    at = text.rfind(_ROOT_HEADER)
    if at < 0:
        return None
    root = _entries(text[at:])[:1]
    if not root:
        return None
    start = text.rfind("Failures:", 0, at)
    others = _entries(text[start:at]) if start >= 0 else []
    begin = start if start >= 0 else at
    bar = text.rfind("\n=", 0, begin)  # torchrun's "====" line and "<binary> FAILED" open the block
    begin = bar + 1 if bar >= 0 and begin - bar < 400 else begin

    def entry(i: int, rank: int, code: int) -> str:
        return f"[{i}]:\n  rank      : {rank}\n  exitcode  : {code}\n"

    body = "".join(entry(i + 1, r, c) for i, (r, c) in enumerate(others)) or "  <NO_OTHER_FAILURES>\n"
    return begin, "Failures:\n" + body + _ROOT_HEADER + "\n" + entry(0, *root[0])


def termination_message(text: str, *, limit: int = MESSAGE_BYTES, rank_lines: int = 6,
                        tail_lines: int = 12, line_chars: int = 300) -> str:
    """What a trainer pod leaves as its termination message: within ``limit`` bytes, the last lines
    of each rank's own (``[rankN]:``) output and of the rest, then torchrun's failure report
    with every traceback left out.

    Why: the kubelet keeps 2 KiB of the log (``FallbackToLogsOnError``) or 4 KiB of the message
    file, and torchrun's report carries each failed rank's whole traceback. A collateral rank's
    traceback (its collective broke) filled all of it, the report's headers were cut off, and the
    daemon named the pod's first rank instead of the SIGKILLed one (Kubernetes drill, CI,
    2026-12-02). The compact report keeps every (rank, exit code) for `root_cause`; the rank
    lines keep the evidence the OOM and hardware detectors read."""
    report = _compact_report(text)
    before, tail = (text[:report[0]], report[1]) if report else (text, "")
    tagged, rest = by_writer((line[:line_chars] for line in before.splitlines() if line.strip()), rank_lines)
    lines = tagged + rest[-tail_lines:]
    budget = limit - len(tail.encode())
    kept: list[str] = []
    for line in reversed(lines):  # the newest lines are kept when they do not all fit
        budget -= len(line.encode()) + 1
        if budget < 0:
            break
        kept.append(line)
    out = "\n".join(reversed(kept)) + ("\n" if kept else "") + tail
    return out.encode()[:limit].decode(errors="ignore")
