"""The training plan the daemon is about to launch, as preflight sees it and as the trainer gets it (pure).

Why: preflight once linted a micro-batch of 4 while the trainer ran with a local batch of 8 passed
through free-form flags. Now both sides come from one place: `plan_dict` resolves the settings
([run], [training], [optimizer], [preflight]) on top of the preset's defaults in
`supervisor.model_table.PRESET_TRAINING`, and `trainer_flags` renders the torchtitan flags from
that same resolved plan. The daemon passes `trainer_flags(settings)` to every generation, and the
[optimizer] overrides as JSON (`--supervision.optimizer`).

Layouts: `[preflight] layouts` is the ordered list (fastest first). A generation runs on one of
them (`layout_index`; None = the preset's own parallelism, no layout flags). `next_layout` is the
repeated-OOM fallback: the next layout after the current one that passes preflight
(`supervisor.preflight.next_safer_layout`), and `layout_flags` renders it as typed torchtitan flags.

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


def planned_world(settings) -> int:
    """Ranks of the full job: nproc_per_node, times the expected nodes under node agents."""
    launch = settings.launch
    nodes = len(launch.agents.nodes) if launch.backend == "agents" else 1
    return settings.run.nproc_per_node * max(1, nodes)


def plan_dict(settings, host_memory_gib: float | None = None) -> dict:
    r, o, p, tr = settings.run, settings.optimizer, settings.preflight, settings.training
    world = planned_world(settings)
    t = _preset(settings)
    opt = {"lr": t.lr, "eps": t.eps, "beta1": t.beta1, "beta2": t.beta2, "weight_decay": t.weight_decay,
           "warmup_steps": t.warmup_steps, **o.overrides()}
    cpu = p.device.lower() == "cpu"
    mb = local_batch(settings)
    training = {"model": r.preset, "world_size": world,
                "global_batch": tr.global_batch_size or world * mb,
                "seq_len": tr.seq_len or t.seq_len, "device": p.device, "dtype": "fp32" if cpu else "bf16"}
    memory = p.device_memory_gib or (host_memory_gib if cpu else None)
    if memory is not None:
        training["device_memory_gib"] = memory
    layouts = [_layout_dict(layout) for layout in p.layouts] or [
        {"dp": world, "micro_batch": mb, "activation_checkpointing": "none" if cpu else "selective",
         "name": "data parallel"}]
    return {"training": training, "optimizer": opt, "layouts": layouts}


def _layout_dict(layout) -> dict:
    from dataclasses import asdict

    return asdict(layout)


def build_plan(settings, host_memory_gib: float | None = None) -> TrainingPlan:
    return plan_from_dict(plan_dict(settings, host_memory_gib))


def layout_flags(layout: dict) -> list[str]:
    """Typed torchtitan flags for one layout of `plan_dict(...)["layouts"]`."""
    dp, shard = int(layout["dp"]), int(layout.get("dp_shard", -1))
    shard_degree = dp if shard == -1 else shard
    return ["--parallelism.data_parallel_replicate_degree", str(dp // shard_degree),
            "--parallelism.data_parallel_shard_degree", str(shard_degree),
            "--parallelism.tensor_parallel_degree", str(int(layout.get("tp", 1))),
            "--parallelism.pipeline_parallel_degree", str(int(layout.get("pp", 1))),
            "--parallelism.context_parallel_degree", str(int(layout.get("cp", 1))),
            "--training.local_batch_size", str(int(layout["micro_batch"]))]


def layout_label(settings, index: int) -> str:
    layout = settings.preflight.layouts[index]
    return f"layouts[{index}] {layout.label()}"


def next_layout(settings, current: int | None) -> int | None:
    """The index of the next preflight-valid layout after `current`, or None when there is none
    (no layouts configured, all later ones invalid). `current` None means the generation ran on
    preflight's chosen layout (the first valid one)."""
    from supervisor.preflight import next_safer_layout

    if not settings.preflight.layouts:
        return None
    plan, thresholds = build_plan(settings), settings.preflight.thresholds
    if current is None:
        current = next_safer_layout(plan, -1, thresholds)
        if current is None:
            return None
    return next_safer_layout(plan, current, thresholds)


def trainer_flags(settings, layout_index: int | None = None) -> list[str]:
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
    if layout_index is not None:
        layouts = plan_dict(settings)["layouts"]
        if not 0 <= layout_index < len(layouts):
            raise ValueError(f"layout index {layout_index} is not one of the {len(layouts)} [preflight] layouts")
        flags += layout_flags(layouts[layout_index])
    return flags


class LayoutFallback:
    """What `Remedies` asks for a next-layout restart: the next preflight-valid layout after the
    current one, with its label (for the journal, the page and status)."""

    def __init__(self, settings) -> None:
        self._settings = settings

    def next(self, current: int | None) -> tuple[int, str] | None:
        index = next_layout(self._settings, current)
        return None if index is None else (index, layout_label(self._settings, index))
