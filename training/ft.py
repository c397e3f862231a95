"""torchft replica groups for `SupervisedTrainer`: each group steps with its peers, alone when they
are gone, and heals from a peer when it (re)joins.

Why not torchtitan's own FT trainer (`torchtitan.experiments.torchft`): it is a fork of the
whole ``Trainer.__init__``/``train`` (our trainer enters upstream's loop through its hooks), and on
this CPU machine its default (HSDP, async quorum) mode crashed on heal with 2 groups, while
DiLoCo keeps the groups' parameters apart between syncs (shared/notes/torchtitan-on-cpu.md). This
is the path the notes measured as bit-exact: torchft's `Manager` with a synchronous quorum,
`ProcessGroupGloo`, gradients averaged with ``Manager.allreduce``, the update applied only when
``should_commit`` says so, and a heal that ships model, optimizer, LR schedule and train state.

One step, every group (each group is one torchrun; on this machine 1 rank per group):
1. ``begin_step``: quorum (blocking). If this group is behind, torchft fetches a peer's state and
   ``_load`` applies it: the step number jumps to the peer's, and the group's own data stream is
   drained forward to the same number of batches (each group reads its own shard, so the
   position, not the data, is what a peer can tell it).
2. forward/backward, then ``average_gradients`` (one flat allreduce, averaged over participants).
3. ``commit``: the optimizer steps only if every participant says so. An uncommitted step (a peer
   died mid-allreduce) is undone by the trainer: step number and LR schedule go back one, and the
   batch is dropped, as torchft does.

Directives (a hot rollback, an LR cool, a skipped update...) reach replica group 0 only: it applies
one at a step boundary and then *leads*: its torchft step count goes one past every peer's, so at the
next quorum each peer is behind and heals from group 0, receiving its model, optimizer, LR schedule
and scale, pending update skips, checkpoint interval and data position (a position behind the
peer's own is reached by reloading the peer's own newest checkpoint at or before the leader's
loaded step and draining forward). One mechanism, torchft's own heal, keeps the groups identical;
the torchft step count then runs ahead of the trainer's step, which nothing else reads.

Failure model: a peer killed mid-step makes this group's allreduce fail fast (gloo connection
reset) or time out (``process_group_timeout_ms``); the step is not committed and the next quorum
goes on without the peer once the Lighthouse stops hearing its heartbeat. A group that cannot
reach the Lighthouse fails its quorum after ``quorum_timeout_s`` and exits (the supervisor
relaunches it). Nothing here touches checkpoints: each group keeps its own in its own folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.tools.logging import logger

from training.data import GlobalOrderDataLoader

if TYPE_CHECKING:
    from training.trainer import SupervisedTrainer


# Directives whose effect every group must share (parameters, LR, data position, schedule, the
# checkpoint steps). Only group 0 hears the daemon: it applies one, then *leads* (`ReplicaSync.lead`)
# so that every peer heals from it at the next quorum and receives the same state.
LEADING_DIRECTIVES = frozenset({"set_lr_scale", "skip_updates", "rollback", "decay_now", "extend",
                                "set_checkpoint_interval"})


@dataclass(kw_only=True, slots=True)
class ReplicaConfig:
    """``--fault_tolerance.*``: the names torchtitan's own FT section uses, where they mean the same."""

    enable: bool = False
    replica_id: int = 0
    """This replica group's index, 0 .. group_size-1 (also its data shard)."""
    group_size: int = 0
    """The number of replica groups (torchtitan's meaning: the data is split this many ways)."""
    min_replica_size: int = 1
    """Fewest groups a step may commit with (1: a lone survivor keeps training)."""
    process_group_timeout_ms: int = 10000
    """A cross-group allreduce not done by then fails the step (a hung peer)."""
    quorum_timeout_s: float = 60.0
    """A quorum (the Lighthouse unreachable, or waiting for a joining peer) fails after this."""
    lighthouse: str = ""
    """Lighthouse address (http://host:port). Empty: the TORCHFT_LIGHTHOUSE environment variable."""


def global_rank(cfg: ReplicaConfig, rank: int, world: int) -> int:
    """This rank's number across the replica groups: ``replica_id * world + rank`` (``world``: the
    group's own ranks), the numbering the supervisor uses for rank exits, heartbeats and a fault
    spec's ``rank=``; the rank itself when FT is off."""
    return cfg.replica_id * world + rank if cfg.enable else rank


