"""CPU twins of a checkpoint's state dict, refilled in place: an async save that stalls the step for a copy.

Why: torchtitan's ``checkpoint.async_mode = "async"`` still does on the training step:
rebuild the model and optimizer state dicts (DTensor ops, tens of microseconds per tensor),
two full ``gc.collect()`` passes, and a fresh staging copy into newly allocated CPU tensors
(torch's ``StateDictStager``); profiled here on the 6.6 MiB ``deep6`` checkpoint that was a
quarter of the synchronous save (README, ``bench/checkpoint_stall.py``).
``StateSnapshot`` builds the twins once: an owned CPU tensor (a DTensor with the live
tensor's mesh and placements around it) for every tensor leaf of the flattened DCP state dict.
Every later ``take`` copies live -> twin on the plain local tensors (no DTensor dispatch, no
allocation, no garbage) and deep-copies the small non-tensor leaves (LR scheduler, data
position, train state, param-group hyperparameters); ``training.trainer.OnDemandCheckpointer``
hands the result to a background thread that runs the whole ``dcp.save`` (planning, its
collectives on torchtitan's separate async gloo group, writing, ``.metadata`` last).

Failure model:
- Twins are paired with live tensors by identity. A live tensor that is not the one paired
  (a load replaced the optimizer's state tensors, a heal, a new leaf) makes ``take`` rebuild
  every twin: that one save costs what torchtitan's staging costs, and is still correct.
  ``invalidate`` (called on every load) drops the pairing eagerly.
- A model tensor that does not share storage with a parameter or buffer is made by a
  submodule's state-dict hook (torchtitan's fused QKV saves ``wq``/``wk``/``wv`` split out of
  an all-gathered ``wqkv``). ``ModelView`` re-derives it on the step (not on the writer thread: see
  ``OnDemandCheckpointer._save``) from twins of that
  submodule's parameters, through a copy of the submodule (its own hook), the all-gather on the
  async group; it is checked equal to the live model's at every build, else ``Unpairable`` and
  the caller keeps torchtitan's own path for the run.
- The twins are reused, so the caller must not ``take`` while a write of the previous
  snapshot is in flight (the checkpointer waits for it first, as torchtitan always did).
- Cost kept: one host copy of the rank's checkpointed state for the life of the run
  (torchtitan's path allocates the same copy on every save and frees it after the write).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor


class Unpairable(RuntimeError):
    """The live state cannot be twinned across saves; use the rebuild-every-save path."""


class _Stale(Exception):
    pass


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _storages(module_parts: list[torch.nn.Module]) -> set[int]:
    out = set()
    for m in module_parts:
        for t in [*m.parameters(), *m.buffers()]:
            out.add(_local(t.detach()).untyped_storage().data_ptr())
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if isinstance(a, DTensor) != isinstance(b, DTensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if isinstance(a, DTensor) and tuple(a.placements) != tuple(b.placements):
        return False
    return torch.equal(_local(a), _local(b))


class _Shadow:
    """A copy of the submodule whose state-dict hook derives saved tensors from its parameters
    (torchtitan's fused QKV projection saves ``wq``/``wk``/``wv`` split out of ``wqkv``, after an
    all-gather). Its parameters are CPU twins refilled on the step; its ``state_dict`` (the
    submodule's own hook) runs on the step too, its collectives on ``mesh`` (the async group)."""

    def __init__(self, prefix: str, module: torch.nn.Module, mesh: Any) -> None:
        self.prefix = prefix
        self.module = copy.deepcopy(module)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        live = dict(module.named_parameters())
        for name, _ in list(self.module.named_parameters()):
            p = live[name].detach()
            owner_name, _, leaf = name.rpartition(".")
            owner = self.module.get_submodule(owner_name) if owner_name else self.module
            src = _local(p)
            buf = torch.empty_like(src, device="cpu")
            buf.copy_(src)
            if isinstance(p, DTensor):
                if p.device_mesh.ndim != 1 or p.device_mesh.size() != mesh.size():
                    raise Unpairable(f"{prefix}.{name}: a {p.device_mesh.ndim}-D mesh of {p.device_mesh.size()}"
                                     " ranks (the snapshot re-derives only over one flat group)")
                twin = DTensor.from_local(buf, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            else:
                twin = buf
            setattr(owner, leaf, torch.nn.Parameter(twin, requires_grad=False))
            self.pairs.append((src, buf))

    def refresh(self) -> None:
        for src, buf in self.pairs:
            buf.copy_(src)

    def derive(self) -> dict[str, Any]:
        return self.module.state_dict(prefix=self.prefix + ".")


class ModelView:
    """The model's saved state (``ModelWrapper.state_dict()``, built once): leaves that are
    parameters or buffers are read in place; leaves a submodule's state-dict hook computes are
    re-derived by a ``_Shadow`` from twins of that submodule's parameters.

    Built on the step (what torchtitan pays on every save), then checked: every derived leaf must
    come out of its shadow equal to what the live model gave, else ``Unpairable``."""

    def __init__(self, model_parts: list[torch.nn.Module], state_dict: dict[str, Any],
                 mesh_fn: Callable[[], Any]) -> None:
        self.state_dict = state_dict  # the ModelWrapper's cache: identity changes on a load
        owned = _storages(model_parts)
        self.direct: dict[str, Any] = {}
        derived: list[str] = []
        for k, v in state_dict.items():
            if isinstance(v, torch.Tensor) and _local(v).untyped_storage().data_ptr() not in owned:
                derived.append(k)
            else:
                self.direct[k] = v
        self.shadows: list[_Shadow] = []
        covered: set[str] = set()
        for k in derived:
            if k in covered:
                continue
            prefix, module = _owner(model_parts, k)
            shadow = _Shadow(prefix, module, mesh_fn())
            self.shadows.append(shadow)
            covered.update(shadow.derive())
        self.derived = derived
        got = self.derive()
        if len(got) != len(derived):
            raise Unpairable(f"model state {sorted(set(derived) - set(got))[:3]} not re-derived by its submodule")
        for k in derived:
            if not _same(got[k], state_dict[k]):
                raise Unpairable(f"model state {k!r} re-derived from a twin differs from the live one")

    def refresh(self) -> None:
        for s in self.shadows:
            s.refresh()

    def derive(self) -> dict[str, Any]:
        """The derived leaves from the twins (their hooks' collectives run on the async group)."""
        out: dict[str, Any] = {}
        for s in self.shadows:
            out.update(s.derive())
        return {k: out[k] for k in self.derived if k in out}


def _owner(model_parts: list[torch.nn.Module], key: str) -> tuple[str, torch.nn.Module]:
    """The deepest submodule on ``key``'s path: the one whose hook put ``key`` in the state dict."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        for m in model_parts:
            try:
                return prefix, m.get_submodule(prefix)
            except AttributeError:
                continue
    raise Unpairable(f"model state {key!r} is made by the root module's own hook")


class StateSnapshot:
    """Owned CPU copies of a nested state dict's tensors, allocated once and refilled by ``take``."""

    def __init__(self) -> None:
        # id(live tensor) -> (live tensor, its local part, twin's local part, twin)
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.builds = 0  # how many times the twins were (re)allocated

    def invalidate(self) -> None:
        self._pairs = {}

    @property
    def nbytes(self) -> int:
        return sum(p[2].numel() * p[2].element_size() for p in self._pairs.values())

    @torch.no_grad()
    def take(self, live: dict[str, Any]) -> dict[str, Any]:
        """A new nested dict shaped like ``live``: tensor leaves are the twins, filled with the
        live values now; other leaves are deep copies."""
        if self._pairs:
            try:
                return self._walk(live, build=False)
            except _Stale:
                self._pairs = {}
        self.builds += 1
        return self._walk(live, build=True)

    def _walk(self, live: dict[str, Any], build: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in live.items():
            if isinstance(v, dict):
                out[k] = self._walk(v, build)
            elif isinstance(v, torch.Tensor):
                out[k] = self._twin(v, build)
            else:
                out[k] = copy.deepcopy(v)
        return out

    def _twin(self, v: torch.Tensor, build: bool) -> torch.Tensor:
        pair = self._pairs.get(id(v))
        if pair is not None and pair[0] is v:
            pair[2].copy_(pair[1])
            return pair[3]
        if not build:
            raise _Stale()
        src = _local(v)
        buf = torch.empty_like(src, device="cpu")
        buf.copy_(src)
        twin = (DTensor.from_local(buf, v.device_mesh, v.placements, run_check=False, shape=v.shape,
                                   stride=v.stride()) if isinstance(v, DTensor) else buf)
        if _local(twin).untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
            raise Unpairable("a DTensor twin does not wrap its buffer")  # would save stale zeros
        self._pairs[id(v)] = (v, src, buf, twin)
        return twin
