"""A torchtitan Trainer that reports every step to the supervisor and obeys its directives.

What it adds to torchtitan's loop, each at a step boundary and identically on every rank:
- a StepRecord per step (rank 0) and a heartbeat per rank, sent off the training thread
  (``training.telemetry``); per-rank step times are gathered to rank 0 every K steps;
- directives from the supervisor, taken by rank 0 and broadcast so every rank applies the
  same ones before the same step: ``set_lr_scale``, ``skip_updates``, ``checkpoint_now``,
  ``rollback`` (in-process: reload the DCP checkpoint, restore LR schedule and dataloader
  state, drain the bad batches), ``stop``, ``set_checkpoint_interval``, ``decay_now``, ``extend``;
- a guard: a non-finite loss or grad norm, or a grad norm above a bound, skips the optimizer
  update instead of crashing (torchtitan raises on a non-finite loss), and the record says so;
- a rollback or start checkpoint is refused unless valid by `supervisor.dcp` (the catalog's rule).

No fork of torchtitan's loop: upstream's ``Trainer.train`` runs as is (profiler, validator, PG
timeouts) and is entered through its extension points: ``batch_generator``,
``should_continue_training`` (the step boundary), ``train_step``, ``forward_backward_step``, an
``OptimizersContainer`` subclass (skips the update) and a ``CheckpointManager`` subclass (saves
when the trainer says; its async saves refill CPU twins on the step and write on a thread:
``training.snapshot``), built by upstream's builders; a ``BaseLogger`` receives the step metrics.
Nothing in torchtitan is patched.
- start options: checkpoint step to load, batches to skip after loading, LR scale.

Invariant for rollback: a hot rollback to step C skipping K batches and a cold start with
``load_step=C, skip_batches=K`` run the same code path after the load (``_after_load``), so
they produce the same losses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.components.checkpointer.base import MODEL
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.metrics import BaseLogger, LoggerContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from supervisor import dcp
from supervisor.protocol import Directive
from training import cpu, ft
from training.data import DataPosition, GlobalOrderDataLoader
from training.faults import FaultPlan
from training.schedule import LrScale, WSDSchedule
from training.snapshot import ModelView, StateSnapshot, Unpairable
from training.telemetry import TelemetryClient, TelemetryConfig


@dataclass(kw_only=True, slots=True)
class SupervisionConfig:
    url: str = ""
    """Supervisor base URL (http://127.0.0.1:PORT). Empty: run unsupervised (spool only)."""
    run_id: str = "local"
    generation: int = 0
    spool: str = ""
    """JSON-lines spool of every record and event (rank 0). Default: <dump_folder>/telemetry/spool.jsonl"""
    skip_batches: int = 0
    """Dataloader batches to drain after loading the start checkpoint (skips a bad data window)."""
    lr_scale: float = 1.0
    lr_ramp_steps: int = 0
    """Re-warm: ramp the LR scale from 0 to lr_scale over this many steps after start."""
    skip_grad_norm_above: float = 0.0
    """Skip the update when the pre-clip grad norm exceeds this (0: only non-finite skips)."""
    gather_every: int = 10
    """Gather per-rank step times to rank 0 every this many steps (straggler detection)."""
    heartbeat_s: float = 1.0
    queue_size: int = 4096
    optimizer: str = ""
    """JSON overrides of the preset's AdamW settings, e.g. '{"eps": 1e-3, "lr": 4e-4}'
    (keys: lr, eps, beta1, beta2, weight_decay, warmup_steps). The daemon passes its [optimizer] table."""
    trace: bool = False
    """Write <dump>/telemetry/rank-<r>.jsonl per rank (LR, param checksum, Adam step) for drills/tests."""
    faults: str = ""
    """Fault injection for drills (see training.faults), e.g. 'spike@30:lr=1000,crash@60:rank=1'."""
    fault_state: str = ""
    """Folder of the fired faults' markers. Default: <dump_folder>/faults (torchft mode: the run's, shared by every group)."""
    sample_log: bool = True
    """With the global data order (`training.data`): write <dump>/samples/rank-<r>.jsonl, one line per
    microbatch trained on (step, generation, DP degree, [global sample index, token digest] per row)."""
    async_snapshot: bool = True
    """With --checkpoint.async_mode async: the step only refills CPU twins of the state kept across
    saves and a background thread runs the whole DCP save (training.snapshot). False: torchtitan's
    own async path (state dicts rebuilt, gc.collect and a fresh staging copy on every save's step)."""


class GuardedOptimizers(OptimizersContainer):
    """torchtitan's optimizer container (subclassed, as its docstring invites) whose ``step``
    does nothing while the trainer's guard names a reason to skip this update. The LR schedule
    still advances; Adam's step count and the parameters do not."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.skip_reason: Callable[[], str | None] = lambda: None
        self.skipped = 0

    def step(self, closure=None):
        if self.skip_reason() is not None:
            self.skipped += 1
            return None
        return super().step(closure)


class OnDemandCheckpointer(CheckpointManager):
    """torchtitan's DCP checkpointer that saves only when the trainer asks (`save_now`).

    Upstream's loop calls ``save(step, last_step=...)`` after every step; the trainer decides
    instead (its interval changes at runtime, a directive can force a save, the run's length
    changes with ``extend``/``decay_now``), so that call is a no-op, through the
    ``_should_save`` hook torchtitan's checkpointers are meant to override."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    snapshot_saves = True
    """With async_mode 'async': save through `training.snapshot` (see `_save`); the
    trainer sets it from ``--supervision.async_snapshot``."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._requested = False
        self._snapshot = StateSnapshot()
        self._view: ModelView | None = None
        self._mesh = None  # torchtitan's async gloo group as a 1-D mesh (ModelView's all-gathers)
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: str | None = None  # the folder the async save in flight writes

    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        return self._requested and not last_step and super()._should_save(curr_step, True)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        """With async_mode 'async' (and ``snapshot_saves``): the step waits for the previous write
        (the twins are reused), refills the twins (``training.snapshot``), re-derives the hook-made
        model tensors from them, and hands the result to the writer thread, which runs ``dcp.save``
        (planning, collectives on torchtitan's async gloo group, files, ``.metadata`` last)."""
        if not self._should_save(curr_step, last_step):
            return False
        # the previous write is awaited before this one is named in flight: a failure of *that*
        # write is judged by *its* folder (upstream's _save waits again, a no-op by then)
        self.maybe_wait_for_saving()
        self._inflight = self._create_checkpoint_id(curr_step)
        if self.async_mode != AsyncMode.ASYNC or not self.snapshot_saves or last_step:
            return super()._save(curr_step, last_step)
        begin, builds = time.perf_counter(), self._snapshot.builds
        try:
            staged = self._snapshot.take(self._live_state())
        except Unpairable as e:
            logger.warning(f"async snapshot saves off for this run ({e}): torchtitan's async path instead")
            self.snapshot_saves = False
            return super()._save(curr_step, last_step)
        self._view.refresh()
        if self._snapshot.builds != builds:
            logger.info(f"async snapshot: CPU twins built ({self._snapshot.nbytes / 2**20:.1f} MiB, "
                        f"{len(self._view.shadows)} re-derived submodules) in {time.perf_counter() - begin:.2f}s; "
                        "later saves refill them")
        # the hook-made tensors (fused QKV split out of an all-gathered wqkv) are derived here, on
        # the step: run on the writer thread, their DTensor ops raced the step's forward and
        # crashed it once ("aten.mm got mixed torch.Tensor and DTensor", 2 ranks, preset small,
        # a save every 5 steps): DTensor's dispatcher keeps process-wide state
        staged.update(self._view.derive())
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.save_future = self._writer.submit(self._write, staged, self._create_checkpoint_id(curr_step))
        self._purge_stale_checkpoints()
        return True

    def _wait_for_saving(self) -> None:
        """Await the async save in flight. One whose folder is gone failed because the supervisor
        moved it aside meanwhile (a rollback quarantines the checkpoints newer than its target,
        and one of them was still being written): that checkpoint was being discarded anyway, so
        the failure is logged, not raised; it had crashed the trainer at the rollback's own wait
        (FileNotFoundError on the folder's shard; torchft mode, a save every 5 steps). Any other
        failure is raised: crash-only, the restart is the recovery."""
        try:
            super()._wait_for_saving()
        except (Exception, torch_dcp.api.CheckpointException) as e:  # dcp's is a BaseException
            self.save_future = None
            folder, self._inflight = self._inflight, None
            if folder is None or Path(folder).exists():
                raise
            logger.warning(f"the async save to {folder} failed after its folder was moved aside "
                           f"(a rollback's quarantine): {type(e).__name__}")

    def _write(self, staged: dict[str, Any], checkpoint_id: str) -> None:
        """On the writer thread: planning, collectives on the async group, files, metadata last."""
        torch_dcp.save(staged, checkpoint_id=checkpoint_id, process_group=self.pg)

    def _live_state(self) -> dict[str, Any]:
        """What torchtitan's async save stages (``_flattened_model_states_sd`` with every
        ``Stateful`` turned into its state dict), the model's part read through a ``ModelView``
        built once (a load replaces the ModelWrapper's cache, and the view is rebuilt)."""
        model = self.states[MODEL]
        if self._view is None or model.cached_state_dict is not self._view.state_dict:
            self._view = ModelView(model.model, model.state_dict(), self._async_mesh)
        sd = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in self.states.items() if k != MODEL}
        sd.update(self._view.direct)
        return sd

    def _async_mesh(self):
        if self._mesh is None:
            self._mesh = DeviceMesh.from_group(self.pg, "cpu")
        return self._mesh

    def _load(self, step: int = -1) -> bool:
        self.invalidate_snapshot()
        return super()._load(step)

    def invalidate_snapshot(self) -> None:
        """Live tensors may have been replaced (a load, a heal): pair the twins afresh at the next save."""
        self._snapshot.invalidate()
        self._view = None

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        super()._close()

    def save_now(self, step: int) -> bool:
        self._requested = True
        try:
            return self.save(step, last_step=False)
        finally:
            self._requested = False


class _StepMetrics(BaseLogger):
    """Receives the metrics dict torchtitan's MetricsProcessor builds each logged step."""

    def __init__(self) -> None:
        self.loss = float("nan")
        self.tokens_seen = 0

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "loss_metrics/global_avg_loss" in metrics:
            self.loss = float(metrics["loss_metrics/global_avg_loss"])
        if "n_tokens_seen" in metrics:
            self.tokens_seen = int(metrics["n_tokens_seen"])


class _Feed:
    """The data iterator upstream's loop holds: reads whichever batch stream is current, so a
    hot rollback can reposition the data without upstream's loop knowing."""

    def __init__(self, trainer: "SupervisedTrainer") -> None:
        self.trainer = trainer

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self):
        return next(self.trainer.batches)


