"""The one validity rule for DCP checkpoint folders (supervisor/dcp.py), shared by the daemon's
catalog and the trainer: real DCP files (a committed 2-rank fixture and one saved by the installed
torch in a subprocess), the torch-free allow-list unpickler, and agreement with the catalog."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.checkpoints import Catalog
from supervisor.dcp import (
    UnsafeMetadata,
    Verdict,
    check_folder,
    read_required_sizes,
    step_folders,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dcp" / "step-10"


def copy_fixture(root: Path, step: int = 10) -> Path:
    dst = root / f"step-{step}"
    shutil.copytree(FIXTURE, dst)
    return dst


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_fixture_is_real_two_rank_dcp():
    need = read_required_sizes(FIXTURE / ".metadata")
    assert set(need) == {"__0_0.distcp", "__1_0.distcp"}
    for rel, n in need.items():
        assert n > 0 and (FIXTURE / rel).stat().st_size >= n


def test_intact_folder_is_valid():
    assert check_folder(FIXTURE) == Verdict(True, "")


def test_truncated_shard_names_the_shard_and_sizes(tmp_path):
    p = copy_fixture(tmp_path)
    need = read_required_sizes(p / ".metadata")["__1_0.distcp"]
    truncate(p / "__1_0.distcp", need - 1)
    assert check_folder(p) == Verdict(False, f"shard __1_0.distcp is {need - 1} bytes, metadata needs {need}")


def test_shard_exactly_as_long_as_needed_is_valid(tmp_path):
    """The bound is max(offset + length): trailing bytes may be missing, needed ones may not."""
    p = copy_fixture(tmp_path)
    need = read_required_sizes(p / ".metadata")
    for rel, n in need.items():
        truncate(p / rel, n)
    assert check_folder(p).valid


def test_missing_shard_names_it(tmp_path):
    p = copy_fixture(tmp_path)
    (p / "__0_0.distcp").unlink()
    v = check_folder(p)
    assert not v.valid and v.reason.startswith("missing shard __0_0.distcp (metadata needs ")


def test_missing_metadata_and_unfinished_save(tmp_path):
    p = copy_fixture(tmp_path)
    (p / ".metadata").rename(p / ".metadata.tmp")
    assert check_folder(p) == Verdict(False, "missing .metadata (a .metadata.tmp is there: the save never finished)")
    (p / ".metadata.tmp").unlink()
    assert check_folder(p) == Verdict(False, "missing .metadata")


def test_garbage_metadata_is_invalid_with_reason(tmp_path):
    p = copy_fixture(tmp_path)
    (p / ".metadata").write_bytes(b"this is not a pickle at all")
    v = check_folder(p)
    assert not v.valid and v.reason.startswith("unreadable .metadata: ")


def test_oversized_metadata_is_refused_before_reading(tmp_path):
    p = copy_fixture(tmp_path)
    v = check_folder(p, max_metadata_bytes=100)
    assert not v.valid and "larger than the 100-byte limit" in v.reason


def test_missing_folder_and_symlinked_folder_are_invalid(tmp_path):
    assert check_folder(tmp_path / "step-99") == Verdict(False, f"no checkpoint folder {tmp_path / 'step-99'}")
    (tmp_path / "step-11").symlink_to(FIXTURE)
    assert not check_folder(tmp_path / "step-11").valid


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = copy_fixture(tmp_path)
    (p / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeMetadata, match="refused global"):
        read_required_sizes(p / ".metadata")
    v = check_folder(p)
    assert not v.valid and "UnsafeMetadata" in v.reason
    assert not marker.exists()


def test_malicious_global_nested_inside_torch_looking_pickle_is_refused(tmp_path):
    """An allowed torch stand-in does not open the door for builtins.eval further in."""
    marker = tmp_path / "pwned2"
    payload = (
        b"\x80\x04"
        b"ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}"
        b"(Vstorage_data\ncbuiltins\neval\n"
        + f"(V__import__('os').system('touch {marker}')\ntR".encode()
        + b"ub."
    )
    f = tmp_path / ".metadata"
    f.write_bytes(payload)
    with pytest.raises(UnsafeMetadata, match="builtins.eval"):
        read_required_sizes(f)
    assert not marker.exists()


def test_shard_name_escaping_folder_is_rejected(tmp_path):
    payload = (
        b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}"
        b"(Vstorage_data\n}(K\x00ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n)\x81}"
        b"(Vrelative_path\nV../../etc/passwd\nVoffset\nK\x00Vlength\nK\x10ubuub."
    )
    f = tmp_path / ".metadata"
    f.write_bytes(payload)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        read_required_sizes(f)


@pytest.fixture(scope="session")
def live_dcp(tmp_path_factory) -> Path:
    """A DCP checkpoint saved right now by the installed torch, in a subprocess."""
    pytest.importorskip("torch")  # only to skip cleanly; the save runs in a subprocess
    d = tmp_path_factory.mktemp("live") / "step-3"
    code = textwrap.dedent(f"""
        import warnings; warnings.simplefilter("ignore")
        import torch, torch.distributed.checkpoint as dcp
        dcp.save({{"model": {{"w": torch.randn(10, 10)}}, "x": {{"y": torch.arange(5)}}}},
                 checkpoint_id={str(d)!r}, no_dist=True)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    return d


