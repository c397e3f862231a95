"""The wire protocol between trainer ranks and the daemon (docs/architecture.md §3, §5).

Everything that crosses the process boundary is defined here, once, as strict pydantic
models: the daemon validates every request against them (a malformed body is a 400 and
changes nothing), `replay` parses a spool with them, and the trainer side builds plain
dicts with the same field names (it must not import pydantic on the hot path).

Endpoints (daemon side, loopback by default):
  POST /v1/telemetry  TelemetryBatch  -> TelemetryReply   (rank 0 only)
  POST /v1/heartbeat  Heartbeat       -> {"ok": true}     (every rank; or batched per node in a
                                                           NodeReport's ``heartbeats``)

Failure model: the trainer sends from a background thread through a bounded queue; a dead
or slow daemon only costs dropped records, which are counted in the next record that gets
through (`dropped_records`). Directives carry an id; the trainer applies each id at most
once and reports it back in `events`, so the daemon can resend until acknowledged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from supervisor.hosts import NODE_NAME_PATTERN, is_address
from supervisor.wire import MAX_WIRE_INT, check_wall_time


def record_field(record: Any, name: str, default: Any = None) -> Any:
    """A field of a StepRecord, or of the same record as a plain dict (a spool line, a journal row)."""
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


class _Strict(BaseModel):
    # strict: a bool, a string or a float where an int is expected is an error, not converted
    # (``true`` was step 1, ``"35"`` step 35; a float field still takes an int)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Every number from the wire has a range (docs/architecture.md §3; issue "hostile input"): an
# integer past 2**53 is not a step of any real run and overflows SQLite's INTEGER at 2**63.
NonNegInt = Annotated[int, Field(ge=0, lt=MAX_WIRE_INT)]
Step = Annotated[int, Field(ge=1, lt=MAX_WIRE_INT)]
Generation = Annotated[int, Field(ge=0, lt=2**31)]
Rank = Annotated[int, Field(ge=0, lt=65536)]
Pid = Annotated[int, Field(ge=1, lt=2**22)]  # Linux pid_max is at most 2**22
Text = Annotated[str, Field(max_length=2000)]


def wire_context(now: float, *, future_s: float, past_s: float) -> dict:
    """The validation context under which a request's wall times must lie near the daemon's clock:
    pass it as ``Model.model_validate(obj, context=...)``. Without it (a spool replayed offline)
    wall times only have to be finite."""
    return {"now": now, "future_s": future_s, "past_s": past_s}


def _wall_time(v: float, info: ValidationInfo) -> float:
    ctx = info.context or {}
    if "now" in ctx:
        check_wall_time(v, ctx["now"], future_s=ctx["future_s"], past_s=ctx["past_s"])
    elif not math.isfinite(v):
        raise ValueError("must be finite")
    return v


class _Timed(_Strict):
    """A model with a ``wall_time`` that is finite and, under `wire_context`, near the daemon's clock."""

    wall_time: float

    @field_validator("wall_time")
    @classmethod
    def _in_window(cls, v: float, info: ValidationInfo) -> float:
        return _wall_time(v, info)


