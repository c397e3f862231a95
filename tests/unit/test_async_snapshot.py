"""`training.snapshot`: the CPU twins an async save hands to its writer thread.

Real torch tensors and modules, one process (the 2-rank path runs in
tests/integration/test_trainer.py::test_async_snapshot_saves_resume_like_an_unbroken_run).
What would break a checkpoint: twins not refilled (a save writes an older step's values),
twins refilled while a previous snapshot is read (non-tensor leaves shared), a replaced live
tensor still paired (a save after a load writes the pre-load optimizer state), a hook-derived
model tensor re-derived wrongly.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.snapshot import ModelView, StateSnapshot, Unpairable  # noqa: E402


def live_state():
    g = torch.Generator().manual_seed(0)
    return {"model.w": torch.randn(4, 3, generator=g),
            "optimizer": {"state.w.exp_avg": torch.zeros(4, 3), "state.w.step": torch.tensor(1.0),
                          "param_groups.w.lr": 1e-3},
            "train_state": {"step": 1, "data": [1, 2]}}


def test_take_refills_the_same_twins_with_the_live_values():
    live, snap = live_state(), StateSnapshot()
    first = snap.take(live)
    assert torch.equal(first["model.w"], live["model.w"]) and first["model.w"] is not live["model.w"]
    twin = first["model.w"]
    live["model.w"].add_(1.0)  # training steps update in place
    live["optimizer"]["state.w.step"].add_(1)
    live["optimizer"]["param_groups.w.lr"] = 5e-4
    live["train_state"]["step"] = 2
    second = snap.take(live)
    assert second["model.w"] is twin and snap.builds == 1  # no new allocation
    assert torch.equal(second["model.w"], live["model.w"])
    assert second["optimizer"]["state.w.step"].item() == 2.0
    assert second["optimizer"]["param_groups.w.lr"] == 5e-4 and second["train_state"]["step"] == 2
    assert first["train_state"]["step"] == 1  # non-tensor leaves are copies per snapshot
    live["train_state"]["data"].append(3)
    assert second["train_state"]["data"] == [1, 2]
    assert snap.nbytes == 2 * 12 * 4 + 4


def test_a_replaced_live_tensor_rebuilds_the_twins():
    live, snap = live_state(), StateSnapshot()
    snap.take(live)
    live["optimizer"]["state.w.exp_avg"] = torch.full((4, 3), 7.0)  # optimizer.load_state_dict makes new tensors
    out = snap.take(live)
    assert snap.builds == 2 and torch.equal(out["optimizer"]["state.w.exp_avg"], torch.full((4, 3), 7.0))
    live["extra"] = torch.ones(2)  # a new leaf
    assert torch.equal(snap.take(live)["extra"], torch.ones(2)) and snap.builds == 3
    snap.invalidate()
    snap.take(live)
    assert snap.builds == 4


class Fused(torch.nn.Module):
    """Saves its fused parameter split in two, as torchtitan's FusedQKVLinear saves wq/wk/wv."""

    def __init__(self, salt=None):
        super().__init__()
        self.wab = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))
        self.norm = torch.nn.Parameter(torch.ones(3))
        self.salt = salt
        self.register_state_dict_post_hook(self._split)

    @staticmethod
    def _split(module, sd, prefix, meta):
        w = sd.pop(f"{prefix}wab")
        extra = 0.0 if module.salt is None else next(module.salt)
        sd[f"{prefix}a"] = w[:2].contiguous() + extra
        sd[f"{prefix}b"] = w[2:].t().contiguous()  # a copy
        sd[f"{prefix}c"] = w[3]  # a view: read in place, like a parameter


def test_model_view_re_derives_hook_made_tensors_from_twins():
    model = torch.nn.Sequential(Fused())
    view = ModelView([model], model.state_dict(), mesh_fn=lambda: None)
    assert sorted(view.direct) == ["0.c", "0.norm"] and view.derived == ["0.a", "0.b"]
    with torch.no_grad():
        model[0].wab.mul_(2)  # a step
    assert torch.equal(view.derive()["0.a"], torch.arange(6.0).reshape(2, 3))  # not refreshed yet: the twin
    view.refresh()
    got = view.derive()
    assert torch.equal(got["0.a"], 2 * torch.arange(6.0).reshape(2, 3))
    assert torch.equal(got["0.b"], 2 * torch.arange(6.0, 12.0).reshape(2, 3).t())
    assert torch.equal(view.direct["0.c"], 2 * torch.arange(9.0, 12.0))
    assert view.direct["0.norm"] is not None and torch.equal(view.direct["0.norm"], model[0].norm)


def test_model_view_refuses_a_hook_it_cannot_reproduce():
    salt = iter(range(100))
    model = torch.nn.Sequential(Fused(salt=salt))
    with pytest.raises(Unpairable, match="differs from the live one"):
        ModelView([model], model.state_dict(), mesh_fn=lambda: None)


def _waiting_checkpointer(folder, error):
    """An OnDemandCheckpointer with only what its wait reads: an async save in flight to
    ``folder`` that failed with ``error`` (built without torchtitan's __init__)."""
    from concurrent.futures import Future

    from torchtitan.components.checkpoint import AsyncMode

    from training.trainer import OnDemandCheckpointer

    ck = object.__new__(OnDemandCheckpointer)
    ck.enable, ck.async_mode, ck._inflight, ck._writer = True, AsyncMode.ASYNC, str(folder), None
    ck.stager = None  # what torchtitan's __del__ (close) reads
    ck.save_future = Future()
    ck.save_future.set_exception(error)
    return ck


def _dcp_failure():
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("write failed", {0: FileNotFoundError("step-40/.metadata.tmp")})


def test_an_async_save_whose_folder_a_rollback_moved_aside_does_not_crash_the_wait(tmp_path):
    """A rollback quarantines the checkpoints newer than its target; one still being written fails
    (dcp raises CheckpointException, a BaseException) and the rollback's own wait for it crashed
    the trainer (torchft mode, a save every 5 steps). Its folder is gone: the wait goes on."""
    ck = _waiting_checkpointer(tmp_path / "checkpoint" / "step-40", _dcp_failure())
    ck.maybe_wait_for_saving()
    assert ck.save_future is None and ck._inflight is None
    ck.maybe_wait_for_saving()  # nothing in flight any more


def test_an_async_save_that_failed_for_another_reason_still_raises(tmp_path):
    """The folder is still there: a real I/O failure, raised (crash-only: a restart recovers)."""
    from torch.distributed.checkpoint.api import CheckpointException

    folder = tmp_path / "checkpoint" / "step-40"
    folder.mkdir(parents=True)
    ck = _waiting_checkpointer(folder, _dcp_failure())
    with pytest.raises(CheckpointException):
        ck.maybe_wait_for_saving()
    ck = _waiting_checkpointer(folder, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        ck.maybe_wait_for_saving()


def test_the_next_save_judges_a_failed_write_by_its_own_folder(tmp_path):
    """The next save first awaits the write in flight; that write failed with its folder still
    there (a real failure), so the save raises. It was swallowed while the new save's folder,
    not yet created, was already named in flight when the wait ran."""
    from torch.distributed.checkpoint.api import CheckpointException

    folder = tmp_path / "checkpoint" / "step-40"
    folder.mkdir(parents=True)
    ck = _waiting_checkpointer(folder, _dcp_failure())
    ck._should_save = lambda step, last_step=False: True
    ck._create_checkpoint_id = lambda step, folder="": str(tmp_path / "checkpoint" / f"step-{step}")
    with pytest.raises(CheckpointException):
        ck._save(45)
