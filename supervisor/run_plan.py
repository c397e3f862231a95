"""The training plan the daemon is about to launch, as preflight sees it (pure).

Built from the settings (run, optimizer, preflight tables) on top of the preset's defaults in
`supervisor.model_table.PRESET_TRAINING`, so the numbers linted are the numbers the trainer
gets: the daemon passes the same [optimizer] overrides to every rank.
"""

from __future__ import annotations

from supervisor.model_table import PRESET_TRAINING
from supervisor.preflight import TrainingPlan, plan_from_dict


def plan_dict(settings, host_memory_gib: float | None = None) -> dict:
    r, o, p = settings.run, settings.optimizer, settings.preflight
    if r.preset not in PRESET_TRAINING:
        raise ValueError(f"run.preset {r.preset!r} is not a known preset ({', '.join(PRESET_TRAINING)})")
    t = PRESET_TRAINING[r.preset]
    opt = {"lr": t.lr, "eps": t.eps, "beta1": t.beta1, "beta2": t.beta2, "weight_decay": t.weight_decay,
           "warmup_steps": t.warmup_steps, **o.overrides()}
    cpu = p.device.lower() == "cpu"
    training = {"model": r.preset, "world_size": r.nproc_per_node,
                "global_batch": p.global_batch or r.nproc_per_node * t.local_batch, "seq_len": t.seq_len,
                "device": p.device, "dtype": "fp32" if cpu else "bf16"}
    memory = p.device_memory_gib or (host_memory_gib if cpu else None)
    if memory is not None:
        training["device_memory_gib"] = memory
    layouts = p.layouts or [{"dp": r.nproc_per_node, "micro_batch": t.local_batch,
                             "activation_checkpointing": "none" if cpu else "selective", "name": "data parallel"}]
    return {"training": training, "optimizer": opt, "layouts": layouts}


def build_plan(settings, host_memory_gib: float | None = None) -> TrainingPlan:
    return plan_from_dict(plan_dict(settings, host_memory_gib))
