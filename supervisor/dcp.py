"""What makes a torchtitan DCP checkpoint folder valid: the one definition, torch-free.

Both sides import this: the daemon's catalog (`supervisor.checkpoints`) and the trainer
(`training.run` for ``--checkpoint.load_step``, `training.trainer` for an in-process rollback).
Before it existed the trainer only checked that ``.metadata`` was there, so a truncated shard
passed on the trainer side and failed in the catalog; now a folder is judged the same way
everywhere.

Layout read: ``step-N/`` with ``.metadata`` (a pickle of
``torch.distributed.checkpoint.metadata.Metadata``) and shard files ``__<rank>_0.distcp``.
A folder is **valid** only if ``.metadata`` is there, parses, names at least one shard, and
every shard it names exists with at least ``max(offset + length)`` bytes. Anything else is
invalid with one specific human reason naming the missing or short file. (Whether a folder
without ``.metadata`` is still being written is a question of time, so the catalog answers it;
this module has no clock.)

The ``.metadata`` pickle is read without torch: `_MetadataUnpickler` maps every ``torch`` /
``torch.*`` global to an inert stand-in class that only records its arguments, maps the
``pathlib`` path classes to a stand-in too, and refuses every other global (``os.system``,
``builtins.eval``, ...) with `UnsafeMetadata`. Nothing in a metadata file can run code here.

Failure model: every function only reads; none writes, moves or deletes. A file that vanishes
mid-check makes the folder invalid (never an exception out of `check_folder`).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

METADATA = ".metadata"
MAX_METADATA_BYTES = 256 << 20
STEP_DIR = re.compile(r"step-([0-9]{1,18})")


class UnsafeMetadata(pickle.UnpicklingError):
    """The metadata pickle asked for a global outside the torch / pathlib allow-list."""


# --- torch-free .metadata reader ---------------------------------------------------------


class _Stub:
    """Inert stand-in for a torch class or callable met in a DCP ``.metadata`` pickle.

    Calling it (REDUCE), instantiating it (NEWOBJ) and restoring state (BUILD) only record
    data; no method of any real class is ever looked up or run.
    """

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args)
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (
            state[0] is None or isinstance(state[0], dict)
        ) and isinstance(state[1], dict):
            merged: dict = {}
            for part in state:
                if part:
                    merged.update(part)
            state = merged
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str) and not k.startswith("__"):
                    self.__dict__[k] = v
        else:
            self.__dict__["_state"] = state

    def __reduce__(self):  # never re-pickle a stub into something meaningful
        raise TypeError("metadata stand-ins cannot be pickled")

    def __repr__(self) -> str:
        return f"<{self._qualname} {self.__dict__!r}>"


_PATH_CLASSES = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}


class _MetadataUnpickler(pickle.Unpickler):
    """Allow-list unpickler: torch.* and pathlib paths become `_Stub`s; all else is refused."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file)
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module == "torch" or module.startswith("torch.")) or (
            module == "pathlib" and name in _PATH_CLASSES
        )
        if not allowed or not name.isidentifier():
            raise UnsafeMetadata(f"refused global {module}.{name}")
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (_Stub,), {"_qualname": f"{module}.{name}"})
        return self._stubs[key]

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadata("refused persistent id")


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a regular file, never following a symlink and never blocking: a
    ``.metadata`` linked to a FIFO hung the catalog scan in ``open()`` (and one linked to
    /dev/zero would have read without end, its size being 0). OSError / ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"file is {st.st_size} bytes, larger than the {max_bytes}-byte limit")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"file grew past the {max_bytes}-byte limit while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_required_sizes(path: Path, max_bytes: int = MAX_METADATA_BYTES) -> dict[str, int]:
    """Parse a DCP ``.metadata`` without torch: ``{relative_path: max(offset + length)}``.

    Raises `UnsafeMetadata` for a pickle that asks for anything outside the allow-list, and
    ValueError / pickle.UnpicklingError / OSError for unreadable or malformed files.
    """
    raw = _read_regular_file(path, max_bytes)
    meta = _MetadataUnpickler(io.BytesIO(raw)).load()
    storage = getattr(meta, "storage_data", None) if isinstance(meta, _Stub) else None
    if not isinstance(storage, dict):
        raise ValueError("no storage_data in metadata")
    need: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        off = getattr(info, "offset", None)
        length = getattr(info, "length", None)
        if not isinstance(rel, str) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (off, length)
        ):
            raise ValueError(f"malformed storage entry {info!r}")
        if rel in ("", ".", "..") or "/" in rel or "\\" in rel or "\x00" in rel:
            raise ValueError(f"shard name {rel!r} points outside the checkpoint folder")
        need[rel] = max(need.get(rel, 0), off + length)
    return need


# --- the validity rule ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str  # "" when valid, else one human sentence naming the file at fault


def problem(files: Mapping[str, int], required: Callable[[], dict[str, int]]) -> str:
    """The validity rule itself: ``""`` when valid, else why not.

    ``files`` maps the folder's top-level file names to their sizes; ``required`` reads the
    ``.metadata`` (only called when it is there; any exception it raises makes the folder
    invalid). Callers that cache the parse (the catalog) pass their own ``required``.
    """
    if METADATA not in files:
        if METADATA + ".tmp" in files:
            return "missing .metadata (a .metadata.tmp is there: the save never finished)"
        return "missing .metadata"
    try:
        need = required()
    except Exception as e:  # noqa: BLE001 - any parse failure makes it invalid
        return f"unreadable .metadata: {type(e).__name__}: {e}"
    if not need:
        return ".metadata names no shard files"
    for rel in sorted(need):
        have = files.get(rel)
        if have is None:
            return f"missing shard {rel} (metadata needs {need[rel]} bytes)"
        if have < need[rel]:
            return f"shard {rel} is {have} bytes, metadata needs {need[rel]}"
    return ""


def top_level_files(folder: Path) -> dict[str, int]:
    """``{name: size}`` of the plain files directly in ``folder`` (symlinks not followed)."""
    out: dict[str, int] = {}
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_file(follow_symlinks=False) or e.is_symlink():
                    out[e.name] = e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return out


def check_folder(folder: Path, max_metadata_bytes: int = MAX_METADATA_BYTES) -> Verdict:
    """Judge one ``step-N`` folder by `problem`; a missing folder is invalid, not an error."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return Verdict(False, f"no checkpoint folder {folder}")
    try:
        files = top_level_files(folder)
    except OSError as e:
        return Verdict(False, f"unreadable checkpoint folder {folder}: {e}")
    reason = problem(files, lambda: read_required_sizes(folder / METADATA, max_metadata_bytes))
    return Verdict(not reason, reason)


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` folder directly under ``root`` (not symlinks), oldest first."""
    out = []
    if not Path(root).is_dir():
        return out
    with os.scandir(root) as it:
        for e in it:
            m = STEP_DIR.fullmatch(e.name)
            if m and e.is_dir(follow_symlinks=False):
                out.append((int(m.group(1)), Path(e.path)))
    out.sort()
    return out
