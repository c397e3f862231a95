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


def read_spool(path: Path, *, strict: bool) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        if strict:
            raise SpoolError(f"{path} does not exist")
        return []
    out = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            if strict:
                raise SpoolError(f"{path}:{n}: not JSON: {e}") from None
            continue
        if isinstance(obj, dict):
            out.append(obj)
        elif strict:
            raise SpoolError(f"{path}:{n}: not a JSON object")
    return out
