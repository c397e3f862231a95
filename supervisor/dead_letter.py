"""Dead letters: records the journal refused, kept with the reason instead of wedging the pipeline.

Why: one step record the journal could not store (issue "hostile input": a step >= 2**63
overflowed SQLite) stayed in the buffer and failed every later batch, so directives stopped and
a finished run never exited. Now a record that fails on its own is appended here as one JSON
line ``{"at", "kind", "reason", "record"}``, counted (``titan_supervisor_errors_total
{kind="dead_letter"}``), reported by `/readyz`, and the pipeline moves on. Nothing is ever
deleted from the file.

Failure model: if the dead-letter file itself cannot be written (disk full), the record is lost
and that is counted as ``disk_full``/``journal_write`` instead; `put` never raises.
Also here: `private_dirs`, which creates the daemon's folders 0700 (journal, tokens, dead
letters are the run's secrets and history: nobody else on the machine reads them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from supervisor.health import fault_kind


def private_dirs(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700 (existing folders are left as they are,
    except ``path`` itself, which is made 0700)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _jsonable(record: Any) -> Any:
    dump = getattr(record, "model_dump", None)
    return dump(mode="json") if dump is not None else record


class DeadLetters:
    def __init__(self, path: Path, health) -> None:
        self.path = Path(path)
        self._health = health
        self.count = 0

    def put(self, kind: str, record: Any, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        line = json.dumps({"at": time.time(), "kind": kind, "reason": reason, "record": _jsonable(record)},
                          default=str) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError as e:
            self._health.fault(fault_kind(e), f"dead letter not written ({e}); lost: {reason}")
            return
        self.count += 1
        if fault_kind(error) == "disk_full":
            self._health.fault("disk_full", reason)
        self._health.fault("dead_letter", f"{self.count} record(s) refused by the journal, kept in "
                                          f"{self.path}; last: {reason}")
