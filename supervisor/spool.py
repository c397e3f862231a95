"""The trainer's telemetry spool: `<workdir>/telemetry/spool.jsonl`, one JSON object a line.

Rank 0 appends every StepRecord and event to it whether or not the daemon is reachable, so
it is the source of truth for what the daemon missed while it was down. The last line may be
torn by a crash: readers that recover state skip unparsable lines (`strict=False`); readers
of a file a human handed them (replay, a reference curve) report the line (`strict=True`).
"""

from __future__ import annotations

import json
from pathlib import Path


class SpoolError(ValueError):
    pass


def spool_path(workdir: Path) -> Path:
    return Path(workdir) / "telemetry" / "spool.jsonl"


MAX_LINE_BYTES = 16 * 1024 * 1024  # a step record is ~1 KiB; a rank_step_seconds list of 65,536 ranks ~1.5 MiB


def _lines(path: Path):
    """(line number, bytes) of each line split on ``\n`` only (``str.splitlines`` also split on
    U+2028 and \x85, which JSON strings may hold raw), streamed; a line longer than
    `MAX_LINE_BYTES` is skipped through and given as None."""
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                yield n, None
                continue
            yield n, raw


def read_spool(path: Path, *, strict: bool) -> list[dict]:
    """The spool's JSON objects. A line that is not one (torn, not UTF-8, nested past the parser's
    depth, longer than `MAX_LINE_BYTES`) raises `SpoolError` naming it when ``strict``, and is
    skipped otherwise: a corrupt byte must never stop a daemon from starting."""
    path = Path(path)
    if not path.is_file():
        if strict:
            raise SpoolError(f"{path} does not exist")
        return []
    out = []
    for n, raw in _lines(path):
        try:
            if raw is None:
                raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
            text = raw.decode("utf-8")
            if not text.strip():
                continue
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            if strict:
                raise SpoolError(f"{path}:{n}: not JSON: {type(e).__name__}: {str(e)[:200]}") from None
            continue
        if isinstance(obj, dict):
            out.append(obj)
        elif strict:
            raise SpoolError(f"{path}:{n}: not a JSON object")
    return out
