"""[training] settings reach torchtitan through `run_plan.trainer_flags`, and they are the numbers
preflight linted: real torchrun, 2 CPU ranks, the tiny preset with a batch and sequence length
the preset does not use. Tokens per step, counted by the trainer itself, must equal the plan's
global batch x sequence length.
"""

from __future__ import annotations

import pytest

from supervisor.run_plan import build_plan, trainer_flags
from supervisor.settings import Settings
from tests.trainer_harness import run_trainer, spool

pytestmark = pytest.mark.integration

STEPS = 3


def test_trainer_runs_the_batch_preflight_linted(tmp_path):
    s = Settings.load(run={"preset": "tiny", "nproc_per_node": 2},
                      training={"seed": 5, "local_batch_size": 2, "seq_len": 64})
    plan = build_plan(s, host_memory_gib=16.0)
    assert (plan.layouts[0].micro_batch, plan.seq_len, plan.global_batch) == (2, 64, 4)  # tiny's own: 4, 256, 8
    p = run_trainer(tmp_path, 2, ["--training.steps", str(STEPS), *trainer_flags(s)])
    assert p.returncode == 0, p.stderr[-3000:]
    records, _ = spool(tmp_path)
    by_step = {r["step"]: r for r in records if "step" in r and "tokens_seen" in r}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert by_step[STEPS]["tokens_seen"] == STEPS * plan.global_batch * plan.seq_len


def test_async_checkpoints_reach_the_trainer_and_every_save_completes(tmp_path):
    """`[checkpoints] async_mode = "async"` becomes torchtitan's `--checkpoint.async_mode async`:
    the trainer saves from a background thread (training/snapshot.py), reports how long it was blocked, and every
    checkpoint is complete (the catalog's rule) by the time it says "finished" — the last one
    included, which an exit without waiting for the background write would leave without
    `.metadata`. 1 rank, 8 steps (~15 s)."""
    from supervisor.checkpoints import Catalog

    s = Settings.load(run={"preset": "tiny", "nproc_per_node": 1}, training={"seed": 5},
                      checkpoints={"async_mode": "async"})
    flags = trainer_flags(s)
    assert flags[flags.index("--checkpoint.async_mode") + 1] == "async"
    p = run_trainer(tmp_path, 1, ["--training.steps", "8", "--checkpoint.interval", "4", *flags])
    assert p.returncode == 0, p.stderr[-3000:]
    _, events = spool(tmp_path)
    saves = [e for e in events if e["kind"] == "checkpoint_saved"]
    assert [e["step"] for e in saves] == [4, 8]
    assert all(e["seconds"] >= 0 for e in saves)
    # the trainer's own async path (training/snapshot.py): twins built once, at the first save
    assert (p.stdout + p.stderr).count("async snapshot: CPU twins built") == 1
    assert "async snapshot saves off" not in p.stdout + p.stderr
    cat = Catalog(tmp_path / "checkpoint", tmp_path / "quarantine")
    assert cat.valid_steps() == [4, 8]
    assert [c.state for c in cat.scan()] == ["valid", "valid"]
