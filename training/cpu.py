"""Make torchtitan 0.3.0 train on a CPU-only machine (gloo), and do nothing on CUDA.

torchtitan assumes an accelerator: it picks ``device_type = "cuda"`` at import when none is
found, calls ``torch.cuda`` memory APIs, reduces FSDP gradients with PREMUL_SUM (gloo refuses
it) and, on torch 2.13, calls ``torch.distributed.set_timeout`` (public only from 2.14).
``enable()`` fixes each of these, once, before any torchtitan object is built. The
measurements behind each patch are in ``shared/notes/torchtitan-on-cpu.md``.

Guarantee: on a machine where ``torch.cuda.is_available()`` is true, ``enable()`` changes
nothing and returns False.
"""

from __future__ import annotations

import resource
import sys
from types import SimpleNamespace

import torch

_enabled = False


class CpuMemory:
    """Stand-in for the slice of ``torch.cuda`` torchtitan uses, backed by the process RSS."""

    @staticmethod
    def _rss_peak_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def memory_stats(self, device=None) -> dict:
        peak = self._rss_peak_bytes()
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    def reset_peak_memory_stats(self, device=None) -> None:  # ru_maxrss cannot be reset
        pass

    def empty_cache(self) -> None:
        pass

    def synchronize(self, device=None) -> None:
        pass

    def set_device(self, device=None) -> None:
        pass

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def get_device_name(self, device=None) -> str:
        return "cpu"

    def get_device_properties(self, device=None):
        import psutil

        return SimpleNamespace(name="cpu", total_memory=psutil.virtual_memory().total)

    def is_available(self) -> bool:
        return True

    def max_memory_allocated(self, device=None) -> int:
        return self._rss_peak_bytes()


CPU_MEMORY = CpuMemory()


def peak_memory_gib() -> float:
    """Peak memory of this process: device memory on CUDA, RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 2**30
    return CPU_MEMORY._rss_peak_bytes() / 2**30


def _patch_device_globals() -> None:
    import torchtitan.tools.utils as tt_utils

    tt_utils.device_type = "cpu"
    tt_utils.device_module = CPU_MEMORY
    # Modules that copied the names at import time.
    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan") or module is None:
            continue
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = CPU_MEMORY


def _patch_fsdp_sum_reduction() -> None:
    """gloo has no PREMUL_SUM: with divide factor 1.0 a plain SUM is numerically the same."""
    from torch.distributed.fsdp import FSDPModule

    original = FSDPModule.set_gradient_divide_factor
    if getattr(original, "_titan_cpu_patched", False):
        return

    def set_gradient_divide_factor(self, factor: float) -> None:
        original(self, factor)
        if factor == 1.0:
            self.set_force_sum_reduction_for_comms(True)

    set_gradient_divide_factor._titan_cpu_patched = True  # type: ignore[attr-defined]
    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


def _patch_set_timeout() -> None:
    if not hasattr(torch.distributed, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        torch.distributed.set_timeout = _set_pg_timeout


def enable() -> bool:
    """Patch torchtitan for CPU training. Idempotent. Returns True when patches are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    # per thread (the FTZ/DAZ bits): set in every thread that calls this, so a warm spare that
    # imported in a helper thread (training/spare.py) still trains with it in its main thread
    torch.set_flush_denormal(True)  # diverged runs otherwise slow ~40% from subnormals
    if _enabled:
        return True
    # Import the modules that copy device globals so they can be patched in place.
    import torchtitan.components.metrics  # noqa: F401
    import torchtitan.distributed.utils  # noqa: F401
    import torchtitan.trainer  # noqa: F401

    _patch_device_globals()
    _patch_fsdp_sum_reduction()
    _patch_set_timeout()
    _enabled = True
    return True


def is_torch_213() -> bool:
    return torch.__version__.startswith("2.13")


def adapt_config(config) -> None:
    """Make a device-agnostic trainer config CPU-ready (no-op on CUDA): SDPA attention
    (FlexAttention has no CPU backward), float32, no activation checkpointing, no CUDA
    graphs, and on torch 2.13 the partial_dtensor SPMD backend (the default fails on 2+ ranks)."""
    if torch.cuda.is_available():
        return
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention, VarlenAttention

    model = config.model_spec.model
    for layer in getattr(model, "layers", []):
        attn = getattr(layer, "attention", None)
        if attn is not None and isinstance(attn.inner_attention, (FlexAttention.Config, VarlenAttention.Config)):
            attn.inner_attention = ScaledDotProductAttention.Config()
    config.training.dtype = "float32"
    config.training.mixed_precision_param = "float32"
    config.training.disable_cuda_graphs = True
    config.activation_checkpoint = None
    if is_torch_213():
        config.parallelism.spmd_backend = "partial_dtensor"
