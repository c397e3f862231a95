"""Fault injection for failure drills. Off unless a spec is given.

Spec: comma-separated ``KIND@STEP[:key=value...]``; selectors ``rank`` (a rank, or ``*`` for
every rank) and ``gen`` (a generation number, ``*`` for every process, or ``once``), and
per-kind parameters:

  spike@30:lr=1000:steps=3   multiply the LR by ``lr`` for ``steps`` steps (a real instability)
  drift@60:lr=30:steps=40    raise the LR geometrically to ``lr``x over ``steps`` steps and
                             hold it there (a slow drift, not a one-step blow-up)
  nan@50                     put NaN into one gradient after backward (the guard skips it)
  nan@50:applied=1           ... and let the update through: the weights are poisoned
  badbatch@40                replace the batch of step 40 with random tokens (a bad-data spike
                             that recovers by itself); ``frac`` of the rows, for ``steps`` steps
  hang@70:rank=1:mode=sleep  sleep forever at the step boundary (mode=stop: SIGSTOP itself)
  crash@90:rank=1            SIGKILL this rank
  slow@10:rank=1:seconds=0.2 sleep that long every step from STEP on (a straggler); ``steps``
                             bounds it (default 0: until the process ends)
  oom@80:rank=1:gib=64       try to allocate that much memory (fails like an OOM on CPU too)

Defaults say what a fault is:
- **Job-wide faults** (spike, drift, badbatch, nan) hit every rank (``rank=*``): an LR spike or
  a bad batch is a property of the job, not of one rank's shard.
- **Data faults** (badbatch, nan) belong to the data, not to a moment: ``STEP`` names the
  batches an unbroken run trains on at that step (this rank's batches number
  ``(STEP-1)*B+1 .. STEP*B`` with B batches per step), and the fault recurs whenever those
  batches are trained on again — after a restart or a rollback that replays them (``gen=*``),
  as real bad data does. Only a rollback that skips the window gets past it.
- **Process faults** (crash, hang, slow, oom) hit rank 0 unless told otherwise.
- ``rank`` is the **global** rank. In torchft mode (replica groups, each its own torchrun) that is
  ``group * ranks per group + local rank`` (`training.ft.global_rank`, the numbering the supervisor
  uses for rank exits and heartbeats): with one rank per group ``crash@60:rank=1`` kills group 1,
  and a job-wide fault hits every rank of every group.
- **Event faults** (spike, drift and the process faults) happen once in the job's history
  (``gen=once``): the first time any process of the job reaches STEP. A marker per fault and
  rank under ``<dump_folder>/faults/`` (``--supervision.fault_state``) remembers it across
  restarts (a supervisor's new generation or a torchrun restart replaying the step does not fire
  it again); it notes the generation it fired in. A job-wide event fault (``rank=*``) fires in
  every rank of the generation that first reached STEP and in no later generation: a rank that
  was down then (a replica group being relaunched in torchft mode, where every group shares the
  run's marker folder) does not get its own spike when it passes STEP after a rollback. Without
  a state folder, once per process. ``gen=N`` fires in generation N only (torchrun's restart
  count is added to the supervisor's generation), ``gen=*`` in every process that reaches STEP.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.wire import ascii_int


def integer(s: str) -> int:
    """ASCII digits only, below 2**53 (``int()`` took "٣" and "1_0"; 10**20 steps is no drill)."""
    n = ascii_int(s, max_digits=15)
    if n is None:
        raise ValueError(s)
    return n


def number(s: str) -> float:
    """A finite float (``float()`` took nan, inf and 1e400, which crashed the rank at the step)."""
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(s)
    return v


KINDS = {
    "spike": {"lr": number, "steps": integer},
    "nan": {"applied": integer},
    "badbatch": {"frac": number, "steps": integer},
    "drift": {"lr": number, "steps": integer},
    "hang": {"mode": str},
    "crash": {},
    "slow": {"seconds": number, "steps": integer},
    "oom": {"gib": number},
}
# (low, high, low allowed), checked at parse so that a spec that parses also runs
RANGES = {"lr": (0.0, 1e6, False), "frac": (0.0, 1.0, False), "seconds": (0.0, 3600.0, True),
          "gib": (0.0, 1e6, False), "steps": (0, 10**9, True), "applied": (0, 1, True)}
COMMON = {"rank": str, "gen": str}
JOB_WIDE = frozenset({"spike", "drift", "badbatch", "nan"})
DATA = frozenset({"badbatch", "nan"})
ALL = "*"
ONCE = "once"


@dataclass
class Fault:
    kind: str
    step: int
    rank: str = ""  # a rank number or "*"; "" = the kind's default
    gen: str = ""  # a generation number, "*" or "once"; "" = the kind's default
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank = self.rank or (ALL if self.kind in JOB_WIDE else "0")
        self.gen = self.gen or (ALL if self.kind in DATA else ONCE)

    def applies(self, rank: int, generation: int) -> bool:
        return ((self.rank == ALL or int(self.rank) == rank)
                and (self.gen in (ALL, ONCE) or int(self.gen) == generation))

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.step}"


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
            step = integer(step_s)
        except ValueError:
            raise ValueError(f"fault {part!r}: step {step_s!r} is not an integer") from None
        if step < 1:
            raise ValueError(f"fault {part!r}: step must be >= 1")
        rank, gen, params = "", "", {}
        allowed = {**COMMON, **KINDS[kind]}
        for kv in kvs:
            key, eq, val = kv.partition("=")
            if not eq or key not in allowed:
                raise ValueError(f"fault {part!r}: unknown parameter {kv!r} (allowed: {', '.join(sorted(allowed))})")
            try:
                typed = allowed[key](val)
            except ValueError:
                raise ValueError(f"fault {part!r}: {key}={val!r} is not a valid {allowed[key].__name__}") from None
            if key in RANGES:
                low, high, closed = RANGES[key]
                if not ((low <= typed if closed else low < typed) and typed <= high):
                    raise ValueError(f"fault {part!r}: {key}={val!r} is out of range "
                                     f"{'[' if closed else '('}{low:g}, {high:g}]")
            if key == "rank":
                if typed != ALL and ascii_int(typed, max_digits=15) is None:
                    raise ValueError(f"fault {part!r}: rank must be a rank number or *")
                rank = typed
            elif key == "gen":
                if typed not in (ALL, ONCE) and ascii_int(typed, max_digits=15) is None:
                    raise ValueError(f"fault {part!r}: gen must be a generation number, * or once")
                if kind in DATA and typed == ONCE:
                    raise ValueError(f"fault {part!r}: a data fault recurs with its batch; gen=once "
                                     f"is for events (use gen=N to limit it to one generation)")
                gen = typed
            else:
                params[key] = typed
        if kind == "hang" and params.get("mode", "sleep") not in ("sleep", "stop"):
            raise ValueError(f"fault {part!r}: hang mode must be sleep or stop")
        faults.append(Fault(kind=kind, step=step, rank=rank, gen=gen, params=params))
    return faults


class FaultPlan:
    """The faults that apply to this rank and generation; asked at fixed points of each step.

    ``state_dir`` (``<dump_folder>/faults``) holds the markers of ``gen=once`` faults that
    fired; ``batches_per_step`` maps a data fault's step to this rank's batch numbers."""

    def __init__(self, spec: str, rank: int, generation: int, state_dir: Path | str | None = None,
                 batches_per_step: int = 1) -> None:
        parsed = parse_faults(spec)
        # a fault's number in the spec names its markers: the same in every rank (rank 1's list of
        # faults that apply to it is not rank 0's)
        self._ids = [i for i, f in enumerate(parsed) if f.applies(rank, generation)]
        self.faults = [parsed[i] for i in self._ids]
        self.rank = rank
        self.generation = generation
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.batches_per_step = max(1, int(batches_per_step))
        self._fired: set[int] = set()
        self._spike_from = 0
        self._spike_until = -1
        self._spike_factor = 1.0
        self._slow_seconds = 0.0
        self._slow_until: int | None = None
        self._drift: tuple[int, float, int] | None = None  # (from step, factor, ramp steps)
        self._nan_applied = False

    def _marker(self, i: int, f: Fault) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / f"{self._ids[i]}-{f.label}-rank{self.rank}.fired"

    def _claim(self, i: int, f: Fault) -> bool:
        """Whether event fault `i` fires now: not yet fired in this process, nor (gen=once) in
        any earlier process of the job. The marker is durable before the fault acts (a crash
        or SIGSTOP follows at once)."""
        if i in self._fired:
            return False
        self._fired.add(i)
        marker = self._marker(i, f) if f.gen == ONCE else None
        if marker is None:
            return True
        marker.parent.mkdir(parents=True, exist_ok=True)
        if f.rank == ALL and self._fired_in_another_generation(i, f):
            return False
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{time.time()} pid {os.getpid()} gen {self.generation}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _fired_in_another_generation(self, i: int, f: Fault) -> bool:
        """Whether job-wide event fault `i` already fired, in any rank, in a generation other than
        this one (a marker without a generation, from an older trainer, counts as fired)."""
        for path in self.state_dir.glob(f"{self._ids[i]}-{f.label}-rank*.fired"):
            try:
                words = path.read_text().split()
            except OSError:
                continue
            gen = words[words.index("gen") + 1] if "gen" in words[:-1] else None
            if gen != str(self.generation):
                return True
        return False

    def _due(self, kind: str, step: int) -> list[Fault]:
        return [f for i, f in enumerate(self.faults)
                if f.kind == kind and f.step == step and self._claim(i, f)]

    def _batches(self, f: Fault, steps: int = 1) -> range:
        """This rank's batch numbers (1-based) that an unbroken run trains on at the fault's
        step (and the `steps - 1` after it)."""
        b = self.batches_per_step
        return range((f.step - 1) * b + 1, (f.step - 1 + max(1, steps)) * b + 1)

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
            n = int(f.params.get("steps", 0))
            self._slow_until = step + n - 1 if n > 0 else None
        if self._slow_until is not None and step > self._slow_until:
            self._slow_seconds, self._slow_until = 0.0, None
        if self._slow_seconds:
            time.sleep(self._slow_seconds)
        for f in self._due("oom", step):
            _allocate_gib(float(f.params.get("gib", 64.0)))

    def clear_transient(self) -> None:
        """A rollback rewinds the steps: an LR spike in progress does not replay (data faults
        need no reset: they follow the batches)."""
        self._spike_until = -1
        self._drift = None

    def lr_factor(self, step: int) -> float:
        factor = self._spike_factor if self._spike_from <= step <= self._spike_until else 1.0
        if self._drift is not None and step >= self._drift[0]:
            start, peak, ramp = self._drift
            factor *= peak ** (min(step - start, ramp) / ramp)
        return factor

    def badbatch_fraction(self, batch: int) -> float:
        """Fraction of the rows of this rank's batch number `batch` (1-based) to corrupt (0.0: none)."""
        fracs = [min(1.0, max(0.0, float(f.params.get("frac", 1.0)))) for f in self.faults
                 if f.kind == "badbatch" and batch in self._batches(f, int(f.params.get("steps", 1)))]
        return max(fracs, default=0.0)

    def badbatch_now(self, batch: int) -> bool:
        return self.badbatch_fraction(batch) > 0.0

    def nan_now(self, batch: int) -> bool:
        """Whether the step whose last batch is `batch` gets a NaN gradient."""
        due = [f for f in self.faults if f.kind == "nan" and batch == self._batches(f)[-1]]
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
