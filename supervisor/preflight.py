"""Preflight: lint a training plan before launch (docs/architecture.md §1, `titan-supervisor preflight`).

Why this exists: the LLM-jp lab lost months to one wrong number (Adam ε = 1e-5, a typo copied
from a paper, ~3× slower convergence than ε = 1e-8), and their fastest parallel layout kept
hitting OOM, so production ran a slower one. Both are cheap to catch before a single GPU-hour
is spent: check the optimizer settings against known-good practice, check every layout in the
run's ordered fallback list for divisibility and for a per-GPU memory estimate, and pick the
first layout that passes. The daemon's "repeated OOM → next safer layout" remedy asks
`next_safer_layout` for where to go next.

Pure logic: no I/O, no clock, no torch. The caller builds a `TrainingPlan` (directly or from a
TOML dict with `plan_from_dict`) and gets `Issue` rows back.

TOML keys read by `plan_from_dict` (unknown keys are rejected, so a typo such as `epsilon`
is an error rather than a silently ignored setting):

    [training]
    model = "llmjp3-1.8b"       # required; a key of supervisor.model_table.ALL_SHAPES
    world_size = 8              # required; total ranks (GPUs, or processes on cpu)
    global_batch = 1024         # required; sequences per optimizer step, all ranks together
    seq_len = 4096              # required; tokens per sequence
    device = "H100"             # required; H100 | H200 | B200 | B300 | A100-80 | cpu
    device_memory_gib = 80.0    # optional override; required when device = "cpu"
    dtype = "bf16"              # optional; bf16 (mixed precision, fp32 master) | fp32

    [optimizer]                 # defaults mirror torchtitan's default AdamW
    name = "AdamW"              # optional; AdamW | Adam (other names: only LR/warmup checks)
    lr = 3e-4                   # required; peak learning rate
    eps = 1e-8                  # optional, default 1e-8
    beta1 = 0.9                 # optional, default 0.9
    beta2 = 0.95                # optional, default 0.95
    weight_decay = 0.1          # optional, default 0.1
    warmup_steps = 2000         # required here, or as [lr_scheduler] warmup_steps

    [[layouts]]                 # one or more, ordered fastest first
    name = "tp8-pp8"            # optional label
    dp = 8                      # required; data-parallel degree (replicate × shard)
    tp = 8                      # optional, default 1; tensor parallel
    pp = 8                      # optional, default 1; pipeline parallel
    cp = 1                      # optional, default 1; context parallel
    dp_shard = -1               # optional, default -1 = FSDP over all of dp; 1 = plain DDP;
                                #   1 < k < dp = HSDP (shard over k, replicate dp / k)
    micro_batch = 1             # required; sequences per forward pass per rank
    activation_checkpointing = "selective"  # optional, default "selective"; none|selective|full
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from supervisor.config_types import (Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositivePairs,
                                     Range, doc)
from supervisor.model_table import ALL_SHAPES, ModelShape

Level = Literal["error", "warning", "info"]
ACMode = Literal["none", "selective", "full"]
Device = Literal["H100", "H200", "B200", "B300", "A100-80", "cpu"]
DType = Literal["bf16", "fp32"]

GIB = 1024**3

# Nominal HBM per device, GiB (the brief's round numbers; cpu has none: pass device_memory_gib).
DEVICE_MEMORY_GIB: dict[str, float] = {
    "H100": 80.0,
    "H200": 141.0,
    "B200": 180.0,
    "B300": 288.0,
    "A100-80": 80.0,
}
DEVICES = (*DEVICE_MEMORY_GIB, "cpu")
AC_MODES = ("none", "selective", "full")
DTYPES = ("bf16", "fp32")
ADAM_NAMES = ("adamw", "adam")

# Peak-LR reference curve: (parameters, peak LR) anchors, interpolated log-linearly in both
# axes and held flat outside the range. These are heuristics from public practice, not laws:
#   125M → 6e-4   GPT-3 Small (Brown et al. 2020), also the usual GPT-2-small recipe
#   8B   → 3e-4   LLM-jp (lab report), Llama-2 7B
#   32B  → 2e-4   LLM-jp (lab report): larger models want a smaller LR
#   175B → 1e-4   between GPT-3 175B (6e-5) and OPT-175B (1.2e-4)
LR_ANCHORS: tuple[tuple[float, float], ...] = (
    (1.25e8, 6e-4),
    (8e9, 3e-4),
    (32e9, 2e-4),
    (175e9, 1e-4),
)


def reference_lr(params: float, anchors: tuple[tuple[float, float], ...] = LR_ANCHORS) -> float:
    """Size-appropriate peak LR for a model with `params` parameters (see LR_ANCHORS)."""
    if params <= anchors[0][0]:
        return anchors[0][1]
    if params >= anchors[-1][0]:
        return anchors[-1][1]
    for (p0, lr0), (p1, lr1) in zip(anchors, anchors[1:]):
        if p0 <= params <= p1:
            f = math.log(params / p0) / math.log(p1 / p0)
            return math.exp(math.log(lr0) + f * (math.log(lr1) - math.log(lr0)))
    raise AssertionError("unreachable")  # pragma: no cover


def model_params(model: ModelShape) -> float:
    """The size used for the LR heuristic: the nominal size if the name promises one."""
    return model.nominal_params if model.nominal_params > 0 else float(model.param_count())


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OptimizerPlan:
    """Peak LR and AdamW settings; defaults mirror torchtitan's default AdamW (and the lab's)."""

    name: str = "AdamW"
    lr: float
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    warmup_steps: int


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One parallel layout. dp × tp × pp × cp must equal the world size.

    dp_shard: the FSDP shard degree inside dp. -1 (default) means FSDP over all of dp
    (torchtitan's `data_parallel_shard_degree = -1`); 1 means plain replication (DDP);
    a divisor k of dp means HSDP: shard over k ranks, replicate dp / k times. As in
    torchtitan, FSDP also shards over cp (the shard mesh is dp_shard × cp).
    """

    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp_shard: int = -1
    micro_batch: int
    activation_checkpointing: ACMode = "selective"
    name: str = ""

    @property
    def shard_degree(self) -> int:
        return self.dp if self.dp_shard == -1 else self.dp_shard

    def label(self) -> str:
        dims = f"dp{self.dp}(shard {self.shard_degree})·tp{self.tp}·pp{self.pp}·cp{self.cp}"
        dims += f" mb{self.micro_batch} ac={self.activation_checkpointing}"
        return f"{self.name} [{dims}]" if self.name else dims


