"""`training.ft`'s start checks and data sharding (no training: the torchft path itself is proven by
tests/integration/test_torchft_drill.py)."""

from __future__ import annotations

import pytest
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

from training import ft


def test_off_by_default_and_unchecked_when_off(monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    ft.validate(ft.ReplicaConfig())  # off: nothing to check
    loader = HuggingFaceTextDataLoader.Config(dataset="c4_test")
    assert ft.sharded_dataloader_config(ft.ReplicaConfig(), loader) is loader


@pytest.mark.parametrize("kw,msg", [
    ({"group_size": 0}, "group_size must be >= 1"),
    ({"group_size": 2, "replica_id": 2}, r"replica_id must be in 0\.\.1"),
    ({"group_size": 2, "replica_id": -1}, r"replica_id must be in 0\.\.1"),
    ({"group_size": 2, "min_replica_size": 0}, "min_replica_size must be >= 1"),
    ({"group_size": 2, "process_group_timeout_ms": 0}, "timeouts must be positive"),
    ({"group_size": 2}, "needs a Lighthouse"),
])
def test_bad_replica_settings_are_refused_by_name(kw, msg, monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    with pytest.raises(ValueError, match=msg):
        ft.validate(ft.ReplicaConfig(enable=True, **kw))


def test_the_lighthouse_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:29510")
    ft.validate(ft.ReplicaConfig(enable=True, group_size=2, replica_id=1))


def test_each_group_reads_its_own_shard():
    loader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path="/data/x")
    cfg = ft.sharded_dataloader_config(ft.ReplicaConfig(enable=True, group_size=3, replica_id=2), loader)
    assert isinstance(cfg, ft.ShardedTextDataLoader.Config)
    assert (cfg.groups, cfg.group, cfg.dataset_path, cfg.dataset) == (3, 2, "/data/x", "c4_test")


@pytest.mark.parametrize("kind", sorted(ft.GROUP_LOCAL_DIRECTIVES))
def test_directives_that_would_split_the_groups_are_refused_in_torchft_mode(kind):
    """Only replica group 0 hears the daemon: a directive changing its parameters or LR alone would
    make the groups diverge, so the trainer refuses it (the daemon falls back to a cold restart for
    a rollback). The guard runs before any trainer state is touched: a bare object is enough."""
    from types import SimpleNamespace

    from supervisor.protocol import Directive
    from training.trainer import SupervisedTrainer

    me = SimpleNamespace(config=SimpleNamespace(fault_tolerance=ft.ReplicaConfig(enable=True, group_size=2)))
    d = Directive(id="a1", kind=kind, scale=0.5, n=1, step=0, steps=10)
    with pytest.raises(ValueError, match="refused in torchft mode"):
        SupervisedTrainer._execute(me, d)
    me.config.fault_tolerance.enable = False  # off: the same directive goes on to its handler
    with pytest.raises(AttributeError):
        SupervisedTrainer._execute(me, d)