class StepRecord(_Timed):
    """One optimizer step as seen by rank 0 (losses and norms are already reduced)."""

    run_id: str = Field(min_length=1, max_length=128)
    generation: Generation
    step: Step
    loss: float  # NaN / inf allowed: that is what the non-finite detector looks for
    grad_norm: float  # pre-clip total norm; NaN / inf allowed
    lr: float
    lr_scale: Annotated[float, Field(ge=0)]
    tokens_per_s: Annotated[float, Field(ge=0)]
    step_seconds: Annotated[float, Field(ge=0)]
    peak_mem_gib: Annotated[float, Field(ge=0)] = 0.0
    update_skipped: bool = False
    skip_reason: Text | None = None
    samples_consumed: NonNegInt = 0
    tokens_seen: NonNegInt = 0
    wall_time: Annotated[float, Field(gt=0)]  # and near the daemon's clock (`_Timed`)
    # Per-rank seconds of this step, gathered to rank 0 every K steps (else None).
    rank_step_seconds: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(None, max_length=65536)
    dropped_records: NonNegInt = 0
    # rank 0's beats its node agent's relay did not take (agents backend), a running total
    dropped_heartbeats: NonNegInt = 0

    @field_validator("lr", "tokens_per_s", "step_seconds", "peak_mem_gib", "lr_scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class DirectiveApplied(_Timed):
    kind: Literal["directive_applied"]
    directive_id: str = Field(min_length=1, max_length=128)
    directive: str = Field(max_length=64)
    step: NonNegInt
    ok: bool
    detail: Text = ""
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None  # how long applying it took


class CheckpointSaved(_Timed):
    kind: Literal["checkpoint_saved"]
    step: NonNegInt
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TrainerStarted(_Timed):
    kind: Literal["started"]
    step: NonNegInt  # the step training resumes from (0 = fresh)
    skip_batches: NonNegInt = 0
    lr_scale: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    world_size: Annotated[int, Field(ge=1, lt=65536)] = 1
    dp_degree: Annotated[int, Field(ge=1, lt=65536)] = 1
    batches_per_step: Annotated[int, Field(ge=1, lt=65536)] = 1  # per rank: gradient accumulation x PP microbatches
    samples_consumed: NonNegInt = 0  # the global data position the generation starts from


class TrainerFinished(_Timed):
    kind: Literal["finished"]
    step: NonNegInt
    reason: Text = "completed"


Event = Annotated[
    Union[DirectiveApplied, CheckpointSaved, TrainerStarted, TrainerFinished],
    Field(discriminator="kind"),
]


class TelemetryBatch(_Strict):
    version: Literal[1] = 1
    run_id: str = Field(min_length=1, max_length=128)
    generation: Generation
    records: list[StepRecord] = Field(default_factory=list, max_length=10_000)
    events: list[Event] = Field(default_factory=list, max_length=10_000)

    @field_validator("records")
    @classmethod
    def _records_are_the_batchs(cls, records: list[StepRecord], info: ValidationInfo) -> list[StepRecord]:
        # the batch's run and generation decide whether it is ignored; a record naming another
        # one would be journaled under a run or generation it does not belong to
        run, gen = info.data.get("run_id"), info.data.get("generation")
        for i, r in enumerate(records):
            if r.run_id != run or r.generation != gen:
                raise ValueError(f"record {i} names run {r.run_id[:64]!r} generation {r.generation}, "
                                 f"not the batch's run {str(run)[:64]!r} generation {gen}")
        return records


class Heartbeat(_Timed):
    run_id: str = Field(min_length=1, max_length=128)
    generation: Generation
    rank: Rank
    step: NonNegInt
    pid: Pid
    host: str = Field(min_length=1, max_length=255)
    # What the rank's training thread is doing ("train_step", "checkpoint", "fault:hang"...):
    # evidence for naming the hung rank when the heartbeat thread is alive but training is not.
    phase: str = Field(default="", max_length=64)


# --- directives (daemon -> rank 0 -> broadcast to every rank) -----------------------------

DirectiveKind = Literal["set_lr_scale", "skip_updates", "checkpoint_now", "rollback", "stop",
                        "set_checkpoint_interval", "decay_now", "extend"]


class Directive(_Strict):
    """One instruction for the running trainer, applied at a step boundary on every rank."""

    id: str = Field(min_length=1, max_length=128)
    kind: DirectiveKind
    scale: Annotated[float, Field(gt=0, le=1000)] | None = None  # set_lr_scale
    ramp_steps: NonNegInt = 0  # set_lr_scale
    n: Annotated[int, Field(ge=1)] | None = None  # skip_updates, set_checkpoint_interval
    step: Annotated[int, Field(ge=0)] | None = None  # rollback target
    skip_batches: NonNegInt = 0  # rollback
    steps: Annotated[int, Field(ge=1)] | None = None  # extend: new total steps; decay_now: decay length
    lr_scale: Annotated[float, Field(gt=0, le=1000)] | None = None  # rollback: new scale (re-warmed)
    reason: str = ""


class TelemetryReply(_Strict):
    accepted: int
    directives: list[Directive] = Field(default_factory=list)


# --- node agents (docs/architecture.md "Node agents") -------------------------------------
#
#   POST /v1/nodes/report  NodeReport -> NodeReply      (one agent per node, agent token)
#
# One report per node per interval carries every rank of the node: at 2,048 nodes x 8 ranks
# the daemon handles 2,048 small requests a second, not 16,384. The reply carries the node's
# desired state (`NodeOrder`): the agent reconciles towards it, so a lost reply costs one
# interval, never a wrong action.

NodeName = Annotated[str, Field(min_length=1, max_length=255, pattern=NODE_NAME_PATTERN)]
ExitCode = Annotated[int, Field(ge=-255, le=255)]


class RankState(_Strict):
    """One rank process as its node's agent sees it (from /proc: no trainer cooperation)."""

    rank: Rank
    pid: Pid
    state: str = Field(default="", max_length=32)  # psutil status: running, sleeping, stopped (SIGSTOP), zombie


class NodeRankExit(_Timed):
    """A rank (or the node's torchrun) that ended, with torchrun's own evidence."""

    rank: Rank | None = None
    exitcode: ExitCode
    pid: Pid | None = None
    signal: str | None = Field(default=None, max_length=16)  # SIGKILL for exit code -9
    # ok | crash | signal | oom | hardware: the agent's reading of the log tail (the daemon's
    # detectors read the tail again; this is what `nodes` shows)
    classification: Literal["ok", "crash", "signal", "oom", "hardware"] = "crash"
    log_tail: list[Text] = Field(default_factory=list, max_length=200)


class KernelEvent(_Strict):
    """A kernel-log line that matched a hardware pattern (NVIDIA Xid, ECC, fell off the bus)."""

    pattern: str = Field(min_length=1, max_length=64)
    line: Text


class GpuHealth(_Strict):
    index: Annotated[int, Field(ge=0, lt=1024)]
    name: str = Field(default="", max_length=128)
    mem_used_gib: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    mem_total_gib: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    ecc_uncorrected: NonNegInt = 0
    temperature_c: Annotated[float, Field(ge=-100, le=300, allow_inf_nan=False)] | None = None


class NodeHealth(_Strict):
    mem_total_gib: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    mem_available_gib: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    disk_free_gib: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    load_1m: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    gpus: list[GpuHealth] = Field(default_factory=list, max_length=64)  # empty: no NVML or no GPU
    kernel: list[KernelEvent] = Field(default_factory=list, max_length=100)  # new since the last report


class NodeReport(_Timed):
    """Everything one node's agent has to say since its last report (one request per node)."""

    version: Literal[1] = 1
    run_id: str = Field(min_length=1, max_length=128)
    agent_id: NodeName  # must equal the name of the agent token presenting it
    node: NodeName  # the host the ranks run on (what exclusion and the policy count by)
    # where the node's ranks can be reached (the rendezvous host when this node is node rank 0): a
    # host name or a bare IP address, it goes into every node's torchrun argv
    address: str = Field(default="", max_length=255)
    seq: NonNegInt = 0  # the agent's report counter (a restarted agent starts again at 0)

    @field_validator("address")
    @classmethod
    def _an_address(cls, v: str) -> str:
        if v and not is_address(v):
            raise ValueError("is no host name or bare IP address")
        return v

    generation: Annotated[int, Field(ge=-1, lt=2**31)] = -1  # the generation it runs (-1: none)
    state: Literal["idle", "running", "exited", "stopped", "failed"] = "idle"
    node_rank: Annotated[int, Field(ge=0, lt=65536)] | None = None
    nnodes: Annotated[int, Field(ge=1, lt=65536)] | None = None
    torchrun_pid: Pid | None = None
    exit_code: ExitCode | None = None  # torchrun's, once state is exited/failed
    ranks: list[RankState] = Field(default_factory=list, max_length=1024)
    exits: list[NodeRankExit] = Field(default_factory=list, max_length=1024)
    # The node's ranks' heartbeats since the last report, relayed in one request (each exactly what
    # the rank would post to /v1/heartbeat; its ``host`` must be this report's ``node``): at
    # 2,048 nodes x 8 ranks the daemon takes 2,048 requests a second instead of 16,384.
    heartbeats: list[Heartbeat] = Field(default_factory=list, max_length=1024)
    health: NodeHealth | None = None
    stacks_id: str | None = Field(default=None, max_length=64)  # answers NodeOrder.stacks_id
    stacks: str | None = Field(default=None, max_length=200_000)


class NodeOrder(_Strict):
    """The desired state of one node: run `generation` with `argv` (or keep running it when
    `argv` is empty: a re-adopted generation), or run nothing (`generation` -1)."""

    generation: Annotated[int, Field(ge=-1, lt=2**31)] = -1
    argv: list[str] = Field(default_factory=list, max_length=512)
    env: dict[str, str] = Field(default_factory=dict)
    node_rank: Annotated[int, Field(ge=0, lt=65536)] | None = None
    nnodes: Annotated[int, Field(ge=1, lt=65536)] | None = None
    stop_grace_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 10.0
    stacks_id: str | None = Field(default=None, max_length=64)  # dump stacks once for this id


class NodeReply(_Strict):
    order: NodeOrder | None = None  # None: the daemon has no wish for this node (keep what you do)
    report_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    excluded: bool = False  # the node is drained: it runs nothing until readmitted
    # heartbeats of the report refused (a rank or pid not of the running generation), with the
    # first reason: the report itself was taken (exits and health count regardless)
    heartbeats_refused: NonNegInt = 0
    heartbeat_refusal: str | None = None