@dataclass(frozen=True)
class TrainingPlan:
    model: ModelShape
    optimizer: OptimizerPlan
    layouts: list[Layout]  # ordered fastest first; later ones are the fallbacks
    world_size: int
    global_batch: int  # sequences per optimizer step
    seq_len: int
    device: Device
    device_memory_gib: float | None = None  # override; required for cpu
    dtype: DType = "bf16"


# --- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    level: Level
    field: str
    value: str
    why: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU peak memory estimate for one layout, GiB (worst pipeline stage)."""

    params_gib: float  # weights as stored for compute (bf16 or fp32), this rank's shard
    grads_gib: float
    optimizer_gib: float  # AdamW m and v, fp32
    master_gib: float  # fp32 master weights (bf16 mixed precision only)
    fsdp_gather_gib: float  # layers FSDP has gathered unsharded (current + prefetched)
    activations_gib: float
    logits_gib: float
    overhead_gib: float  # allocator fragmentation, CUDA context, NCCL buffers
    total_gib: float
    capacity_gib: float
    usable_gib: float
    stage: str  # which pipeline stage is the worst: "first", "last" or "only"

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.usable_gib

    def breakdown(self) -> str:
        return (
            f"params {self.params_gib:.1f} + grads {self.grads_gib:.1f} + adam {self.optimizer_gib:.1f}"
            f" + master {self.master_gib:.1f} + fsdp-gather {self.fsdp_gather_gib:.1f}"
            f" + activations {self.activations_gib:.1f} + logits {self.logits_gib:.1f}"
            f" + overhead {self.overhead_gib:.1f} = {self.total_gib:.1f} GiB"
            f" ({self.stage} stage) vs usable {self.usable_gib:.1f} of {self.capacity_gib:.0f} GiB"
        )


@dataclass
class PreflightReport:
    issues: list[Issue]  # plan-wide: optimizer, plan fields, the layout list as a whole
    chosen_layout_index: int | None
    layout_issues: list[list[Issue]] = field(default_factory=list)
    memory: list[MemoryEstimate | None] = field(default_factory=list)
    layout_labels: list[str] = field(default_factory=list)

    def all_issues(self) -> list[Issue]:
        return [*self.issues, *(i for per in self.layout_issues for i in per)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": exit_code(self) == 0,
            "chosen_layout_index": self.chosen_layout_index,
            "issues": [i.to_dict() for i in self.issues],
            "layouts": [
                {
                    "index": n,
                    "label": self.layout_labels[n] if n < len(self.layout_labels) else "",
                    "valid": not _has_error(per),
                    "issues": [i.to_dict() for i in per],
                    "memory_gib": asdict(self.memory[n]) if n < len(self.memory) and self.memory[n] else None,
                }
                for n, per in enumerate(self.layout_issues)
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def _has_error(issues: list[Issue]) -> bool:
    return any(i.level == "error" for i in issues)


def _g(x: float) -> str:
    return f"{x:g}"


# --- the checks ---------------------------------------------------------------------------


class Preflight:
    """The rules, with their thresholds in one `Config` (the settings' `[preflight.thresholds]`)."""

    @dataclass
    class Config:
        eps_max: Annotated[PositiveFloat, doc(
            "Adam eps above this is an error: it dominates Adam's denominator in large models")] = 1e-6
        beta2_range: Annotated[Range, doc(
            "[low, high]: Adam beta2 outside it is a warning")] = (0.9, 0.999)
        weight_decay_range: Annotated[Range, doc(
            "[low, high]: weight decay outside it is a warning")] = (0.0, 0.3)
        lr_high_factor: Annotated[PositiveFloat, doc(
            "warn when the peak LR > this x the size-appropriate reference ...")] = 3.0
        lr_low_factor: Annotated[PositiveFloat, doc("... or < this x the reference")] = 0.1
        lr_anchors: Annotated[PositivePairs, doc(
            "[parameters, peak LR] anchors of the reference LR, ascending in size, interpolated "
            "log-linearly and held flat outside (see LR_ANCHORS)")] = LR_ANCHORS
        usable_fraction: Annotated[Fraction, doc("of device memory the estimate may use")] = 0.9
        overhead_fraction: Annotated[NonNegativeFloat, doc(
            "added on top of the itemised memory parts")] = 0.1
        fsdp_prefetch_layers: Annotated[NonNegativeInt, doc(
            "unsharded layers FSDP holds at once (current + next)")] = 2
        logits_bytes: Annotated[PositiveFloat, doc(
            "bytes per logit: bf16 output + fp32 upcast inside the loss")] = 6.0

        def __post_init__(self) -> None:
            for name in ("beta2_range", "weight_decay_range"):
                lo, hi = getattr(self, name)
                if lo > hi:
                    raise ValueError(f"{name}: low {lo} > high {hi}")
            if self.lr_low_factor > self.lr_high_factor:
                raise ValueError(f"lr_low_factor {self.lr_low_factor} > lr_high_factor {self.lr_high_factor}")
            sizes = [p for p, _ in self.lr_anchors]
            if not sizes or sizes != sorted(set(sizes)):
                raise ValueError("lr_anchors: need at least one [parameters, lr] pair, sizes strictly ascending")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Preflight.Config()

    # optimizer ------------------------------------------------------------------------

    def check_optimizer(self, plan: TrainingPlan) -> list[Issue]:
        c, o = self.config, plan.optimizer
        out: list[Issue] = []
        adam = o.name.lower() in ADAM_NAMES
        if not adam:
            out.append(Issue("info", "optimizer.name", o.name,
                             "the ε/β/weight-decay rules are written for Adam-family optimizers",
                             "check those settings by hand for this optimizer"))
        if not (math.isfinite(o.lr) and o.lr > 0):
            out.append(Issue("error", "optimizer.lr", _g(o.lr), "the peak learning rate must be a positive number",
                             "set lr to the size-appropriate peak, e.g. 3e-4 at 8B"))
        else:
            params = model_params(plan.model)
            ref = reference_lr(params, c.lr_anchors)
            lo, hi = ref * c.lr_low_factor, ref * c.lr_high_factor
            if o.lr > hi or o.lr < lo:
                side = "high" if o.lr > hi else "low"
                why = (f"peak LR {_g(o.lr)} is far {side} for a {params / 1e9:.3g}B-parameter model: the"
                       f" reference is ~{ref:.2g} (heuristic from public runs: 6e-4 at 125M, 3e-4 at 8B,"
                       f" 2e-4 at 32B, 1e-4 at 175B); ")
                why += ("large LR makes loss spikes and divergence likelier, more so in deep nets"
                        if side == "high" else "too small an LR wastes tokens")
                out.append(Issue("warning", "optimizer.lr", _g(o.lr), why,
                                 f"use a peak LR within [{lo:.2g}, {hi:.2g}], ideally near {ref:.2g}"))
        if o.warmup_steps < 0:
            out.append(Issue("error", "optimizer.warmup_steps", str(o.warmup_steps), "warmup cannot be negative",
                             "set warmup_steps to a few hundred to a few thousand steps"))
        elif o.warmup_steps == 0:
            out.append(Issue("warning", "optimizer.warmup_steps", "0",
                             "no LR warmup: the first updates hit the full peak LR while Adam's second-moment"
                             " estimate is still noisy, a classic cause of early loss spikes",
                             "warm up linearly over ~1-2% of the run (the lab used 2000 steps)"))
        if not adam:
            return out
        if not math.isfinite(o.eps) or o.eps < 0:
            out.append(Issue("error", "optimizer.eps", _g(o.eps), "Adam ε must be a small non-negative number",
                             "set eps = 1e-8"))
        elif o.eps > c.eps_max:
            out.append(Issue(
                "error", "optimizer.eps", _g(o.eps),
                f"Adam ε = {_g(o.eps)} is the known 1e-5 trap: ε must be small next to the per-coordinate"
                " gradient scale √v, which in billion-parameter models is itself ~1e-5, so this ε dominates"
                " the denominator m/(√v+ε) and the update degrades to SGD-like steps; the LLM-jp lab lost"
                " ~3× convergence speed (and months) to ε = 1e-5 copied from a paper's typo",
                "set eps = 1e-8"))
        elif o.eps == 0:
            out.append(Issue("warning", "optimizer.eps", "0",
                             "ε = 0 divides by √v alone: coordinates with zero gradient history produce inf/NaN",
                             "set eps = 1e-8"))
        if not (0.0 <= o.beta1 < 1.0):
            out.append(Issue("error", "optimizer.beta1", _g(o.beta1), "β1 must be in [0, 1)", "set beta1 = 0.9"))
        if not (0.0 <= o.beta2 < 1.0):
            out.append(Issue("error", "optimizer.beta2", _g(o.beta2), "β2 must be in [0, 1)", "set beta2 = 0.95"))
        else:
            lo, hi = c.beta2_range
            if not (lo <= o.beta2 <= hi):
                out.append(Issue("warning", "optimizer.beta2", _g(o.beta2),
                                 f"β2 outside [{lo}, {hi}]: too small makes the second moment noisy, too close"
                                 " to 1 makes it lag behind gradient-scale changes (spike-prone in LLMs)",
                                 "use beta2 = 0.95 (the lab's setting)"))
        lo, hi = c.weight_decay_range
        if o.weight_decay < 0 or not math.isfinite(o.weight_decay):
            out.append(Issue("error", "optimizer.weight_decay", _g(o.weight_decay),
                             "negative weight decay pushes weights away from zero", "set weight_decay = 0.1"))
        elif o.weight_decay > hi or o.weight_decay < lo:
            out.append(Issue("warning", "optimizer.weight_decay", _g(o.weight_decay),
                             f"weight decay outside [{lo}, {hi}] is unusual for LLM pretraining",
                             "use weight_decay = 0.1 (the lab's setting)"))
        return out

    # plan fields ----------------------------------------------------------------------

    def check_plan(self, plan: TrainingPlan) -> list[Issue]:
        """Plan-wide fields that every layout depends on."""
        out: list[Issue] = []
        for name in ("world_size", "global_batch", "seq_len"):
            v = getattr(plan, name)
            if not isinstance(v, int) or v < 1:
                out.append(Issue("error", name, str(v), f"{name} must be a positive integer", f"fix {name}"))
        if plan.device not in DEVICES:
            out.append(Issue("error", "device", str(plan.device), f"unknown device; known: {', '.join(DEVICES)}",
                             "use a known device name, or cpu with device_memory_gib"))
        if plan.dtype not in DTYPES:
            out.append(Issue("error", "dtype", str(plan.dtype), "dtype must be bf16 or fp32", "set dtype = bf16"))
        if self.capacity_gib(plan) is None and plan.device in DEVICES:
            out.append(Issue("error", "device_memory_gib", str(plan.device_memory_gib),
                             "no memory size for this device: the memory estimate cannot be checked",
                             "set device_memory_gib (required for cpu)"))
        return out

    def capacity_gib(self, plan: TrainingPlan) -> float | None:
        if plan.device_memory_gib is not None:
            return plan.device_memory_gib if plan.device_memory_gib > 0 else None
        return DEVICE_MEMORY_GIB.get(plan.device)

    # layouts --------------------------------------------------------------------------

    def estimate_memory(self, plan: TrainingPlan, layout: Layout) -> MemoryEstimate:
        """Per-GPU memory of `layout`, GiB. A planning estimate (±25%), not a promise.

        Model state per parameter: bf16 weights 2 + bf16 grads 2 + fp32 master 4 + AdamW m, v 8
        = 16 bytes (fp32: 4 + 4 + 8 = 16, no master). Split over tp × pp and sharded by FSDP
        over dp_shard × cp (ZeRO-3). Activations per layer per micro-batch, bytes, with
        s = seq_len / cp, b = micro_batch, h = hidden, a = heads (Korthikanti et al. 2022):
          none:      s·b·h·(34 + 5·a·s/h) / tp   (conservative: keeps the attention matrix)
          selective: s·b·h·34 / tp
          full:      s·b·h·2 / tp per layer boundary, plus one layer recomputed ("none")
        (/ tp throughout: torchtitan's TP uses sequence parallelism.) A pipeline's first stage
        holds min(pp, micro-batches per step) micro-batches in flight (1F1B); the last stage
        holds one plus the logits, s·b·vocab·6 bytes / tp. The worse stage is reported. Then
        +overhead_fraction on top.
        """
        c, m = self.config, plan.model
        P = float(m.param_count())
        model_split = layout.tp * layout.pp
        shard = max(layout.shard_degree, 1) * layout.cp
        local = P / model_split / shard
        w_bytes = 2.0 if plan.dtype == "bf16" else 4.0
        params = local * w_bytes
        grads = local * w_bytes
        adam = local * 8.0
        master = local * 4.0 if plan.dtype == "bf16" else 0.0
        per_layer_params = (P - 2 * m.vocab * m.hidden) / m.layers / layout.tp
        gather = c.fsdp_prefetch_layers * per_layer_params * w_bytes if shard > 1 else 0.0

        s = plan.seq_len / layout.cp
        b, h, a = layout.micro_batch, m.hidden, m.heads
        full_layer = s * b * h * (34.0 + 5.0 * a * s / h) / layout.tp
        layers_per_stage = m.layers / layout.pp
        if layout.activation_checkpointing == "none":
            per_mb = layers_per_stage * full_layer
            recompute = 0.0
        elif layout.activation_checkpointing == "selective":
            per_mb = layers_per_stage * s * b * h * 34.0 / layout.tp
            recompute = 0.0
        else:
            per_mb = layers_per_stage * s * b * h * 2.0 / layout.tp
            recompute = full_layer
        act_bytes = 2.0 if plan.dtype == "bf16" else 4.0  # the formulas assume 16-bit activations
        scale = act_bytes / 2.0
        dp_mb = max(layout.dp * layout.micro_batch, 1)
        n_micro = max(plan.global_batch // dp_mb, 1)
        in_flight = min(layout.pp, n_micro) if layout.pp > 1 else 1
        logits = s * b * m.vocab * c.logits_bytes / layout.tp
        first = (per_mb * in_flight + recompute) * scale
        last = (per_mb + recompute) * scale + logits
        if layout.pp == 1:
            acts, logit_part, stage = first, logits, "only"
            acts_total = first + logits
        elif first >= last:
            acts, logit_part, stage, acts_total = first, 0.0, "first", first
        else:
            acts, logit_part, stage, acts_total = last - logits, logits, "last", last
        state = params + grads + adam + master + gather
        overhead = (state + acts_total) * c.overhead_fraction
        total = state + acts_total + overhead
        cap = self.capacity_gib(plan) or 0.0
        return MemoryEstimate(
            params_gib=params / GIB, grads_gib=grads / GIB, optimizer_gib=adam / GIB, master_gib=master / GIB,
            fsdp_gather_gib=gather / GIB, activations_gib=acts / GIB, logits_gib=logit_part / GIB,
            overhead_gib=overhead / GIB, total_gib=total / GIB, capacity_gib=cap,
            usable_gib=cap * c.usable_fraction, stage=stage,
        )

    def check_layout(self, plan: TrainingPlan, layout: Layout, index: int | None = None) -> list[Issue]:
        f = "layout" if index is None else f"layouts[{index}]"
        m = plan.model
        out: list[Issue] = []

        def err(name: str, value: object, why: str, fix: str) -> None:
            out.append(Issue("error", f"{f}.{name}", str(value), why, fix))

        for name in ("dp", "tp", "pp", "cp", "micro_batch"):
            v = getattr(layout, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                err(name, v, f"{name} must be a positive integer", f"set {name} >= 1")
        if out:
            return out
        if layout.activation_checkpointing not in AC_MODES:
            err("activation_checkpointing", layout.activation_checkpointing,
                "activation checkpointing must be none, selective or full", 'use "selective"')
        product = layout.dp * layout.tp * layout.pp * layout.cp
        if isinstance(plan.world_size, int) and product != plan.world_size:
            err("dp*tp*pp*cp", product,
                f"dp×tp×pp×cp = {layout.dp}×{layout.tp}×{layout.pp}×{layout.cp} = {product}"
                f" but the world size is {plan.world_size}: torchrun would fail to build the device mesh",
                f"choose degrees whose product is {plan.world_size}")
        if layout.dp_shard != -1 and (layout.dp_shard < 1 or layout.dp % layout.dp_shard):
            err("dp_shard", layout.dp_shard,
                f"dp_shard must be -1 (FSDP over all of dp) or a divisor of dp = {layout.dp}",
                "use -1, 1 (DDP) or a divisor of dp (HSDP)")
        if m.heads % layout.tp:
            err("tp", layout.tp, f"{m.name} has {m.heads} attention heads, not divisible by tp = {layout.tp}",
                "use a tp that divides the head count")
        if m.kv_heads % layout.tp:
            err("tp", layout.tp, f"{m.name} has {m.kv_heads} KV heads, not divisible by tp = {layout.tp}",
                "use a tp that divides the KV-head count")
        if m.layers % layout.pp:
            err("pp", layout.pp, f"{m.name} has {m.layers} layers, not divisible into pp = {layout.pp} stages",
                "use a pp that divides the layer count")
        if layout.cp > 1 and isinstance(plan.seq_len, int) and plan.seq_len % (2 * layout.cp):
            err("cp", layout.cp, f"seq_len {plan.seq_len} is not divisible by 2·cp = {2 * layout.cp}"
                " (context parallel splits each sequence into 2·cp load-balanced chunks)",
                "use a cp such that seq_len is divisible by 2·cp")
        gb = plan.global_batch if isinstance(plan.global_batch, int) else 0
        max_dp = gb // layout.micro_batch
        if layout.dp > max_dp:
            err("dp", layout.dp,
                f"dp = {layout.dp} exceeds what the global batch allows: {gb} sequences / micro-batch"
                f" {layout.micro_batch} = at most {max_dp} data-parallel ranks",
                "lower dp (raise tp/pp) or raise the global batch")
        elif gb % (layout.dp * layout.micro_batch):
            err("micro_batch", layout.micro_batch,
                f"global batch {gb} is not divisible by dp × micro_batch = {layout.dp * layout.micro_batch},"
                " so the step would not see exactly the planned batch",
                "pick dp and micro_batch whose product divides the global batch")
        elif layout.pp > 1 and gb // (layout.dp * layout.micro_batch) < layout.pp:
            n = gb // (layout.dp * layout.micro_batch)
            out.append(Issue("warning", f"{f}.pp", str(layout.pp),
                             f"only {n} micro-batches per step for {layout.pp} pipeline stages: the pipeline"
                             " bubble dominates and most stages idle",
                             "use at least pp micro-batches per step (smaller micro_batch or lower dp)"))
        if _has_error(out) or layout.activation_checkpointing not in AC_MODES:
            return out
        cap = self.capacity_gib(plan)
        if cap is None or plan.dtype not in DTYPES:
            return out  # reported once by check_plan
        est = self.estimate_memory(plan, layout)
        if not est.fits:
            fix = "shard more (dp_shard = -1, higher tp/pp), lower micro_batch, or use more activation checkpointing"
            err("memory", f"{est.total_gib:.1f} GiB",
                f"estimated per-GPU memory exceeds {self.config.usable_fraction:.0%} of {plan.device}'s"
                f" {cap:g} GiB, so this layout would OOM: {est.breakdown()}", fix)
        return out

    # the plan as a whole --------------------------------------------------------------

    def run(self, plan: TrainingPlan) -> PreflightReport:
        """Check everything; choose the first layout without an error (None if plan-wide errors)."""
        plan_issues = self.check_plan(plan)
        issues = [*self.check_optimizer(plan), *plan_issues]
        per: list[list[Issue]] = []
        memory: list[MemoryEstimate | None] = []
        plan_ok = not _has_error(plan_issues)
        for n, layout in enumerate(plan.layouts):
            found = self.check_layout(plan, layout, n)
            per.append(found)
            memory.append(self.estimate_memory(plan, layout) if plan_ok and _dims_ok(layout) else None)
        chosen = next((n for n, p in enumerate(per) if not _has_error(p)), None) if plan_ok else None
        if not plan.layouts:
            issues.append(Issue("error", "layouts", "[]", "the plan has no parallel layout",
                                "add at least one [[layouts]] entry"))
        else:
            seen: dict[tuple, int] = {}
            for n, lay in enumerate(plan.layouts):
                key = (lay.dp, lay.tp, lay.pp, lay.cp, lay.shard_degree, lay.micro_batch, lay.activation_checkpointing)
                if key in seen:
                    issues.append(Issue("warning", f"layouts[{n}]", lay.label(),
                                        f"same layout as layouts[{seen[key]}]: a fallback that changes nothing",
                                        "remove it or make it genuinely safer"))
                else:
                    seen[key] = n
            if chosen is None:
                if plan_ok:
                    issues.append(Issue("error", "layouts", f"{len(plan.layouts)} layouts",
                                        "no layout passes preflight: every one has an error",
                                        "fix a layout (see the per-layout errors) or add a safer one"))
            else:
                if chosen > 0:
                    issues.append(Issue("warning", "layouts", f"index {chosen}",
                                        f"the fastest layout{'s' if chosen > 1 else ''} (layouts[0..{chosen - 1}])"
                                        f" fail preflight; starting with layouts[{chosen}]",
                                        "fix the faster layouts if you want their speed"))
                if next_valid(per, chosen) is None:
                    issues.append(Issue("info", "layouts", f"index {chosen}",
                                        "no valid fallback after the chosen layout: a repeated OOM or hardware"
                                        " fault will stop the run instead of falling back",
                                        "add a safer layout (more sharding or checkpointing) after it"))
                prev: tuple[int, MemoryEstimate] | None = None
                for n in range(chosen, len(per)):
                    est = memory[n]
                    if _has_error(per[n]) or est is None:
                        continue
                    if prev is not None and est.total_gib > prev[1].total_gib * 1.001:
                        issues.append(Issue("info", f"layouts[{n}]", f"{est.total_gib:.1f} GiB",
                                            f"this fallback is estimated to need more memory than layouts[{prev[0]}]"
                                            f" ({prev[1].total_gib:.1f} GiB); it will not help after an OOM",
                                            "order fallbacks from most to least memory"))
                    prev = (n, est)
        return PreflightReport(issues=issues, chosen_layout_index=chosen, layout_issues=per, memory=memory,
                               layout_labels=[lay.label() for lay in plan.layouts])


def _dims_ok(layout: Layout) -> bool:
    return all(isinstance(getattr(layout, k), int) and getattr(layout, k) >= 1
               for k in ("dp", "tp", "pp", "cp", "micro_batch")) and layout.activation_checkpointing in AC_MODES


def next_valid(per_layout: list[list[Issue]], after: int) -> int | None:
    return next((n for n in range(after + 1, len(per_layout)) if not _has_error(per_layout[n])), None)


# --- module-level API (default thresholds) ------------------------------------------------

_DEFAULT = Preflight()


def check_optimizer(plan: TrainingPlan) -> list[Issue]:
    return _DEFAULT.check_optimizer(plan)


def check_layout(plan: TrainingPlan, layout: Layout) -> list[Issue]:
    return _DEFAULT.check_layout(plan, layout)


def estimate_memory(plan: TrainingPlan, layout: Layout) -> MemoryEstimate:
    return _DEFAULT.estimate_memory(plan, layout)


def preflight(plan: TrainingPlan, config: Preflight.Config | None = None) -> PreflightReport:
    return (Preflight(config) if config else _DEFAULT).run(plan)


def next_safer_layout(plan: TrainingPlan, current_index: int,
                      config: Preflight.Config | None = None) -> int | None:
    """The daemon's fallback: the next layout after `current_index` that passes preflight."""
    pf = Preflight(config) if config else _DEFAULT
    if _has_error(pf.check_plan(plan)):
        return None
    per = [pf.check_layout(plan, lay, n) for n, lay in enumerate(plan.layouts)]
    return next_valid(per, current_index)


def exit_code(report: PreflightReport) -> int:
    """1 when launching would be a mistake: a plan-wide error (optimizer included) or no valid layout."""
    return 1 if _has_error(report.issues) or report.chosen_layout_index is None else 0


def format_report(report: PreflightReport) -> str:
    """One line per finding (level, field = value: why → what to do), then one line per layout."""
    lines = [f"{i.level.upper():7} {i.field} = {i.value}: {i.why}. Fix: {i.fix}." for i in report.all_issues()]
    for n, per in enumerate(report.layout_issues):
        est = report.memory[n] if n < len(report.memory) else None
        mem = f", est. {est.total_gib:.1f}/{est.usable_gib:.1f} GiB" if est else ""
        state = "invalid" if _has_error(per) else "ok"
        mark = " <- chosen" if n == report.chosen_layout_index else ""
        label = report.layout_labels[n] if n < len(report.layout_labels) else ""
        lines.append(f"LAYOUT  layouts[{n}] {label}: {state}{mem}{mark}")
    verdict = "PASS" if exit_code(report) == 0 else "FAIL"
    lines.append(f"{verdict}    chosen layout: {report.chosen_layout_index}")
    return "\n".join(lines)


# --- reading a plan from a TOML dict ------------------------------------------------------

_TRAINING_KEYS = {"model", "world_size", "global_batch", "seq_len", "device", "device_memory_gib", "dtype"}
_OPTIMIZER_KEYS = {"name", "lr", "eps", "beta1", "beta2", "weight_decay", "warmup_steps"}
_LAYOUT_KEYS = {"name", "dp", "tp", "pp", "cp", "dp_shard", "micro_batch", "activation_checkpointing"}


def _section(d: dict, name: str) -> dict:
    sec = d.get(name)
    if not isinstance(sec, dict):
        raise ValueError(f"[{name}]: missing section (expected a table)")
    return sec


def _unknown(sec: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(sec) - allowed)
    if extra:
        raise ValueError(f"{where}.{extra[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _int(sec: dict, key: str, where: str, default: int | None = None, minimum: int = 1) -> int:
    if key not in sec:
        if default is None:
            raise ValueError(f"{where}.{key}: required")
        return default
    v = sec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}.{key}: expected an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"{where}.{key}: must be >= {minimum}, got {v}")
    return v


def _float(sec: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in sec:
        if default is None:
            raise ValueError(f"{where}.{key}: required")
        return default
    v = sec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}.{key}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{where}.{key}: must be finite, got {v!r}")
    return float(v)


def _choice(sec: dict, key: str, where: str, choices: tuple[str, ...], default: str | None = None) -> str:
    if key not in sec:
        if default is None:
            raise ValueError(f"{where}.{key}: required (one of {', '.join(choices)})")
        return default
    v = sec[key]
    if v not in choices:
        raise ValueError(f"{where}.{key}: {v!r} is not one of {', '.join(choices)}")
    return v


def _str(sec: dict, key: str, where: str, default: str) -> str:
    v = sec.get(key, default)
    if not isinstance(v, str):
        raise ValueError(f"{where}.{key}: expected a string, got {v!r}")
    return v


def plan_from_dict(d: dict) -> TrainingPlan:
    """Build a plan from a parsed TOML dict (keys in the module docstring).

    Malformed input (missing or unknown keys, wrong types, impossible values) raises
    ValueError naming the field; settings that are valid but unwise (ε = 1e-5, a layout
    that will OOM) are left for the checks to report.
    """
    if not isinstance(d, dict):
        raise ValueError("plan: expected a table with [training], [optimizer] and [[layouts]]")
    t = _section(d, "training")
    _unknown(t, _TRAINING_KEYS, "training")
    model_name = t.get("model")
    if not isinstance(model_name, str):
        raise ValueError(f"training.model: required, a model name (known: {', '.join(ALL_SHAPES)})")
    if model_name not in ALL_SHAPES:
        raise ValueError(f"training.model: unknown model {model_name!r} (known: {', '.join(ALL_SHAPES)})")
    device = _choice(t, "device", "training", DEVICES)
    mem = None
    if "device_memory_gib" in t:
        mem = _float(t, "device_memory_gib", "training")
        if mem <= 0:
            raise ValueError(f"training.device_memory_gib: must be > 0, got {mem}")
    elif device == "cpu":
        raise ValueError("training.device_memory_gib: required when device = \"cpu\"")

    o = _section(d, "optimizer")
    _unknown(o, _OPTIMIZER_KEYS, "optimizer")
    sched = d.get("lr_scheduler", {})
    if "warmup_steps" in o:
        warmup = _int(o, "warmup_steps", "optimizer", minimum=0)
    elif isinstance(sched, dict) and "warmup_steps" in sched:
        warmup = _int(sched, "warmup_steps", "lr_scheduler", minimum=0)
    else:
        raise ValueError("optimizer.warmup_steps: required (or [lr_scheduler] warmup_steps)")
    lr = _float(o, "lr", "optimizer")
    if lr <= 0:
        raise ValueError(f"optimizer.lr: must be > 0, got {lr}")
    optimizer = OptimizerPlan(
        name=_str(o, "name", "optimizer", "AdamW"),
        lr=lr,
        eps=_float(o, "eps", "optimizer", 1e-8),
        beta1=_float(o, "beta1", "optimizer", 0.9),
        beta2=_float(o, "beta2", "optimizer", 0.95),
        weight_decay=_float(o, "weight_decay", "optimizer", 0.1),
        warmup_steps=warmup,
    )

    raw = d.get("layouts")
    if not isinstance(raw, list) or not raw:
        raise ValueError("layouts: required, a non-empty array of tables ([[layouts]])")
    layouts: list[Layout] = []
    for n, sec in enumerate(raw):
        where = f"layouts[{n}]"
        if not isinstance(sec, dict):
            raise ValueError(f"{where}: expected a table")
        _unknown(sec, _LAYOUT_KEYS, where)
        dp_shard = _int(sec, "dp_shard", where, default=-1, minimum=-1)
        if dp_shard == 0:
            raise ValueError(f"{where}.dp_shard: must be -1 (all of dp) or >= 1, got 0")
        layouts.append(Layout(
            name=_str(sec, "name", where, ""),
            dp=_int(sec, "dp", where),
            tp=_int(sec, "tp", where, 1),
            pp=_int(sec, "pp", where, 1),
            cp=_int(sec, "cp", where, 1),
            dp_shard=dp_shard,
            micro_batch=_int(sec, "micro_batch", where),
            activation_checkpointing=_choice(sec, "activation_checkpointing", where, AC_MODES, "selective"),  # type: ignore[arg-type]
        ))
    return TrainingPlan(
        model=ALL_SHAPES[model_name],
        optimizer=optimizer,
        layouts=layouts,
        world_size=_int(t, "world_size", "training"),
        global_batch=_int(t, "global_batch", "training"),
        seq_len=_int(t, "seq_len", "training"),
        device=device,  # type: ignore[arg-type]
        device_memory_gib=mem,
        dtype=_choice(t, "dtype", "training", DTYPES, "bf16"),  # type: ignore[arg-type]
    )
