"""Fault injection for failure drills. Off unless a spec is given.

Spec: comma-separated ``KIND@STEP[:key=value...]``; keys ``rank`` (default 0), ``gen``
(generation it fires in, default 0, ``*`` for any) and per-kind parameters:

  spike@30:lr=1000:steps=3   multiply the LR by ``lr`` for ``steps`` steps (a real instability)
  nan@50                     put NaN into one gradient after backward (the guard skips it)
  nan@50:applied=1           ... and let the update through: the weights are poisoned
  badbatch@40                replace that step's batch with random tokens (a bad-data spike
                             that recovers by itself); ``frac`` of the rows, for ``steps`` steps
  drift@60:lr=30:steps=40    raise the LR geometrically to ``lr``x over ``steps`` steps and
                             hold it there (a slow drift, not a one-step blow-up)
  hang@70:rank=1:mode=sleep  sleep forever at the step boundary (mode=stop: SIGSTOP itself)
  crash@90:rank=1            SIGKILL this rank
  slow@10:rank=1:seconds=0.2 sleep that long every step from STEP on (a straggler)
  oom@80:rank=1:gib=64       try to allocate that much memory (fails like an OOM on CPU too)

Every fault fires at most once per process, so a rollback that replays step N does not
re-trigger it (the drill is about the supervisor's response, not an endless loop).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

KINDS = {
    "spike": {"lr": float, "steps": int},
    "nan": {"applied": int},
    "badbatch": {"frac": float, "steps": int},
    "drift": {"lr": float, "steps": int},
    "hang": {"mode": str},
    "crash": {},
    "slow": {"seconds": float},
    "oom": {"gib": float},
}
COMMON = {"rank": int, "gen": str}


@dataclass
class Fault:
    kind: str
    step: int
    rank: int = 0
    gen: str = "0"
    params: dict = field(default_factory=dict)

    def applies(self, rank: int, generation: int) -> bool:
        return self.rank == rank and (self.gen == "*" or int(self.gen) == generation)


def parse_faults(spec: str) -> list[Fault]:
    """Parse a fault spec; raise ValueError naming the offending part."""
    faults: list[Fault] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        head, *kvs = part.split(":")
        if "@" not in head:
            raise ValueError(f"fault {part!r}: expected KIND@STEP, e.g. spike@30:lr=1000")
        kind, _, step_s = head.partition("@")
        if kind not in KINDS:
            raise ValueError(f"fault {part!r}: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        try:
            step = int(step_s)
        except ValueError:
            raise ValueError(f"fault {part!r}: step {step_s!r} is not an integer") from None
        if step < 1:
            raise ValueError(f"fault {part!r}: step must be >= 1")
        f = Fault(kind=kind, step=step)
        allowed = {**COMMON, **KINDS[kind]}
        for kv in kvs:
            key, eq, val = kv.partition("=")
            if not eq or key not in allowed:
                raise ValueError(f"fault {part!r}: unknown parameter {kv!r} (allowed: {', '.join(sorted(allowed))})")
            try:
                typed = allowed[key](val)
            except ValueError:
                raise ValueError(f"fault {part!r}: {key}={val!r} is not a valid {allowed[key].__name__}") from None
            if key == "rank":
                f.rank = typed
            elif key == "gen":
                if typed != "*" and not typed.isdigit():
                    raise ValueError(f"fault {part!r}: gen must be a generation number or *")
                f.gen = typed
            else:
                f.params[key] = typed
        if kind == "hang" and f.params.get("mode", "sleep") not in ("sleep", "stop"):
            raise ValueError(f"fault {part!r}: hang mode must be sleep or stop")
        faults.append(f)
    return faults


class FaultPlan:
    """The faults that apply to this rank and generation; asked at fixed points of each step."""

    def __init__(self, spec: str, rank: int, generation: int) -> None:
        self.faults = [f for f in parse_faults(spec) if f.applies(rank, generation)]
        self._fired: set[int] = set()
        self._spike_from = 0
        self._spike_until = -1
        self._spike_factor = 1.0
        self._slow_seconds = 0.0
        self._drift: tuple[int, float, int] | None = None  # (from step, factor, ramp steps)
        self._bad_until = -1
        self._bad_frac = 1.0
        self._nan_applied = False

    def _due(self, kind: str, step: int) -> list[Fault]:
        out = []
        for i, f in enumerate(self.faults):
            if f.kind == kind and f.step == step and i not in self._fired:
                self._fired.add(i)
                out.append(f)
        return out

    def before_step(self, step: int, on_phase=lambda phase: None) -> None:
        """Called at the step boundary, before the step runs."""
        for f in self._due("spike", step):
            self._spike_factor = float(f.params.get("lr", 1000.0))
            self._spike_from = step
            self._spike_until = step + int(f.params.get("steps", 3)) - 1
        for _ in self._due("crash", step):
            os.kill(os.getpid(), signal.SIGKILL)
        for f in self._due("hang", step):
            on_phase("fault:hang")
            if f.params.get("mode", "sleep") == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                while True:
                    time.sleep(3600)
        for f in self._due("drift", step):
            self._drift = (step, float(f.params.get("lr", 30.0)), max(1, int(f.params.get("steps", 40))))
        for f in self._due("slow", step):
            self._slow_seconds = float(f.params.get("seconds", 0.2))
        if self._slow_seconds:
            time.sleep(self._slow_seconds)
        for f in self._due("oom", step):
            _allocate_gib(float(f.params.get("gib", 64.0)))

    def clear_transient(self) -> None:
        """A rollback rewinds the steps: an LR spike in progress does not replay."""
        self._spike_until = -1
        self._drift = None
        self._bad_until = -1

    def lr_factor(self, step: int) -> float:
        factor = self._spike_factor if self._spike_from <= step <= self._spike_until else 1.0
        if self._drift is not None and step >= self._drift[0]:
            start, peak, ramp = self._drift
            factor *= peak ** (min(step - start, ramp) / ramp)
        return factor

    def badbatch_fraction(self, step: int) -> float:
        """Fraction of this step's batch rows to corrupt (0.0: none)."""
        for f in self._due("badbatch", step):
            self._bad_until = step + max(1, int(f.params.get("steps", 1))) - 1
            self._bad_frac = min(1.0, max(0.0, float(f.params.get("frac", 1.0))))
        return self._bad_frac if step <= self._bad_until else 0.0

    def badbatch_now(self, step: int) -> bool:
        return self.badbatch_fraction(step) > 0.0

    def nan_now(self, step: int) -> bool:
        due = self._due("nan", step)
        self._nan_applied = any(int(f.params.get("applied", 0)) for f in due)
        return bool(due)

    def nan_update_applied(self) -> bool:
        """The NaN injected this step is to reach the weights (the guard is bypassed once)."""
        applied, self._nan_applied = self._nan_applied, False
        return applied

    @property
    def active(self) -> bool:
        return bool(self.faults)


def _allocate_gib(gib: float) -> None:
    """Allocate and touch ``gib`` GiB. On CUDA this raises torch.OutOfMemoryError; on CPU the
    address-space limit is lowered first so the allocator fails the same way instead of the
    kernel's OOM killer taking down the machine."""
    import resource

    import torch

    if torch.cuda.is_available():
        torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").fill_(1)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + 256 * 2**20, hard))
    try:
        torch.empty(int(gib * 2**30), dtype=torch.uint8).fill_(1)
    except RuntimeError as e:
        raise torch.OutOfMemoryError(f"CPU out of memory (injected): {e}") from e
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
