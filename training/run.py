"""Entry point of every trainer rank: ``torchrun ... -m training.run --preset tiny [--section.field v ...]``.

``training.run --spare DIR`` is a warm spare rank (training/spare.py): it does the imports, then
waits for its argv in ``DIR/launch.json`` and goes on exactly as a rank started with that argv.

Validates the start options before anything is built (a bad preset, checkpoint step, skip
count or fault spec exits with a message naming the problem and writes nothing), makes
torchtitan CPU-ready when there is no GPU, points the config at the local assets, then runs
``SupervisedTrainer``. Any ``--section.field value`` flag torchtitan accepts is passed through.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

DEFAULT_PRESET = "tiny"


class StartError(ValueError):
    pass


def split_args(argv: list[str]) -> tuple[str, list[str]]:
    preset, rest, i = DEFAULT_PRESET, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--preset":
            if i + 1 >= len(argv):
                raise StartError("--preset needs a name")
            preset, i = argv[i + 1], i + 2
            continue
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a in ("--module", "--config") or a.startswith(("--module=", "--config=")):
            raise StartError("use --preset NAME instead of --module/--config")
        else:
            rest.append(a)
        i += 1
    return preset, rest


def resolve_load_step(folder: Path, load_step: int) -> tuple[int, list[str]]:
    """The checkpoint step to load, judged by the one validity rule (`supervisor.dcp`), and
    warnings to print. Raises StartError instead of letting torchtitan load an invalid folder.

    ``N >= 0``: step-N must be valid, else the error names the missing/short shard.
    ``-1``: torchtitan alone would take the newest ``step-*`` with a ``.metadata``, valid or
    not; here it is the newest *valid* one (newer invalid ones are named in a warning), or a
    fresh start when no folder has a ``.metadata``; a folder torchtitan would load while none is
    valid is an error, so a corrupt checkpoint is never loaded and never silently replaced by
    step 0.
    """
    from supervisor import dcp

    folders = dcp.step_folders(folder)
    verdicts = {step: dcp.check_folder(path) for step, path in folders}
    valid = [step for step, v in verdicts.items() if v.valid]
    if load_step >= 0:
        v = verdicts.get(load_step)
        if v is None:
            raise StartError(
                f"--checkpoint.load_step {load_step}: no complete checkpoint step-{load_step} in {folder} "
                f"(complete ones: {valid or 'none'})")
        if not v.valid:
            raise StartError(
                f"--checkpoint.load_step {load_step}: checkpoint step-{load_step} in {folder} is invalid: "
                f"{v.reason} (valid ones: {valid or 'none'})")
        return load_step, []
    newest = max(valid, default=-1)
    skipped = [f"step-{s}: {v.reason}" for s, v in verdicts.items() if s > newest and not v.valid]
    if newest < 0 and any((path / dcp.METADATA).is_file() for _, path in folders):
        raise StartError(f"no valid checkpoint to resume from in {folder}: " + "; ".join(skipped)
                         + " (move the invalid folders aside to start fresh)")
    warnings = [f"warning: resuming from step-{newest}, not from newer invalid checkpoints: "
                + "; ".join(skipped)] if skipped and newest >= 0 else []
    return newest, warnings


def validate(config) -> None:
    from training import ft
    from training.faults import parse_faults

    sup = config.supervision
    if sup.skip_batches < 0:
        raise StartError(f"--supervision.skip_batches must be >= 0, got {sup.skip_batches}")
    if not (sup.lr_scale > 0 and math.isfinite(sup.lr_scale)):
        raise StartError(f"--supervision.lr_scale must be a positive number, got {sup.lr_scale}")
    if sup.lr_ramp_steps < 0:
        raise StartError(f"--supervision.lr_ramp_steps must be >= 0, got {sup.lr_ramp_steps}")
    if sup.generation < 0:
        raise StartError(f"--supervision.generation must be >= 0, got {sup.generation}")
    try:
        parse_faults(sup.faults)
    except ValueError as e:
        raise StartError(f"--supervision.faults: {e}") from None
    try:
        ft.validate(config.fault_tolerance)
    except ValueError as e:
        raise StartError(str(e)) from None
    if getattr(config.checkpoint, "async_mode", "disabled") == "async_with_pinned_mem":
        import torch

        if not torch.cuda.is_available():
            raise StartError("--checkpoint.async_mode async_with_pinned_mem stages into pinned memory and needs a "
                             "GPU (torch's DefaultStager refuses a non-blocking copy without one); use 'async'")
    load_step = config.checkpoint.load_step
    if load_step < -1:
        raise StartError(f"--checkpoint.load_step must be -1 (newest) or a step number, got {load_step}")
    if load_step >= 0 or config.checkpoint.enable:
        step, warnings = resolve_load_step(Path(config.dump_folder) / config.checkpoint.folder, load_step)
        config.checkpoint.load_step = step
        if os.environ.get("RANK", "0") == "0":
            for w in warnings:
                print(w, file=sys.stderr)
    if config.checkpoint.keep_latest_k != 0:
        config.checkpoint.keep_latest_k = 0  # the supervisor owns retention; torchtitan never deletes


def _set_kwarg(name: str):
    def apply(config, value: float) -> None:
        for group in config.optimizer.param_groups:
            group.optimizer_kwargs[name] = float(value)
    return apply


def _set_beta(index: int):
    def apply(config, value: float) -> None:
        for group in config.optimizer.param_groups:
            betas = list(group.optimizer_kwargs.get("betas", (0.9, 0.999)))
            betas[index] = float(value)
            group.optimizer_kwargs["betas"] = tuple(betas)
    return apply


def _set_warmup(config, value: float) -> None:
    config.lr_scheduler.warmup_steps = int(value)


# The one list of --supervision.optimizer keys (the daemon's [optimizer] section) and where each goes.
OPTIMIZER_OVERRIDES = {"lr": _set_kwarg("lr"), "eps": _set_kwarg("eps"), "weight_decay": _set_kwarg("weight_decay"),
                       "beta1": _set_beta(0), "beta2": _set_beta(1), "warmup_steps": _set_warmup}
OPTIMIZER_KEYS = frozenset(OPTIMIZER_OVERRIDES)


def apply_optimizer_overrides(config) -> None:
    import json

    text = config.supervision.optimizer
    if not text:
        return
    try:
        overrides = json.loads(text)
    except ValueError as e:
        raise StartError(f"--supervision.optimizer is not JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise StartError("--supervision.optimizer must be a JSON object")
    unknown = set(overrides) - OPTIMIZER_KEYS
    if unknown:
        raise StartError(f"--supervision.optimizer: unknown keys {sorted(unknown)} (known: {sorted(OPTIMIZER_KEYS)})")
    for key, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise StartError(f"--supervision.optimizer: {key} must be a non-negative number, got {value!r}")
    for key, value in overrides.items():
        OPTIMIZER_OVERRIDES[key](config, value)


def build_config(argv: list[str]):
    from torchtitan.config import ConfigManager

    from training import assets, cpu, presets

    preset, rest = split_args(argv)
    if preset not in presets.PRESETS:
        raise StartError(f"unknown preset {preset!r}; known presets: {', '.join(presets.PRESETS)}")
    config = ConfigManager().parse_args(["--module", "training.presets", "--config", presets.PRESETS[preset].__name__, *rest])
    config.metrics.log_freq = 1  # the supervisor needs every step's loss
    validate(config)
    apply_optimizer_overrides(config)
    cpu.adapt_config(config)
    if config.dataloader.dataset_path is None or config.hf_assets_path == "./tests/assets/tokenizer":
        a = assets.ensure_assets()
        config.hf_assets_path = str(a.tokenizer_dir)
        config.dataloader.dataset_path = str(a.corpus_dir)
    return config


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the supervisor's hang stack dump
    if argv[:1] == ["--spare"]:  # a warm spare (training/spare.py): import, then wait for the launch
        from training import spare

        try:
            launched = spare.park(argv[1:])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if launched is None:
            return spare.DISCARDED
        argv = launched
    from training import cpu

    cpu.enable()
    import torch
    from torchtitan.tools.logging import init_logger

    init_logger()
    try:
        config = build_config(argv)
    except (StartError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = config.build()
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported exactly as the interpreter would, then exit 1
        # torch.distributed's excepthook tags each line `[rankN]: ` (the launcher finds the rank's
        # error by it). Exiting here, not through interpreter finalization, matters on this path
        # too: a rank that died of an exception (an OOM) while its peers were blocked in a
        # collective sat in finalization for ~8 s under load, long enough for the hang detector to
        # kill it before its death was seen (the OOM drill, 2026-12-01).
        sys.excepthook(*sys.exc_info())
        code = 1
    # Everything is flushed and closed by now (spool, telemetry, checkpoints, process group).
    # Skip interpreter finalization: a C++ worker thread torn down by static destructors there
    # once aborted a finished rank with "terminate called without an active exception".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
