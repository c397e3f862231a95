"""Checkpoint catalog: validity of scanned folders (the rule itself is in supervisor/dcp.py,
tested in test_dcp.py), in-progress saves, quarantine, retention and name resolution."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from supervisor.checkpoints import Catalog, CheckpointError, CheckpointNotFound, parse_step
from supervisor.dcp import UnsafeMetadata, read_required_sizes

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dcp" / "step-10"
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_ckpt(root: Path, step: int, age_s: float = 3600.0) -> Path:
    """A copy of the real 2-rank DCP fixture as ``root/step-<step>``, aged ``age_s``."""
    dst = root / f"step-{step}"
    shutil.copytree(FIXTURE, dst)
    return set_age(dst, age_s)


def set_age(folder: Path, age_s: float = 3600.0) -> Path:
    """Make a folder and its files look last written ``age_s`` before NOW (call after edits)."""
    t = NOW - age_s
    for p in [folder, *folder.iterdir()]:
        os.utime(p, (t, t))
    return folder


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "dump" / "checkpoint"
    root.mkdir(parents=True)
    return root, tmp_path / "dump" / "quarantine"


def catalog(dirs, keep_last: int = 0, clock: Clock | None = None) -> Catalog:
    root, q = dirs
    return Catalog(root, q, Catalog.Config(keep_last=keep_last), clock=clock or Clock())


def all_files(*roots: Path) -> set[tuple[str, int]]:
    """(name, size) of every file under roots, independent of where it was moved."""
    out = set()
    for r in roots:
        for p in r.rglob("*"):
            if p.is_file() and p.parent.name.startswith("step-"):
                out.add((p.parent.name.split(".")[0] + "/" + p.name, p.stat().st_size))
    return out


# --- validity -----------------------------------------------------------------------------


def test_valid_checkpoint(dirs):
    make_ckpt(dirs[0], 10)
    [info] = catalog(dirs).scan()
    assert info.step == 10 and info.valid and info.state == "valid" and info.reason == ""
    assert info.size_bytes == sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert info.mtime == pytest.approx(NOW - 3600)


def test_truncated_shard_is_invalid_with_sizes(dirs):
    p = make_ckpt(dirs[0], 10)
    need = read_required_sizes(p / ".metadata")["__1_0.distcp"]
    with open(p / "__1_0.distcp", "r+b") as f:
        f.truncate(1200)
    [info] = catalog(dirs).scan()
    assert not info.valid and info.state == "corrupt"
    assert info.reason == f"shard __1_0.distcp is 1200 bytes, metadata needs {need}"


def test_missing_shard_is_invalid(dirs):
    p = make_ckpt(dirs[0], 10)
    (p / "__0_0.distcp").unlink()
    [info] = catalog(dirs).scan()
    assert not info.valid and info.reason.startswith("missing shard __0_0.distcp")


def test_missing_metadata_old_is_corrupt(dirs):
    p = make_ckpt(dirs[0], 10, age_s=3600)
    (p / ".metadata").unlink()
    set_age(p, 3600)
    [info] = catalog(dirs).scan()
    assert (info.valid, info.state, info.reason) == (False, "corrupt", "missing .metadata")


def test_missing_metadata_recent_is_in_progress(dirs):
    p = make_ckpt(dirs[0], 10, age_s=5)
    (p / ".metadata").unlink()
    set_age(p, 5)
    [info] = catalog(dirs).scan()
    assert not info.valid and info.state == "in_progress"


def test_garbage_metadata_is_corrupt_with_reason(dirs):
    p = make_ckpt(dirs[0], 10)
    (p / ".metadata").write_bytes(b"this is not a pickle at all")
    [info] = catalog(dirs).scan()
    assert not info.valid and info.state == "corrupt"
    assert info.reason.startswith("unreadable .metadata: ")


def test_metadata_rewritten_is_reparsed(dirs):
    """The parse cache is keyed by mtime and size: a replaced .metadata is read again."""
    p = make_ckpt(dirs[0], 10)
    cat = catalog(dirs)
    assert cat.scan()[0].valid
    (p / ".metadata").write_bytes(b"garbage")
    assert not cat.scan()[0].valid


def test_malicious_pickle_is_refused_and_runs_nothing(dirs, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = make_ckpt(dirs[0], 10)
    (p / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeMetadata, match="refused global"):
        read_required_sizes(p / ".metadata")
    [info] = catalog(dirs).scan()
    assert not info.valid and "UnsafeMetadata" in info.reason
    assert not marker.exists()


# --- queries ------------------------------------------------------------------------------


def test_valid_steps_and_newest_valid(dirs):
    root = dirs[0]
    for s in (10, 20, 30):
        make_ckpt(root, s)
    (root / "step-30" / ".metadata").unlink()
    set_age(root / "step-30")
    (root / "not-a-step").mkdir()
    cat = catalog(dirs)
    assert [c.step for c in cat.scan()] == [10, 20, 30]
    assert cat.valid_steps() == [10, 20]
    assert cat.newest_valid().step == 20
    assert cat.newest_valid(before=20).step == 10
    assert cat.newest_valid(before=10) is None


# --- quarantine ---------------------------------------------------------------------------


def test_quarantine_newer_than_moves_newer_never_deletes(dirs):
    root, q = dirs
    for s in (10, 20, 30, 40):
        make_ckpt(root, s)
    before = all_files(root)
    cat = catalog(dirs)
    moved = cat.quarantine_newer_than(20, "rollback to 20", tag="gen3")
    assert [m.step for m in moved] == [30, 40]
    assert {m.dst.name for m in moved} == {"step-30.gen3", "step-40.gen3"}
    assert cat.valid_steps() == [10, 20]
    assert cat.newest_valid().step == 20
    assert all_files(root, q) == before  # every byte is still somewhere
    assert "rollback to 20" in (q / "step-30.gen3.reason.json").read_text()
    assert cat.quarantine_newer_than(20, "again", tag="gen3") == []  # idempotent


def test_quarantine_same_tag_twice_does_not_overwrite(dirs):
    root, q = dirs
    make_ckpt(root, 30)
    cat = catalog(dirs)
    first = cat.quarantine_newer_than(20, "one", tag="t")[0].dst
    make_ckpt(root, 30)  # training re-wrote step 30, then it went bad again
    second = cat.quarantine_newer_than(20, "two", tag="t")[0].dst
    assert first != second and first.is_dir() and second.is_dir()


def test_quarantine_single_and_default_timestamp_tag(dirs):
    root, q = dirs
    make_ckpt(root, 10)
    cat = catalog(dirs)
    m = cat.quarantine(10, "corrupt")
    assert m.dst.parent == q and m.dst.name == "step-10.20231114T221320Z"
    assert not (root / "step-10").exists() and (m.dst / ".metadata").exists()
    assert cat.quarantine(10, "again") is None


def test_quarantine_dir_must_differ_from_root(tmp_path):
    with pytest.raises(ValueError):
        Catalog(tmp_path, tmp_path)


def test_bad_quarantine_tag_rejected(dirs):
    make_ckpt(dirs[0], 30)
    with pytest.raises(ValueError):
        catalog(dirs).quarantine_newer_than(20, "x", tag="../../escape")
    assert (dirs[0] / "step-30").is_dir()


# --- retention ----------------------------------------------------------------------------


def test_retention_keeps_newest_k_and_pinned(dirs):
    root, _ = dirs
    for s in (10, 20, 30, 40, 50):
        make_ckpt(root, s)
    cat = catalog(dirs, keep_last=2)
    cat.pin(10)
    removed = cat.apply_retention()
    assert [c.step for c in removed] == [20, 30]
    assert cat.valid_steps() == [10, 40, 50]
    assert not list(root.glob(".titan-supervisor-deleting-*"))


def test_retention_never_deletes_invalid_or_newer_in_progress(dirs):
    root, _ = dirs
    for s in (10, 20, 30, 40):
        make_ckpt(root, s)
    (root / "step-10" / ".metadata").unlink()  # old and corrupt: kept for a human to look at
    set_age(root / "step-10")
    make_ckpt(root, 50, age_s=1)
    (root / "step-50" / ".metadata").unlink()  # being written right now
    set_age(root / "step-50", 1)
    cat = catalog(dirs, keep_last=1)
    assert [c.step for c in cat.apply_retention()] == [20, 30]
    assert sorted(int(p.name[5:]) for p in root.glob("step-*")) == [10, 40, 50]


def test_retention_keep_last_zero_deletes_nothing(dirs):
    root, _ = dirs
    for s in range(1, 8):
        make_ckpt(root, s)
    assert catalog(dirs, keep_last=0).apply_retention() == []
    assert len(list(root.glob("step-*"))) == 7


def test_pins_persist_across_catalog_instances(dirs):
    root, q = dirs
    for s in (10, 20, 30):
        make_ckpt(root, s)
    catalog(dirs).pin("step-10")
    cat2 = catalog(dirs, keep_last=1)  # a restarted daemon
    assert cat2.pinned == {10}
    assert [c.step for c in cat2.apply_retention()] == [20]
    assert cat2.scan()[0].pinned


def test_pin_missing_checkpoint_raises(dirs):
    with pytest.raises(CheckpointNotFound):
        catalog(dirs).pin(99)


def test_corrupt_pins_file_refuses_to_start(dirs):
    root, q = dirs
    q.mkdir(parents=True)
    (q / "pins.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="pins file"):
        catalog(dirs)


def test_quarantined_step_loses_its_pin(dirs):
    root, _ = dirs
    make_ckpt(root, 30)
    cat = catalog(dirs)
    cat.pin(30)
    cat.quarantine_newer_than(20, "rollback")
    assert cat.pinned == frozenset()


# --- resolve ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, why", [
    ("../x", "looks like a path"),
    ("/etc", "looks like a path"),
    ("step-1/../..", "looks like a path"),
    ("step-1\\..", "looks like a path"),
    ("abc", "not a step number"),
    ("1.5", "not a step number"),
    ("-3", ">= 0"),
    ("step--3", ">= 0"),
    (-3, ">= 0"),
    (" 12", "not a step number"),
    ("١٢", "not a step number"),  # non-ASCII digits
    (True, "step number"),
    (1.0, "step number"),
])
def test_resolve_rejects_bad_names(dirs, bad, why):
    make_ckpt(dirs[0], 12)
    with pytest.raises(ValueError, match=why):
        catalog(dirs).resolve(bad)


@pytest.mark.parametrize("good", [12, "12", "step-12"])
def test_resolve_accepts_steps(dirs, good):
    make_ckpt(dirs[0], 12)
    info = catalog(dirs).resolve(good)
    assert info.step == 12 and info.valid and info.path == dirs[0] / "step-12"


def test_resolve_missing_is_not_found(dirs):
    with pytest.raises(CheckpointNotFound, match="step-7"):
        catalog(dirs).resolve("step-7")


def test_parse_step():
    assert parse_step("step-0") == 0
    assert parse_step(1500) == 1500


def test_unfinished_save_with_tmp_metadata_says_so(dirs):
    p = make_ckpt(dirs[0], 10)
    (p / ".metadata").rename(p / ".metadata.tmp")
    set_age(p)
    [info] = catalog(dirs).scan()
    assert info.state == "corrupt" and "never finished" in info.reason


def test_crash_mid_retention_leaves_nothing_torchtitan_would_load(dirs, monkeypatch):
    """torchtitan picks the max step among names matching re.search(r"step-(\\d+)"); a folder
    half-deleted by retention must never be one of them."""
    import re

    import supervisor.checkpoints as ck

    root, _ = dirs
    for s in (10, 20, 30):
        make_ckpt(root, s)

    def crash(path, ignore_errors=False):
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(ck.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog(dirs, keep_last=1).apply_retention()
    names = [p.name for p in root.iterdir()]
    assert sorted(n for n in names if re.search(r"step-(\d+)", n)) == ["step-20", "step-30"]
    monkeypatch.undo()
    catalog(dirs, keep_last=1).apply_retention()  # the next pass finishes the job
    assert sorted(p.name for p in root.iterdir()) == ["step-30"]