def test_live_torch_metadata_parses_without_torch(live_dcp):
    need = read_required_sizes(live_dcp / ".metadata")
    assert need == {"__0_0.distcp": (live_dcp / "__0_0.distcp").stat().st_size}
    assert check_folder(live_dcp) == Verdict(True, "")


def test_module_imports_no_torch():
    code = ("import sys; import supervisor.checkpoints, supervisor.journal, supervisor.metrics; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2], timeout=60)


def test_step_folders_lists_only_step_dirs_oldest_first(tmp_path):
    for s in (20, 3, 100):
        (tmp_path / f"step-{s}").mkdir()
    (tmp_path / "step-7.superseded-1").mkdir()
    (tmp_path / "step-8").write_text("a file, not a folder")
    (tmp_path / "step-9").symlink_to(tmp_path / "step-3")
    assert [s for s, _ in step_folders(tmp_path)] == [3, 20, 100]
    assert step_folders(tmp_path / "absent") == []


@pytest.mark.parametrize("damage", ["none", "truncate", "unlink_shard", "unlink_meta", "garbage"])
def test_catalog_and_check_folder_give_the_same_verdict(tmp_path, damage):
    """One definition: the daemon's catalog and the trainer's check never disagree."""
    root = tmp_path / "ckpt"
    root.mkdir()
    p = copy_fixture(root)
    if damage == "truncate":
        truncate(p / "__0_0.distcp", 10)
    elif damage == "unlink_shard":
        (p / "__1_0.distcp").unlink()
    elif damage == "unlink_meta":
        (p / ".metadata").unlink()
    elif damage == "garbage":
        (p / ".metadata").write_bytes(b"\x80\x04junk")
    old = 1_000_000_000.0  # old enough that the catalog does not call it in progress
    for f in [p, *p.iterdir()]:
        os.utime(f, (old, old))
    info = Catalog(root, tmp_path / "q").resolve(10)
    v = check_folder(p)
    assert (info.valid, info.reason) == (v.valid, v.reason)
    assert v.valid == (damage == "none")


def test_modules_import_no_torch():
    code = ("import sys; import supervisor.dcp, supervisor.checkpoints, supervisor.journal, supervisor.metrics; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2], timeout=60)


def test_trainer_start_resolves_newest_valid_not_newest(tmp_path):
    """training.run's -1 (no load_step) takes the newest *valid* folder and names the skipped one."""
    from training.run import StartError, resolve_load_step

    copy_fixture(tmp_path, 10)
    truncate(copy_fixture(tmp_path, 20) / "__0_0.distcp", 5)
    step, warnings = resolve_load_step(tmp_path, -1)
    assert step == 10 and len(warnings) == 1 and "step-20: shard __0_0.distcp is 5 bytes" in warnings[0]
    with pytest.raises(StartError, match="step-20 in .* is invalid: shard __0_0.distcp is 5 bytes"):
        resolve_load_step(tmp_path, 20)
    assert resolve_load_step(tmp_path / "empty", -1) == (-1, [])


@pytest.mark.parametrize("target", ["fifo", "dev_zero", "good_metadata"])
def test_a_metadata_that_is_no_regular_file_is_invalid_and_never_blocks(tmp_path, target):
    """`.metadata` linked to a FIFO hung the catalog scan in open() (found by an adversarial
    review); linked to /dev/zero it would read without end (its size is 0). A symlink is not
    followed at all, even to a good file: the folder is invalid, said why, at once."""
    import threading

    p = copy_fixture(tmp_path / "ck")
    good = tmp_path / "elsewhere.metadata"
    shutil.copy(p / ".metadata", good)
    (p / ".metadata").unlink()
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        (p / ".metadata").symlink_to(tmp_path / "fifo")
    elif target == "dev_zero":
        (p / ".metadata").symlink_to("/dev/zero")
    else:
        (p / ".metadata").symlink_to(good)
    out: list = []
    for judge in (lambda: check_folder(p), lambda: Catalog(tmp_path / "ck", tmp_path / "q").resolve(10)):
        t = threading.Thread(target=lambda: out.append(judge()), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "the check blocked"
    verdict, info = out
    assert not verdict.valid and ".metadata" in verdict.reason
    assert not info.valid