def validate(cfg: ReplicaConfig) -> None:
    if not cfg.enable:
        return
    if cfg.group_size < 1:
        raise ValueError(f"--fault_tolerance.group_size must be >= 1 (the number of replica groups), got {cfg.group_size}")
    if not 0 <= cfg.replica_id < cfg.group_size:
        raise ValueError(f"--fault_tolerance.replica_id must be in 0..{cfg.group_size - 1}, got {cfg.replica_id}")
    if cfg.min_replica_size < 1:
        raise ValueError(f"--fault_tolerance.min_replica_size must be >= 1, got {cfg.min_replica_size}")
    if cfg.process_group_timeout_ms <= 0 or cfg.quorum_timeout_s <= 0:
        raise ValueError("--fault_tolerance timeouts must be positive")
    if not (cfg.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
        raise ValueError("--fault_tolerance.enable needs a Lighthouse: --fault_tolerance.lighthouse or TORCHFT_LIGHTHOUSE")


class ReplicaSync:
    """This group's torchft `Manager` and the trainer state it ships and receives on a heal."""

    def __init__(self, cfg: ReplicaConfig, trainer: "SupervisedTrainer", completed_steps: int) -> None:
        import torchft
        from torchtitan.components.checkpointer.base import ModelWrapper

        self.cfg = cfg
        self.trainer = trainer
        self.model = ModelWrapper(trainer.model_parts)
        self.heals = 0
        self.leads = 0
        self.uncommitted = 0
        timeout = timedelta(milliseconds=cfg.process_group_timeout_ms)
        self.manager = torchft.Manager(
            pg=torchft.ProcessGroupGloo(timeout=timeout),
            load_state_dict=self._load, state_dict=self._state,
            min_replica_size=cfg.min_replica_size, use_async_quorum=False,
            timeout=timeout, quorum_timeout=timedelta(seconds=cfg.quorum_timeout_s),
            lighthouse_addr=cfg.lighthouse or None, replica_id=f"group_{cfg.replica_id}",
        )
        # The manager counts committed steps; ours are the trainer's (a restart resumes at its checkpoint).
        self.manager.load_state_dict({"step": completed_steps, "batches_committed": completed_steps})

    # --- the step ----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Quorum; heals this group (``_load``) when it is behind a peer."""
        self.manager.start_quorum()

    def lead(self) -> None:
        """Make this group the one every peer heals from at the next quorum (after a leading
        directive). Peers in a synchronous quorum are at this group's step count (a relaunched one
        is behind it): one past it makes this group the only one at the quorum's max step."""
        m = self.manager
        m.load_state_dict({"step": m.current_step() + 1, "batches_committed": m.batches_committed()})
        self.leads += 1

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        # A rank's own part of each gradient (a DTensor's local shard): groups average rank by rank.
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.manager.allreduce(flat).wait()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def commit(self) -> bool:
        ok = self.manager.should_commit()
        if not ok:
            self.uncommitted += 1
        return ok

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)

    # --- heal --------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Called on torchft's quorum thread while the main thread waits in ``begin_step``."""
        t = self.trainer
        # torch's own per-optimizer state dicts (by parameter index: every group builds the same
        # model), not torchtitan's flattened one, which did not load into a fresh optimizer here.
        optim = [o.state_dict() for o in t.optimizers.optimizers]
        return {"model": self.model.state_dict(), "optimizer": optim,
                "lr_scheduler": t.lr_schedulers.state_dict(), "train_state": t.state_dict(),
                "supervision": t.shared_state()}

    def _load(self, sd: dict[str, Any]) -> None:
        t = self.trainer
        shared = sd.get("supervision") or {}
        target = int(sd["train_state"].get("batches_consumed", 0))
        rewound_to = None
        if target < t.batches_consumed:  # the leader went back (a rollback): so does this group's data
            rewound_to = t.rewind_data(int(shared.get("loaded_step", -1)))
        position = t.batches_consumed
        self.model.load_state_dict(sd["model"])
        for o, state in zip(t.optimizers.optimizers, sd["optimizer"], strict=True):
            o.load_state_dict(state)
        t.lr_schedulers.load_state_dict(sd["lr_scheduler"])
        t.load_state_dict(sd["train_state"])
        t.load_shared_state(shared)
        t.batches_consumed = position
        drained = t.advance_data_to(target)
        t.after_heal()
        self.heals += 1
        logger.info(f"healed from a peer: now at step {t.step}, data drained {drained} batches to {target}"
                    + (f" (rewound to {rewound_to} first)" if rewound_to is not None else ""))
        t.ft_event({"kind": "ft_healed", "step": t.step - 1, "batches_drained": drained,
                    "batches": t.batches_consumed, "rewound_from": rewound_to, "lr_scale": t.lr_scale.target})


def sharded_dataloader_config(cfg: ReplicaConfig, loader_config: Any) -> Any:
    """The text dataloader config, reading this group's shard of the data (unchanged when FT is off)."""
    if not cfg.enable:
        return loader_config
    if type(loader_config) is GlobalOrderDataLoader.Config:
        # The presets' global-order loader (training/data.py) serves resharding; torchft mode shards
        # per replica group and heals by counting batches, on torchtitan's text loader.
        loader_config = HuggingFaceTextDataLoader.Config(dataset=loader_config.dataset,
                                                         dataset_path=loader_config.dataset_path)
    if type(loader_config) is not HuggingFaceTextDataLoader.Config:
        raise ValueError(f"torchft mode supports the text dataloader only, not {type(loader_config).__qualname__}")
    values = {f.name: getattr(loader_config, f.name) for f in fields(loader_config) if f.init}
    return ShardedTextDataLoader.Config(**values, groups=cfg.group_size, group=cfg.replica_id)


class ShardedTextDataLoader(HuggingFaceTextDataLoader):
    """torchtitan's text dataloader over shard ``group`` of ``groups`` x the group's own dp ranks."""

    @dataclass(kw_only=True, slots=True)
    class Config(HuggingFaceTextDataLoader.Config):
        groups: int = 1
        group: int = 0

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, **kwargs: Any) -> None:
        world, rank = dp_world_size * config.groups, dp_world_size * config.group + dp_rank
        super().__init__(config, dp_world_size=world, dp_rank=rank, **kwargs)
