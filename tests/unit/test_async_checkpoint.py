"""An async checkpoint is not a checkpoint until it is complete.

A real `torch.distributed.checkpoint.async_save` (what torchtitan's `checkpoint.async_mode =
"async"` calls) writes into `step-2/` from a background thread; its storage writer is held
just before it writes `.metadata` (DCP writes it last, after every shard). While held, the
folder has its shards but no `.metadata`: the catalog and the trainer's own check
(`supervisor.dcp.check_folder`) must not choose it. Once released it is the newest valid one.
Nothing is mocked: real DCP files on disk, real catalog.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
dcp_torch = pytest.importorskip("torch.distributed.checkpoint")

from supervisor import dcp  # noqa: E402
from supervisor.checkpoints import Catalog  # noqa: E402


class HeldWriter(dcp_torch.FileSystemWriter):
    """Writes the shards, then waits for `release` before writing `.metadata` (finish)."""

    def __init__(self, path, shards_written: threading.Event, release: threading.Event) -> None:
        super().__init__(path)
        self.shards_written, self.release = shards_written, release

    def finish(self, metadata, results) -> None:
        self.shards_written.set()
        assert self.release.wait(60), "test never released the writer"
        return super().finish(metadata, results)


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(256, 256, generator=g), "b": torch.randn(256, generator=g)},
            "step": torch.tensor(seed)}


def test_a_checkpoint_being_written_async_is_not_chosen(tmp_path):
    root, q = tmp_path / "checkpoint", tmp_path / "quarantine"
    root.mkdir()
    dcp_torch.save(state(1), checkpoint_id=str(root / "step-1"))  # a complete older one
    catalog = Catalog(root, q)
    assert catalog.newest_valid().step == 1

    shards_written, release = threading.Event(), threading.Event()
    writer = HeldWriter(str(root / "step-2"), shards_written, release)
    try:
        future = dcp_torch.async_save(state(2), storage_writer=writer, checkpoint_id=str(root / "step-2"))
        assert shards_written.wait(60), "the async save never reached its metadata write"
        files = sorted(p.name for p in (root / "step-2").iterdir())
        assert files and dcp.METADATA not in files, files  # shards on disk, no .metadata yet
        info = {c.step: c for c in catalog.scan()}[2]
        assert (info.valid, info.state) == (False, "in_progress"), info
        assert catalog.newest_valid().step == 1
        assert catalog.valid_steps() == [1]
        assert dcp.check_folder(root / "step-2").reason  # the trainer refuses it for a rollback too
    finally:
        release.set()
    future.result(timeout=60)
    assert catalog.newest_valid().step == 2
    assert not dcp.check_folder(root / "step-2").reason
