"""The checkpoint catalog over torchtitan's DCP folder (docs/architecture.md §6).

Layout read: ``<root>/step-N/`` with ``.metadata`` (a pickle of
``torch.distributed.checkpoint.metadata.Metadata``) and shard files ``__<rank>_0.distcp``.

A checkpoint is **valid** by the one rule of `supervisor.dcp` (shared with the trainer):
``.metadata`` is there, parses (torch-free, allow-list unpickler), names at least one shard, and
every shard it names exists with at least ``max(offset + length)`` bytes. A folder with no
``.metadata`` whose newest write is younger than ``Config.in_progress_grace_s`` is
**in_progress** (DCP writes ``.metadata`` last, via a tmp file and rename); anything else that
is not valid is **corrupt**, with the specific human reason `supervisor.dcp.problem` gives.

Failure model and guarantees:
- Nothing here deletes except `Catalog.apply_retention`, and it only deletes checkpoints that
  are valid, unpinned, older than the newest valid one, and outside the newest ``keep_last``
  valid ones. ``keep_last == 0`` deletes nothing. A deletion first renames the folder to a
  hidden name that torchtitan's ``step-(\\d+)`` search cannot match, then removes it, so a crash
  mid-delete never leaves a half-deleted ``step-N`` that torchtitan would try to load.
- Quarantine is a ``rename`` within one filesystem (atomic); it never copies and never deletes.
  A cross-filesystem quarantine dir is refused at construction. Quarantining is idempotent:
  what was moved is no longer in the root, so a repeat moves nothing.
- Pins are persisted by the catalog itself in a small JSON file (``Config.pins_file``, default
  ``<quarantine_dir>/pins.json``, written tmp + fsync + rename), so a restarted daemon cannot
  forget the last-known-good before it re-reads the journal. The caller mirrors pins into the
  journal for audit; the file is the source of truth for retention.
- `Catalog.resolve` refuses path-like or malformed names with a ValueError before touching the
  filesystem.

Note: torchtitan's own ``checkpoint.keep_latest_k`` purge counts every ``step-N`` folder, valid
or not, and would delete a pinned checkpoint: the supervisor owns retention, so trainers it
launches must run with ``keep_latest_k = 0``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

from supervisor import dcp
from supervisor.config_types import NonNegativeInt, PositiveInt, Seconds, doc
from supervisor.dcp import METADATA, read_required_sizes

_STEP_NAME = re.compile(r"(?:step-)?([0-9]{1,18})")


class CheckpointError(RuntimeError):
    """A catalog operation could not be carried out (nothing was changed by it)."""


class CheckpointNotFound(LookupError):
    pass


# --- catalog ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    valid: bool
    reason: str  # "" when valid, else one human sentence
    size_bytes: int
    mtime: float
    state: str = "valid"  # valid | in_progress | corrupt
    pinned: bool = False


@dataclass(frozen=True)
class Moved:
    step: int
    src: Path
    dst: Path


def parse_step(name_or_step: int | str) -> int:
    """``12``, ``"12"`` or ``"step-12"`` -> 12; anything else is a ValueError naming why."""
    if isinstance(name_or_step, bool):
        raise ValueError(f"checkpoint must be a step number, got {name_or_step!r}")
    if isinstance(name_or_step, int):
        if name_or_step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {name_or_step}")
        return name_or_step
    if not isinstance(name_or_step, str):
        raise ValueError(f"checkpoint must be a step number or 'step-N', got {type(name_or_step).__name__}")
    s = name_or_step
    if any(c in s for c in ("/", "\\", "\x00")) or ".." in s:
        raise ValueError(f"checkpoint name {s!r} looks like a path; give a step number or 'step-N'")
    m = _STEP_NAME.fullmatch(s)
    if m is None:
        if s.lstrip().startswith("-") or s.startswith("step--"):
            raise ValueError(f"checkpoint step must be >= 0, got {s!r}")
        raise ValueError(f"checkpoint name {s!r} is not a step number or 'step-N'")
    return int(m.group(1))


class Catalog:
    """Scans, validates, pins, quarantines and prunes ``<root>/step-N`` DCP checkpoints."""

    @dataclass
    class Config:
        keep_last: Annotated[NonNegativeInt, doc(
            "retention: newest K valid checkpoints kept (0: retention deletes nothing); pinned ones always kept")] = 0
        in_progress_grace_s: Annotated[Seconds, doc(
            "a step folder without .metadata written this recently is still being written")] = 300.0
        max_metadata_bytes: Annotated[PositiveInt, doc(
            "a DCP .metadata file larger than this is treated as corrupt (not unpickled)")] = 256 << 20
        pins_file: Annotated[Path | None, doc("pins file (default: <quarantine_dir>/pins.json)")] = None

    def __init__(self, root: Path, quarantine_dir: Path, config: Config | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.quarantine_dir = Path(quarantine_dir)
        self.config = config or Catalog.Config()
        if self.config.keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        self._clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        if self.quarantine_dir.resolve() == self.root.resolve():
            raise ValueError("quarantine_dir must not be the checkpoint folder itself")
        if self.quarantine_dir.stat().st_dev != self.root.stat().st_dev:
            raise ValueError(
                f"quarantine_dir {self.quarantine_dir} is on another filesystem than {self.root}; "
                "quarantine must be an atomic rename"
            )
        self.pins_file = self.config.pins_file or self.quarantine_dir / "pins.json"
        self._pins: set[int] = self._load_pins()
        self._meta_cache: dict[Path, tuple[tuple[int, int], dict[str, int] | Exception]] = {}

    # -- pins ------------------------------------------------------------------------------

    def _load_pins(self) -> set[int]:
        try:
            data = json.loads(self.pins_file.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as e:
            # Refuse to run retention on a guess: a lost pin could delete last-known-good.
            raise CheckpointError(f"unreadable pins file {self.pins_file}: {e}") from e
        pins = data.get("pinned") if isinstance(data, dict) else None
        if not isinstance(pins, list) or not all(isinstance(p, int) and p >= 0 for p in pins):
            raise CheckpointError(f"malformed pins file {self.pins_file}")
        return set(pins)

    def _save_pins(self) -> None:
        tmp = self.pins_file.with_name(self.pins_file.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"pinned": sorted(self._pins)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.pins_file)

    @property
    def pinned(self) -> frozenset[int]:
        return frozenset(self._pins)

    def pin(self, step: int | str) -> None:
        """Protect ``step`` from retention (persisted before returning)."""
        s = parse_step(step)
        if not (self.root / f"step-{s}").is_dir():
            raise CheckpointNotFound(f"no checkpoint step-{s} in {self.root}")
        if s not in self._pins:
            self._pins.add(s)
            self._save_pins()

    def unpin(self, step: int | str) -> None:
        s = parse_step(step)
        if s in self._pins:
            self._pins.discard(s)
            self._save_pins()

    # -- scanning --------------------------------------------------------------------------

    def _step_dirs(self) -> list[tuple[int, Path]]:
        return dcp.step_folders(self.root)

    def _required(self, meta: Path) -> dict[str, int]:
        st = meta.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = self._meta_cache.get(meta)
        if hit is not None and hit[0] == key:
            result = hit[1]
        else:
            try:
                result = read_required_sizes(meta, self.config.max_metadata_bytes)
            except Exception as e:  # noqa: BLE001 - any parse failure makes it corrupt
                result = e
            self._meta_cache[meta] = (key, result)
        if isinstance(result, Exception):
            raise result
        return result

    def inspect(self, step: int, path: Path) -> CheckpointInfo:
        """Validate one ``step-N`` folder."""
        size, newest = 0, 0.0
        sizes: dict[str, int] = {}
        try:
            newest = path.stat().st_mtime
            for dirpath, _dirs, files in os.walk(path):
                for name in files:
                    try:
                        st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    size += st.st_size
                    newest = max(newest, st.st_mtime)
                    if dirpath == str(path):
                        sizes[name] = st.st_size
        except FileNotFoundError:
            return CheckpointInfo(step, path, False, "folder vanished during scan", 0, 0.0,
                                  "corrupt", step in self._pins)

        def info(valid: bool, reason: str, state: str) -> CheckpointInfo:
            return CheckpointInfo(step, path, valid, reason, size, newest, state, step in self._pins)

        if METADATA not in sizes and self._clock() - newest < self.config.in_progress_grace_s:
            return info(False, "being written: no .metadata yet", "in_progress")
        reason = dcp.problem(sizes, lambda: self._required(path / METADATA))
        return info(not reason, reason, "corrupt" if reason else "valid")

    def scan(self) -> list[CheckpointInfo]:
        """Every ``step-N`` folder in the root, oldest first, validated."""
        return [self.inspect(step, path) for step, path in self._step_dirs()]

    def valid_steps(self) -> list[int]:
        return [c.step for c in self.scan() if c.valid]

    def newest_valid(self, before: int | None = None, *, at_or_before: int | None = None) -> CheckpointInfo | None:
        """The newest valid checkpoint, or the newest with step < ``before`` / <= ``at_or_before``.
        A query: corrupt folders met on the way are skipped, not moved."""
        for c in reversed(self.scan()):
            if c.valid and (before is None or c.step < before) and (at_or_before is None or c.step <= at_or_before):
                return c
        return None

    def quarantined(self) -> list[dict]:
        """What the quarantine holds: ``[{step, name, path, reason, at}]``, oldest step first."""
        out = []
        for p in sorted(self.quarantine_dir.glob("step-*")):
            m = re.match(r"step-([0-9]{1,18})\.", p.name)
            if not p.is_dir() or m is None:
                continue
            note: dict = {}
            try:
                note = json.loads(p.with_name(p.name + ".reason.json").read_text())
            except (OSError, ValueError):
                pass
            out.append({"step": int(m.group(1)), "name": p.name, "path": str(p),
                        "reason": note.get("reason", "") if isinstance(note, dict) else "",
                        "at": note.get("at") if isinstance(note, dict) else None})
        return sorted(out, key=lambda q: (q["step"], q["name"]))

    def resolve(self, name_or_step: int | str) -> CheckpointInfo:
        """Operator input -> its checkpoint. ValueError for malformed names (checked before any
        filesystem access), CheckpointNotFound when there is no such folder."""
        step = parse_step(name_or_step)
        path = self.root / f"step-{step}"
        if not path.is_dir() or path.is_symlink():
            raise CheckpointNotFound(f"no checkpoint step-{step} in {self.root}")
        return self.inspect(step, path)

    # -- quarantine ------------------------------------------------------------------------

    def _quarantine_one(self, step: int, src: Path, reason: str, tag: str) -> Moved:
        base = self.quarantine_dir / f"step-{step}.{tag}"
        dst, n = base, 0
        while dst.exists() or dst.with_name(dst.name + ".reason.json").exists():
            n += 1
            dst = base.with_name(f"{base.name}-{n}")
        try:
            os.rename(src, dst)  # atomic, same filesystem; never copy + delete
        except OSError as e:
            raise CheckpointError(f"could not quarantine step-{step}: {e}") from e
        note = {"step": step, "from": str(src), "reason": reason, "at": self._clock()}
        try:
            dst.with_name(dst.name + ".reason.json").write_text(json.dumps(note))
        except OSError:
            pass  # the move is what matters; the note is a courtesy
        if step in self._pins:
            self._pins.discard(step)  # a pin means "keep in the root"; the data is kept anyway
            self._save_pins()
        return Moved(step, src, dst)

    def _tag(self, tag: str | None) -> str:
        if tag is None:
            return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tag) or ".." in tag:
            raise ValueError(f"quarantine tag {tag!r} must be 1-64 of [A-Za-z0-9_.-]")
        return tag

    def quarantine_newer_than(self, step: int, reason: str, tag: str | None = None) -> list[Moved]:
        """Move every ``step-N`` with N > ``step`` to ``<quarantine>/step-N.<tag>`` (a UTC
        timestamp unless given, e.g. ``gen7``). Never deletes; a repeat moves nothing.
        Stop the generation first: a folder still being written is moved like any other."""
        step = parse_step(step)
        t = self._tag(tag)
        return [self._quarantine_one(s, p, reason, t) for s, p in self._step_dirs() if s > step]

    def quarantine_corrupt(self) -> list[tuple[CheckpointInfo, Moved]]:
        """Move every corrupt checkpoint to ``<quarantine>/step-N.corrupt`` (never loaded, never
        deleted). A folder still being written (``in_progress``) is left alone."""
        return [(info, moved) for info in self.scan() if info.state == "corrupt"
                if (moved := self.quarantine(info.step, reason=f"corrupt: {info.reason}", tag="corrupt"))]

    def quarantine(self, step: int | str, reason: str, tag: str | None = None) -> Moved | None:
        """Move one checkpoint (e.g. a corrupt one) to quarantine; None if it is not there."""
        s = parse_step(step)
        src = self.root / f"step-{s}"
        if not src.is_dir():
            return None
        return self._quarantine_one(s, src, reason, self._tag(tag))

    # -- retention -------------------------------------------------------------------------

    def retention_plan(self) -> list[CheckpointInfo]:
        """What `apply_retention` would delete now (valid, unpinned, older than the newest
        ``keep_last`` valid ones)."""
        k = self.config.keep_last
        if k <= 0:
            return []
        valid = [c for c in self.scan() if c.valid]
        keep = {c.step for c in valid[-k:]}
        return [c for c in valid[:-k] if c.step not in keep and c.step not in self._pins]

    def apply_retention(self) -> list[CheckpointInfo]:
        """Delete what `retention_plan` names; the only deletion in the system."""
        removed = []
        for c in self.retention_plan():
            if c.step in self._pins or not c.valid:  # re-checked right before deleting
                continue
            # A hidden name torchtitan's r"step-(\d+)" search does not match.
            doomed = self.root / f".titan-supervisor-deleting-{c.step}-{os.getpid()}"
            try:
                os.rename(c.path, doomed)
            except FileNotFoundError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(c)
        for leftover in self.root.glob(".titan-supervisor-deleting-*"):  # from a crash mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        return removed
