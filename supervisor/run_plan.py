"""The training plan the daemon is about to launch, as preflight sees it and as the trainer gets it (pure).

Why: preflight once linted a micro-batch of 4 while the trainer ran with a local batch of 8 passed
through free-form flags. Now both sides come from one place: `plan_dict` resolves the settings
([run], [training], [optimizer], [preflight]) on top of the preset's defaults in
`supervisor.model_table.PRESET_TRAINING`, and `trainer_flags` renders the torchtitan flags from
that same resolved plan. The daemon passes `trainer_flags(settings)` to every generation, and the
[optimizer] overrides as JSON (`--supervision.optimizer`).

Failure model: an unknown preset is a ValueError naming `run.preset`; a global batch that is not a
multiple of ranks x local batch is a preflight error (the plan carries both numbers as given).
"""

from __future__ import annotations

from supervisor.model_table import PRESET_TRAINING, PresetTraining
from supervisor.preflight import TrainingPlan, plan_from_dict


def _preset(settings) -> PresetTraining:
    r = settings.run
    if r.preset not in PRESET_TRAINING:
        raise ValueError(f"run.preset {r.preset!r} is not a known preset ({', '.join(PRESET_TRAINING)})")
    return PRESET_TRAINING[r.preset]


def local_batch(settings) -> int:
    return settings.training.local_batch_size or _preset(settings).local_batch


def plan_dict(settings, host_memory_gib: float | None = None) -> dict:
    r, o, p, tr = settings.run, settings.optimizer, settings.preflight, settings.training
    t = _preset(settings)
    opt = {"lr": t.lr, "eps": t.eps, "beta1": t.beta1, "beta2": t.beta2, "weight_decay": t.weight_decay,
           "warmup_steps": t.warmup_steps, **o.overrides()}
    cpu = p.device.lower() == "cpu"
    mb = local_batch(settings)
    training = {"model": r.preset, "world_size": r.nproc_per_node,
                "global_batch": tr.global_batch_size or r.nproc_per_node * mb,
                "seq_len": tr.seq_len or t.seq_len, "device": p.device, "dtype": "fp32" if cpu else "bf16"}
    memory = p.device_memory_gib or (host_memory_gib if cpu else None)
    if memory is not None:
        training["device_memory_gib"] = memory
    layouts = [_layout_dict(layout) for layout in p.layouts] or [
        {"dp": r.nproc_per_node, "micro_batch": mb, "activation_checkpointing": "none" if cpu else "selective",
         "name": "data parallel"}]
    return {"training": training, "optimizer": opt, "layouts": layouts}


def _layout_dict(layout) -> dict:
    from dataclasses import asdict

    return asdict(layout)


def build_plan(settings, host_memory_gib: float | None = None) -> TrainingPlan:
    return plan_from_dict(plan_dict(settings, host_memory_gib))


def trainer_flags(settings) -> list[str]:
    """The torchtitan flags for the [training] settings, rendered from the plan preflight checks.

    Only what the settings set is passed (unset fields keep the preset's value, which is what the
    plan assumed too); the seed is not part of the plan and is passed as is."""
    tr = settings.training
    plan = plan_dict(settings)["training"]
    flags: list[str] = []
    if tr.seed is not None:
        flags += ["--debug.seed", str(tr.seed)]
    if tr.local_batch_size is not None:
        flags += ["--training.local_batch_size", str(local_batch(settings))]
    if tr.global_batch_size is not None:
        flags += ["--training.global_batch_size", str(plan["global_batch"])]
    if tr.seq_len is not None:
        flags += ["--training.seq_len", str(plan["seq_len"])]
    return flags