def _as_config(cls: type, cfg: Any) -> Any:
    """Copy a torchtitan component Config into the same-shaped Config of our subclass."""
    if isinstance(cfg, cls):
        return cfg
    if type(cfg) is not cls.__mro__[1]:
        raise ValueError(f"{type(cfg).__qualname__} is not supported here; expected {cls.__mro__[1].__qualname__}")
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init})


class SupervisedTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
        fault_tolerance: ft.ReplicaConfig = field(default_factory=ft.ReplicaConfig)
        """torchft replica groups (training.ft); off unless the supervisor's torchft mode launches us."""

    def __init__(self, config: Config):
        # Our component subclasses are built by upstream's own builders from these configs.
        config.optimizer = _as_config(GuardedOptimizers.Config, config.optimizer)
        config.checkpoint = _as_config(OnDemandCheckpointer.Config, config.checkpoint)
        config.dataloader = ft.sharded_dataloader_config(config.fault_tolerance, config.dataloader)
        super().__init__(config)
        self._ft: ft.ReplicaSync | None = None  # created at the first step (training.ft)
        self._ft_lead_pending = False  # a leading directive was applied: lead at the next quorum
        self._loaded_step = 0  # the checkpoint step this trajectory was last loaded from
        self._loads = 0  # hot rollbacks applied (a peer heals from a leader with more: it rolled back)
        # torchft mode: a heal from a leader that rolled back before every checkpoint of ours
        # replays our shard from here (training/ft.py)
        self._data_origin = copy.deepcopy(self.dataloader.state_dict()) if config.fault_tolerance.enable else None
        sup = config.supervision
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # Across replica groups (torchft mode) faults and heartbeats name the global rank: a spec's
        # rank=1 is group 1's rank 0 with one rank per group; job-wide faults hit every group.
        self.global_rank = ft.global_rank(config.fault_tolerance, self.rank, self.world)
        # Under plain torchrun (no supervisor) its restart count is the generation of the faults.
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.faults = FaultPlan(sup.faults, self.global_rank, sup.generation + restarts,
                                state_dir=Path(sup.fault_state or Path(config.dump_folder) / "faults"),
                                batches_per_step=self.gradient_accumulation_steps
                                * getattr(self, "num_pipeline_parallel_microbatches", 1))

        ls = config.lr_scheduler
        total = ls.total_steps or config.training.steps
        decay = total - ls.warmup_steps if ls.decay_ratio is None else round(total * ls.decay_ratio)
        self.schedule = WSDSchedule(
            warmup_steps=ls.warmup_steps, total_steps=config.training.steps,
            decay_steps=max(0, min(decay, total - ls.warmup_steps)), decay_type=ls.decay_type,
            min_lr_factor=ls.min_lr_factor or 0.0,
        )
        self.lr_scale = LrScale(target=sup.lr_scale, start=sup.lr_scale)
        for sched in self.lr_schedulers:
            sched.lr_lambdas = [self._lr_lambda for _ in sched.lr_lambdas]
        self._sync_param_group_lrs()

        self.ckpt_interval = config.checkpoint.interval
        self.checkpointer.snapshot_saves = sup.async_snapshot
        self.batches_consumed = 0
        self.batches = None  # the current batch stream (`_Feed` reads it); set after the load
        self._microbatches = 0
        self._skip_updates = 0
        self._skip_reason: str | None = None
        self._grad_norm = float("nan")
        self._applied: dict[str, tuple[bool, str]] = {}  # directive id -> (ok, detail) of its first answer
        self._stop_reason: str | None = None
        self._finished = False  # "finished" sent (once)
        self._last_saved_step = -1
        self.optimizers.skip_reason = lambda: self._skip_reason
        self._metrics = _StepMetrics()
        mp = self.metrics_processor
        if not isinstance(mp.logger, LoggerContainer):
            container = LoggerContainer()
            container.add_logger(mp.logger)
            mp.logger = container
        mp.logger.add_logger(self._metrics)
        self.global_data = isinstance(self.dataloader, GlobalOrderDataLoader)
        self._legacy_load = False  # loading a checkpoint written before the global data position
        self._draining = False
        self._sample_log = None
        if self.global_data and sup.sample_log:
            sdir = Path(config.dump_folder) / "samples"
            sdir.mkdir(parents=True, exist_ok=True)
            self._sample_log = open(sdir / f"rank-{self.rank}.jsonl", "a", buffering=1)
        self._trace = None
        if sup.trace:
            tdir = Path(config.dump_folder) / "telemetry"
            tdir.mkdir(parents=True, exist_ok=True)
            self._trace = open(tdir / f"rank-{self.rank}.jsonl", "a", buffering=1)

        spool = sup.spool or os.path.join(config.dump_folder, "telemetry", "spool.jsonl")
        self.telemetry = TelemetryClient(TelemetryConfig(
            url=sup.url, run_id=sup.run_id, generation=sup.generation, rank=self.global_rank,
            spool_path=spool if self.rank == 0 else "", heartbeat_s=sup.heartbeat_s,
            queue_size=sup.queue_size,
        ))

    @property
    def updates_skipped(self) -> int:
        return self.optimizers.skipped

    # --- hooks into torchtitan's step ------------------------------------------------------
    def _lr_lambda(self, last_epoch: int) -> float:
        step = last_epoch + 1  # LambdaLR's epoch e sets the LR used by step e + 1
        return self.schedule.factor(step) * self.lr_scale.value(step) * self.faults.lr_factor(step)

    def _sync_param_group_lrs(self) -> None:
        """Make the optimizer's LRs what the schedule says for the next step (after a load, or
        a scale change) instead of what the checkpoint or the last scheduler step left there."""
        for sched in self.lr_schedulers:
            lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs

    def forward_backward_step(self, **kwargs):
        """Upstream's fwd/bwd, plus: after the step's last microbatch the gradients are complete,
        which is where a drill's NaN is injected and the pre-clip norm measured."""
        loss = super().forward_backward_step(**kwargs)
        self._microbatches += 1
        if self._microbatches >= self.gradient_accumulation_steps:
            self._microbatches = 0
            self._on_gradients()
        return loss

    def _on_gradients(self) -> None:
        params = [p for m in self.model_parts for p in m.parameters()]
        if self.faults.nan_now(self.batches_consumed):
            for p in params:
                if p.grad is not None:
                    getattr(p.grad, "_local_tensor", p.grad).view(-1)[0] = float("nan")
                    break
        if self._ft is not None:
            self._ft.average_gradients(params)
        # Mirrors the clip call of torchtitan 0.3.0 trainer.py:940-946 (Trainer.train_step) with
        # max_norm=inf (scales by 1.0): the same reduced pre-clip norm upstream computes next, but
        # the guard needs it before upstream's optimizer step, and upstream has no hook between
        # its clip and that step. Cost: one extra norm reduction per step.
        pd = self.parallel_dims
        norm = dist_utils.clip_grad_norm_(params, float("inf"), foreach=True,
                                          pp_mesh=pd.get_optional_mesh("pp"), ep_enabled=pd.ep_enabled)
        self._after_grad_norm(float(norm.item()), guard=not self.faults.nan_update_applied())
        if self._ft is not None and not self._ft.commit():
            self._skip_reason = "ft_uncommitted"  # a peer failed mid-step: undone in train_step

    def _after_grad_norm(self, norm: float, guard: bool = True) -> None:
        """Decide, identically on every rank (the norm is already reduced), whether to skip.
        ``guard=False`` (drills only: ``nan@N:applied=1``) lets a non-finite update through."""
        self._grad_norm = norm
        bound = self.config.supervision.skip_grad_norm_above
        if not math.isfinite(norm) and guard:
            self._skip_reason = "non_finite_grad_norm"
        elif bound > 0 and norm > bound:
            self._skip_reason = f"grad_norm_above_{bound:g}"
        elif self._skip_updates > 0:
            self._skip_reason = "directive"
            self._skip_updates -= 1
        else:
            self._skip_reason = None

    def _raw_batches(self):
        for input_dict, labels in super().batch_generator(self.dataloader):
            self.batches_consumed += 1
            if self._sample_log is not None and not self._draining:
                self._log_samples()
            frac = self.faults.badbatch_fraction(self.batches_consumed) if self.faults.active else 0.0
            if frac > 0.0:
                vocab = self.config.model_spec.model.vocab_size
                gen = torch.Generator().manual_seed(self.batches_consumed)
                rows = max(1, round(frac * labels.shape[0]))
                tokens = input_dict["input"].clone()
                tokens[:rows] = torch.randint(0, vocab, tokens[:rows].shape, generator=gen)
                labels = labels.clone()
                labels[:rows] = torch.randint(0, vocab, labels[:rows].shape, generator=gen)
                input_dict = dict(input_dict, input=tokens)
            yield input_dict, labels

    def _log_samples(self) -> None:
        import json

        self._sample_log.write(json.dumps({
            "step": self.step, "generation": self.config.supervision.generation, "dp": self._dp_degree(),
            "ids": [[g, digest] for g, digest in self.dataloader.last_ids],
        }) + "\n")

    @property
    def batches_per_step(self) -> int:
        """Dataloader batches one optimizer step takes per rank (gradient accumulation x PP microbatches):
        the unit of a data skip (`skip_batches`)."""
        return self.gradient_accumulation_steps * self.num_pipeline_parallel_microbatches

    # --- train state that rides in every checkpoint ----------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["batches_consumed"] = self.batches_consumed
        sd["wsd"] = self.schedule.state_dict()
        if self.global_data and not self._legacy_load:
            # The same on every rank at a step boundary: one copy, read back at any DP degree.
            sd["data_position"] = self.dataloader.position.to_state()
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.batches_consumed = int(state_dict.get("batches_consumed", 0))
        if "wsd" in state_dict:
            self.schedule.load_state_dict(state_dict["wsd"])
        if self.global_data and "data_position" in state_dict:
            self.dataloader.seek(DataPosition.from_state(state_dict["data_position"]))

    # --- the loop: upstream's Trainer.train, entered through its hooks ---------------------
    def train(self):
        """Upstream's loop (checkpoint load, profiler, validator, PG timeouts) with our hooks:
        `batch_generator` (start tail), `should_continue_training` (directives), `train_step`
        (faults, timing, guard, save, report)."""
        self._set_phase("loading")
        self._check_legacy(self.config.checkpoint.load_step)
        super().train()
        self._finish()  # the loop ended without asking (the data ran out)

    def _finish(self) -> None:
        """Save the last step and tell the daemon the run ended — once, and before upstream's
        loop makes rank 0 sleep 2 s while the other ranks already exit (a daemon that saw rank 1
        go without a "finished" would take it for a dead rank)."""
        if self._finished:
            return
        self._finished = True
        self._set_phase("finishing")
        if self.checkpointer.enable and self._last_saved_step != self.step:
            self._maybe_save(force=True)
        self.checkpointer.maybe_wait_for_saving()  # an async save must be on disk before "finished"
        if self._ft is not None:
            self.ft_event({"kind": "ft_finished", "step": self.step, "param_digest": self.param_digest(),
                           "heals": self._ft.heals, "uncommitted": self._ft.uncommitted})
        self._event({"kind": "finished", "step": self.step, "reason": self._stop_reason or "completed"})
        logger.info(f"Training finished at step {self.step} ({self._stop_reason or 'completed'})")

    def _check_legacy(self, step: int) -> None:
        """Before loading step-N: a checkpoint written before the global data position (no
        ``train_state.data_position``) loads without it; the data then starts from sample 0 of
        the global order (the old per-rank order cannot be mapped onto it), with a warning."""
        from torch.distributed.checkpoint import FileSystemReader

        self._legacy_load = False
        path = self._checkpoint_dir(step) if step >= 0 else None
        if not self.global_data or path is None or not (path / ".metadata").is_file():
            return
        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if not any(k.startswith("train_state.data_position.") for k in keys):
            self._legacy_load = True
            logger.warning(f"checkpoint {path} predates the global data position: the data restarts from "
                           "sample 0 of the global order")

    def batch_generator(self, data_iterable):
        """Upstream's train() calls this once, right after loading the start checkpoint: the
        common tail of a cold start (skip K batches, LR scale) runs here, and the iterator
        returned follows `self.batches`, which a hot rollback replaces."""
        sup = self.config.supervision
        self._legacy_load = False  # loaded: every later save carries the position
        self.batches = self._after_load(sup.skip_batches, sup.lr_scale, sup.lr_ramp_steps)
        self._loaded_step = self.step
        self._last_saved_step = self.step
        self.telemetry.last_step = self.step
        self._event({"kind": "started", "step": self.step, "skip_batches": sup.skip_batches,
                     "lr_scale": sup.lr_scale, "world_size": self.world, "dp_degree": self._dp_degree(),
                     "batches_per_step": self.batches_per_step, "samples_consumed": self.samples_consumed})
        logger.info(f"Supervised training starts at step {self.step + 1} (generation {sup.generation})")
        return _Feed(self)

    def should_continue_training(self) -> bool:
        """Upstream's loop asks this before each ``self.step += 1``: the step boundary, where
        every rank applies the same directives (rank 0 broadcasts them)."""
        if self.batches is not None and self._stop_reason is None:
            self._apply_directives()
        more = self.step < self.schedule.total_steps and self._stop_reason is None
        if not more and self.batches is not None:
            self._finish()  # every rank is here at the same boundary: the final save is collective
        return more

    def train_step(self, data_iterator):
        own_start = time.perf_counter()
        self._set_phase("between_steps")
        self.faults.before_step(self.step, on_phase=self._set_phase)
        if self.config.fault_tolerance.enable:
            self._ft_begin_step()
        if self.faults.lr_factor(self.step) != 1.0 or self.faults.lr_factor(self.step - 1) != 1.0:
            self._sync_param_group_lrs()
        lr = self.optimizers.optimizers[0].param_groups[0]["lr"]
        self._set_phase("train_step")
        own_seconds = time.perf_counter() - own_start
        if self._gather_step():
            # Straggler sample: a rank's own time excludes waiting for the slowest rank.
            # Ranks wait at this barrier instead of inside the step's collectives.
            dist.barrier()
        self._metrics.loss = float("nan")
        start = time.perf_counter()
        try:
            super().train_step(data_iterator)
        except DataloaderExhaustedError:
            self.step -= 1  # upstream's loop stops; the canceled step is not counted
            raise
        except RuntimeError as e:
            if "Loss is not finite" not in str(e):
                raise
            # the guard already skipped the update; the loss stays NaN in the record
        step_seconds = time.perf_counter() - start
        if self._skip_reason == "ft_uncommitted":
            self._ft_undo_step()
            return
        self._set_phase("reporting")
        self._maybe_save(force=False)
        self._report(lr, step_seconds, own_seconds + step_seconds)
        if self._trace is not None:
            self._write_trace(lr)

    @property
    def samples_consumed(self) -> int:
        if self.global_data:
            return self.dataloader.position.sample  # global, whatever the DP degree was
        return self.batches_consumed * self.config.training.local_batch_size * self._dp_degree()

    def _dp_degree(self) -> int:
        pd = self.parallel_dims
        return pd.get_mesh("batch").size() if pd.dp_enabled else 1

    def _set_phase(self, phase: str) -> None:
        self.telemetry.phase = phase

    def _after_load(self, skip_batches: int, lr_scale: float, ramp_steps: int):
        """Common tail of a cold start and a hot rollback: fresh batch stream positioned by the
        loaded dataloader state, K batches drained, LR scale set, optimizer LRs re-synced."""
        self._microbatches = 0
        data = self._raw_batches()
        self._draining = True  # drained batches are skipped, not trained on: not in the sample log
        try:
            for _ in range(skip_batches):
                next(data)
        finally:
            self._draining = False
        start = 0.0 if ramp_steps > 0 else lr_scale
        self.lr_scale.set(lr_scale, ramp_steps, at_step=self.step, start=start)
        self._sync_param_group_lrs()
        return data

    def _maybe_save(self, force: bool) -> None:
        if not self.checkpointer.enable:
            return
        if not force and (self.ckpt_interval <= 0 or self.step % self.ckpt_interval != 0):
            return
        self._set_phase("checkpoint")
        self._move_aside_existing(self.step)
        begin = time.perf_counter()
        self.checkpointer.save_now(self.step)
        self._last_saved_step = self.step
        # `seconds` is how long training was blocked: the whole save when synchronous; with
        # --checkpoint.async_mode the staging copy (and any wait for the previous save) only,
        # while the files are written in the background. The daemon's catalog judges the files
        # themselves (valid once .metadata and every shard are complete); the interval advisor
        # takes this stall as the save cost C.
        self._event({"kind": "checkpoint_saved", "step": self.step, "seconds": time.perf_counter() - begin})

    def _checkpoint_dir(self, step: int) -> Path:
        return Path(self.checkpointer.folder) / f"step-{step}"

    def _move_aside_existing(self, step: int) -> None:
        """Never overwrite a checkpoint: one left over at this step (after a rollback the
        supervisor had not yet quarantined) moves to the quarantine folder first."""
        path = self._checkpoint_dir(step)
        if self.rank == 0 and path.exists():
            qdir = Path(self.checkpointer.folder).parent / "quarantine"
            qdir.mkdir(parents=True, exist_ok=True)
            path.rename(qdir / f"step-{step}.superseded-{int(time.time() * 1000)}")
        if dist.is_initialized():
            dist.barrier()

    # --- torchft replica groups (training.ft) -----------------------------------------------
    def _ft_begin_step(self) -> None:
        if self._ft is None:  # as late as possible: peers wait for a joining group's first quorum
            self._ft = ft.ReplicaSync(self.config.fault_tolerance, self, completed_steps=self.step - 1)
        if self._ft_lead_pending:  # a leading directive was applied at this boundary
            self._ft.lead()
            self._ft_lead_pending = False
        self._ft.begin_step()

    def shared_state(self) -> dict:
        """What a healing peer takes from this group besides model, optimizer, LR schedule and train
        state: the supervisor's LR scale, pending update skips, the checkpoint interval, and the
        checkpoint step this trajectory was last loaded from (where a peer's data rewinds to)."""
        return {"lr_scale": dataclasses.asdict(self.lr_scale), "skip_updates": self._skip_updates,
                "ckpt_interval": self.ckpt_interval, "loaded_step": self._loaded_step, "loads": self._loads}

    def load_shared_state(self, sd: dict) -> None:
        if "lr_scale" in sd:
            for k, v in sd["lr_scale"].items():
                setattr(self.lr_scale, k, v)
        self._skip_updates = int(sd.get("skip_updates", self._skip_updates))
        self.ckpt_interval = int(sd.get("ckpt_interval", self.ckpt_interval))
        if sd.get("loads", self._loads) != self._loads:
            # the leader loaded a checkpoint since our last heal (a rollback): a drill's transient
            # faults do not fire again on the replayed steps, here as in the leader
            self.faults.clear_transient()
            self._loads = int(sd["loads"])
        self._loaded_step = int(sd.get("loaded_step", self._loaded_step))

    def rewind_data(self, loaded_step: int) -> str:
        """Put this rank's batch stream at or before a position it already passed (a heal from a
        leader that rolled back): the group's own newest valid checkpoint at or before the
        leader's loaded step (a data position is a batch count on this group's own shard, whatever
        trajectory saved it), else the start of the data. The heal then loads the leader's state
        over the checkpoint's and drains forward to the leader's count. Returns where it went."""
        folder = Path(self.checkpointer.folder)
        best = None
        if self.checkpointer.enable:
            self.checkpointer.maybe_wait_for_saving()
            best = self._from_rank0(lambda: max(
                (s for s, path in dcp.step_folders(folder) if s <= loaded_step and dcp.check_folder(path).valid),
                default=None))
        if best is not None:
            self.checkpointer.load(step=best)
            where = f"step-{best}"
        else:
            self.dataloader.load_state_dict(copy.deepcopy(self._data_origin))
            self.batches_consumed = 0
            where = "the start of the data"
        self.batches = self._raw_batches()
        return where

    def _ft_undo_step(self) -> None:
        """A step the groups did not commit did not happen: its number and LR step are reused,
        its batch is dropped (torchft's rule)."""
        self.step -= 1
        for sched in self.lr_schedulers.schedulers:
            sched.last_epoch -= 1
        self._sync_param_group_lrs()
        self.ft_event({"kind": "ft_uncommitted", "step": self.step + 1})

    def advance_data_to(self, batches: int) -> int:
        """Drain this rank's batch stream until ``batches`` were consumed (a heal: a peer says
        how far the run's data is). Returns how many were drained."""
        drained = 0
        while self.batches_consumed < batches:
            next(self.batches)
            drained += 1
        return drained

    def after_heal(self) -> None:
        if self.checkpointer.enable:
            self.checkpointer.invalidate_snapshot()  # the heal replaced the optimizer's state tensors
        self._microbatches = 0
        self._last_saved_step = self.step - 1
        self._sync_param_group_lrs()

    def param_digest(self) -> str:
        """sha256 of every parameter's bytes in name order: equal digests, identical parameters."""
        import hashlib

        h = hashlib.sha256()
        with torch.no_grad():
            for m in self.model_parts:
                for name, p in sorted(m.named_parameters()):
                    h.update(name.encode())
                    h.update(getattr(p, "_local_tensor", p).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def ft_event(self, ev: dict) -> None:
        """torchft events go to ``<dump>/telemetry/ft.jsonl`` (rank 0), not to the daemon's wire."""
        if self.rank != 0:
            return
        import json

        tdir = Path(self.config.dump_folder) / "telemetry"
        tdir.mkdir(parents=True, exist_ok=True)
        with open(tdir / "ft.jsonl", "a") as f:
            f.write(json.dumps(dict(ev, wall_time=time.time(), replica_id=self.config.fault_tolerance.replica_id)) + "\n")

    # --- reporting -------------------------------------------------------------------------
    def _event(self, ev: dict) -> None:
        if self.rank == 0:
            ev.setdefault("wall_time", time.time())
            self.telemetry.event(ev)

    def _gather_step(self) -> bool:
        every = self.config.supervision.gather_every
        return every > 0 and self.world > 1 and self.step % every == 0

    def _report(self, lr: float, step_seconds: float, own_seconds: float) -> None:
        sup = self.config.supervision
        self.telemetry.last_step = self.step
        rank_times = None
        if self._gather_step():
            local = torch.tensor([own_seconds], dtype=torch.float64, device=self.device)
            gathered = [torch.zeros_like(local) for _ in range(self.world)]
            dist.all_gather(gathered, local)
            rank_times = [float(t.item()) for t in gathered]
        if self.rank != 0:
            return
        cfg = self.config.training
        global_tokens = cfg.local_batch_size * cfg.seq_len * self._dp_degree() * self.gradient_accumulation_steps
        self.telemetry.record({
            "run_id": sup.run_id, "generation": sup.generation, "step": self.step,
            "loss": self._metrics.loss, "grad_norm": self._grad_norm, "lr": lr,
            "lr_scale": self.lr_scale.value(self.step),
            "tokens_per_s": global_tokens / step_seconds if step_seconds > 0 else 0.0,
            "step_seconds": step_seconds, "peak_mem_gib": cpu.peak_memory_gib(),
            "update_skipped": self._skip_reason is not None, "skip_reason": self._skip_reason,
            "samples_consumed": self.samples_consumed, "tokens_seen": self._metrics.tokens_seen,
            "wall_time": time.time(), "rank_step_seconds": rank_times,
        })

    def _write_trace(self, lr: float) -> None:
        """Per-rank evidence for tests: what this rank's LR, parameters and Adam state are."""
        import json

        with torch.no_grad():
            params = [getattr(p, "_local_tensor", p) for m in self.model_parts for p in m.parameters()]
            checksum = float(sum(p.double().sum() for p in params))
        opt = self.optimizers.optimizers[0]
        adam_steps = [float(st["step"]) for st in opt.state.values() if "step" in st]
        self._trace.write(json.dumps({
            "step": self.step, "pid": os.getpid(), "lr": lr, "param_checksum": checksum,
            "adam_step": max(adam_steps) if adam_steps else 0.0, "update_skipped": self._skip_reason is not None,
            "generation": self.config.supervision.generation,
        }) + "\n")

    # --- directives ------------------------------------------------------------------------
    def _broadcast_directives(self) -> list[dict]:
        mine = self.telemetry.take_directives() if self.rank == 0 else []
        if self.world == 1:
            return mine
        flag = torch.tensor([len(mine)], dtype=torch.int64, device=self.device)
        dist.broadcast(flag, src=0)
        if int(flag.item()) == 0:
            return []
        box = [mine]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _apply_directives(self) -> None:
        for raw in self._broadcast_directives():
            self._apply_one(raw)

    def _apply_one(self, raw: dict) -> None:
        did = raw.get("id") if isinstance(raw, dict) else None
        try:
            d = Directive.model_validate(raw)
        except Exception as e:  # a malformed directive changes nothing
            msg = f"malformed directive {raw!r}: {e}".replace("\n", "; ")
            logger.error(msg)
            self._ack(str(did or "unknown"), "malformed", ok=False, detail=msg[:2000])
            return
        if d.id in self._applied:  # a resend: the first answer again (a refusal stays a refusal)
            ok, detail = self._applied[d.id]
            self._ack(d.id, d.kind, ok=ok, detail="already applied" if ok else f"already refused: {detail}")
            return
        begin = time.perf_counter()
        try:
            detail = self._execute(d)
            ok = True
        except ValueError as e:
            ok, detail = False, str(e)
            logger.error(f"directive {d.kind} ({d.id}) refused: {detail}")
        self._applied[d.id] = (ok, detail)
        self._ack(d.id, d.kind, ok=ok, detail=detail, seconds=time.perf_counter() - begin)

    def _ack(self, did: str, kind: str, ok: bool, detail: str, seconds: float | None = None) -> None:
        ev = {"kind": "directive_applied", "directive_id": did, "directive": kind,
              "step": self.step, "ok": ok, "detail": detail}
        if seconds is not None:
            ev["seconds"] = round(seconds, 6)  # e.g. a hot rollback's load + drain (bench/goodput.py)
        self._event(ev)

    def _execute(self, d: Directive) -> str:
        """Apply one directive. In torchft mode only replica group 0 hears the daemon: after a
        directive every group must share (`ft.LEADING_DIRECTIVES`) it leads, so the other groups
        heal from it at the next quorum (training/ft.py); any other group refuses one."""
        fto = self.config.fault_tolerance
        leading = fto.enable and d.kind in ft.LEADING_DIRECTIVES
        if leading and fto.replica_id != 0:
            raise ValueError(f"{d.kind} reached replica group {fto.replica_id}: in torchft mode only group 0 takes "
                             "directives (the others heal from it)")
        detail = self._execute_kind(d)
        if leading:
            self._ft_lead_pending = True
            detail += "; the other replica groups heal from group 0 at the next step"
        return detail

    def _execute_kind(self, d: Directive) -> str:
        if d.kind == "set_lr_scale":
            if d.scale is None:
                raise ValueError("set_lr_scale needs scale")
            self.lr_scale.set(d.scale, d.ramp_steps, at_step=self.step)
            self._sync_param_group_lrs()
            return f"lr scale -> {d.scale:g} over {d.ramp_steps} steps"
        if d.kind == "skip_updates":
            if d.n is None:
                raise ValueError("skip_updates needs n")
            self._skip_updates += d.n
            return f"skipping the next {d.n} updates"
        if d.kind == "checkpoint_now":
            if not self.checkpointer.enable:
                raise ValueError("checkpointing is disabled for this run")
            if self._last_saved_step != self.step:
                self._maybe_save(force=True)
            return f"checkpoint at step {self.step}"
        if d.kind == "set_checkpoint_interval":
            if d.n is None:
                raise ValueError("set_checkpoint_interval needs n")
            self.ckpt_interval = d.n
            return f"checkpoint interval -> {d.n} steps"
        if d.kind == "rollback":
            return self._rollback(d)
        if d.kind == "stop":
            self._stop_reason = d.reason or "stopped by supervisor"
            if self.checkpointer.enable and self._last_saved_step != self.step:
                self._maybe_save(force=True)
            return f"stopping at step {self.step}"
        if d.kind == "decay_now":
            self.schedule.decay_now(self.step, d.steps)
            self._sync_param_group_lrs()
            return f"decay starts after step {self.step}, run ends at {self.schedule.total_steps}"
        if d.kind == "extend":
            if d.steps is None:
                raise ValueError("extend needs steps (the new total)")
            self.schedule.extend(d.steps, self.step)
            self._sync_param_group_lrs()
            return f"run extended to {self.schedule.total_steps} steps"
        raise ValueError(f"unknown directive kind {d.kind!r}")

    def _rollback(self, d: Directive) -> str:
        if d.step is None:
            raise ValueError("rollback needs step")
        if d.step > self.step:
            raise ValueError(f"rollback target step {d.step} is ahead of the current step {self.step}")
        self.checkpointer.maybe_wait_for_saving()  # the target may be the async save in flight
        path = self._checkpoint_dir(d.step)
        # Rank 0 judges, every rank obeys: a verdict that differed between ranks would hang them.
        reason = self._from_rank0(lambda: dcp.check_folder(path).reason)
        if reason:
            raise ValueError(f"rollback target step {d.step}: checkpoint {path} is invalid: {reason}")
        self._set_phase("rollback")
        self.faults.clear_transient()
        self._check_legacy(d.step)
        try:
            self.checkpointer.load(step=d.step)
        finally:
            self._legacy_load = False
        scale = d.lr_scale if d.lr_scale is not None else self.lr_scale.target
        self.batches = self._after_load(d.skip_batches, scale, d.ramp_steps if d.lr_scale is not None else 0)
        self._loaded_step = d.step
        self._loads += 1
        self._last_saved_step = self.step
        self.telemetry.last_step = self.step
        return f"rolled back to step {d.step}, skipped {d.skip_batches} batches, lr scale {scale:g}"

    def _from_rank0(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` evaluated on rank 0 and broadcast (a barrier too: every rank waits for it)."""
        box = [fn() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if getattr(self, "_trace", None) is not None:
            self._trace.close()
        if getattr(self, "_sample_log", None) is not None:
            self._sample_log.close()
        if getattr(self, "telemetry", None) is not None:
            self.telemetry.close()
        if getattr(self, "_ft", None) is not None:
            self._ft.shutdown()
        super().close()
