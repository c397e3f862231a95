"""The on-call control plane: the daemon's /v1 read and command routes (docs/architecture.md §2, §8).

Mounted by `supervisor.api.build_app`. Every route here follows the same rules:

- **Auth** (`supervisor.auth`): with tokens configured (``server.token_file`` or
  ``TITAN_SUPERVISOR_TOKENS``) every route needs a bearer token: reads a viewer, commands an
  operator, ``policy`` an admin. No token or an unknown token is 401, too weak a role is 403.
  With no tokens configured (loopback only, settings refuse anything else) reads are open and
  commands are refused unless ``server.allow_unauthenticated_loopback`` is set, in which case
  they run as actor ``local``. ``/v1/alerts`` needs a token of role ``alerts`` (or operator,
  admin); with no tokens configured it is refused like a command.
- **Validation first**: a command body is checked (strict types, ranges, the checkpoint named
  by a rollback is in the catalog, valid, not quarantined, not ahead of the run) before
  anything happens; a refusal is 400 with ``{"error", "details"}`` and changes nothing.
- **One action at a time**: a command that acts while an action (the policy's or another
  operator's) is in flight is refused with 409 naming it. The check and the start happen in one
  step of the event loop, so of two concurrent commands exactly one starts.
- **Idempotency**: an action-starting command carries a ``request_id`` (the CLI makes one per
  invocation and reuses it on retries; the server makes one if absent). A request id seen
  before with the same command returns the first action (``replayed: true``) and starts
  nothing; with a different command it is 409.
- **Dry run**: ``dry_run: true`` returns the exact plan (``plan``) and does nothing else.
- **Audit**: every command, accepted or refused (401 and 403 included), is one row in the
  journal's ``commands`` table: who, when, what, reason, request id, result. Tokens never are.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from supervisor.alert_receiver import MAX_BODY as MAX_ALERT_BODY
from supervisor.alert_receiver import AlertmanagerPayload
from supervisor.auth import Principal, TokenStore
from supervisor.checkpoints import CheckpointNotFound, parse_step
from supervisor.detect.findings import Finding
from supervisor.policy import (KILL_RESTART_HANG, RESTART, ROLLBACK, ROLLBACK_LR_DOWN, SKIP_UPDATE, STOP_PAGE,
                               Decision)
from supervisor.run_plan import local_batch
from supervisor.run_state import ACTIVE, RESUMABLE, json_number
from supervisor.wire import WireError, ascii_int, json_safe, loads, read_body

MAX_BODY = 64 * 1024
STATUS_SCHEMA = 1
CONFIRMABLE = frozenset({SKIP_UPDATE, ROLLBACK, ROLLBACK_LR_DOWN, RESTART, KILL_RESTART_HANG, STOP_PAGE})


# --- request bodies ----------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Command(_Body):
    reason: str = Field(min_length=1, max_length=1000, description="Why (journaled with the command).")

    @field_validator("reason")
    @classmethod
    def _says_something(cls, v: str) -> str:
        if not v.strip():  # "   " was accepted: an audit row that says nothing
            raise ValueError("must say why (it is only whitespace)")
        return v

    dry_run: bool = Field(False, description="Only return the plan: what would happen. Changes nothing.")
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
                                   description="Idempotency key: a retry with the same id returns the first "
                                               "action instead of acting twice.")


class LightCommand(Command):
    wait_s: float = Field(10.0, ge=0, le=120, description="Seconds to wait for the trainer's acknowledgement.")


class RollbackBody(Command):
    to_step: int | str = Field(description="Checkpoint to roll back to: a step number or 'step-N'.")
    skip_batches: int = Field(0, ge=0, le=10**9, description="Batches per rank to drain after loading (bad data).")
    lr_scale: float | None = Field(None, gt=0, le=1000, description="New LR scale after the rollback (re-warmed).")
    ramp_steps: int = Field(0, ge=0, le=10**9, description="Re-warm length for lr_scale.")


class ReshardBody(Command):
    ranks: int = Field(ge=1, le=65535, description="Ranks per node of the next generation (its DP degree on "
                                                   "one node): fewer after a node loss, the full count to grow back.")


class LrBody(LightCommand):
    scale: float = Field(gt=0, le=1000, description="LR multiplier on top of the schedule.")
    ramp_steps: int = Field(0, ge=0, le=10**9, description="Move linearly to the new scale over this many steps.")


class SkipDataBody(LightCommand):
    batches: int = Field(ge=1, le=10**6, description="The next K batches are consumed without an update.")


class DecayNowBody(LightCommand):
    steps: int | None = Field(None, ge=1, le=10**12, description="Decay length (default: the schedule's).")


class ExtendBody(LightCommand):
    steps: int = Field(ge=1, le=10**12, description="New total number of training steps.")


class PolicyBody(Command):
    mode: Literal["auto", "advise", "off"] = Field(description="auto: act; advise: propose, a human confirms; "
                                                                "off: record only.")


class ErrorBody(BaseModel):
    error: str
    details: list[Any] = []


_ERRORS = {400: {"model": ErrorBody, "description": "Invalid input; nothing changed."},
           401: {"model": ErrorBody, "description": "No or unknown bearer token."},
           403: {"model": ErrorBody, "description": "The token's role is too weak."}}
_CMD_ERRORS = {**_ERRORS, 409: {"model": ErrorBody, "description": "Conflicts with the run's state, an action "
                                                                   "in flight, or a reused request id."}}


def _body_doc(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


class Refusal(Exception):
    def __init__(self, status: int, error: str, details: list | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.details = status, error, details or []

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": self.error, "details": self.details}, status_code=self.status,
                            headers=headers)


def _validation_details(e: ValidationError) -> list[dict]:
    return [{"field": ".".join(str(x) for x in err.get("loc", ())), "problem": err.get("msg", "")}
            for err in e.errors()]



def _new_request_id() -> str:
    return f"srv-{uuid.uuid4().hex}"


# --- one command = one spec ----------------------------------------------------------------

@dataclass(frozen=True)
class CommandSpec:
    """Everything the pipeline needs to know about one operator command.

    The pipeline (`ControlPlane.run`): auth -> body validation -> request-id replay -> busy check ->
    `plan` (validates against the run, may refuse; never changes anything) -> dry run, or `start`
    -> audit. `plan` and `describe` are what a dry run returns; `start` is the only step that acts.
    """

    name: str  # POST /v1/commands/<name> (ack/confirm have their own paths); the audit row's command
    body: type[Command]
    summary: str
    plan: Callable[["ControlPlane", Principal, Any, dict], dict]
    describe: Callable[[dict, Any], str]  # "roll back from step 33 to step 20, ..." (after "would")
    start: Callable[["ControlPlane", Principal, Any, dict, str], Awaitable[dict]]
    kind: str | None = None  # action kind, for request-id idempotency (None: not an action)
    keys: Callable[[Any, dict], dict] = lambda b, plan: {}  # what a replayed request must match
    role: str = "operator"
    exclusive: bool = True  # refused while another action runs
    path: str | None = None  # a route other than /v1/commands/<name>
    path_args: tuple[str, ...] = field(default=())
    replay: Callable[["ControlPlane", Any, dict], dict | None] | None = None  # instead of kind/keys


class ControlPlane:
    def __init__(self, sup, tokens: TokenStore | None = None) -> None:
        self.sup = sup
        self.tokens = tokens if tokens is not None else TokenStore.from_settings(sup.settings)
        self.alerts = sup.alerts  # the daemon's receiver: it enqueues, the daemon's task drains

    # -- auth / audit ----------------------------------------------------------------------
    def authorize(self, cred: HTTPAuthorizationCredentials | None, need: str) -> Principal:
        who = self.identify(cred, need)
        self.require(who, need)
        return who

    @staticmethod
    def require(who: Principal, need: str) -> None:
        if not who.allows(need):
            raise Refusal(403, f"token {who.name!r} has role {who.role}; this needs {need}")

    def identify(self, cred: HTTPAuthorizationCredentials | None, need: str) -> Principal:
        server = self.sup.settings.server
        if not self.tokens.configured:
            if need == "viewer":
                return Principal("anonymous", "viewer")
            if need == "alerts":  # a webhook is no human at a loopback shell: it needs its own token
                raise Refusal(401, "no tokens are configured on this supervisor, so the alerts webhook is "
                                   "refused: create one with `titan-supervisor token add alertmanager --role "
                                   "alerts --file FILE` and set server.token_file")
            if server.allow_unauthenticated_loopback and server.loopback:
                return Principal("local", "admin")
            raise Refusal(401, "no tokens are configured on this supervisor, so commands are refused: create "
                               "one with `titan-supervisor token add NAME --role operator --file FILE` and set "
                               "server.token_file (or server.allow_unauthenticated_loopback = true)")
        if cred is None or not cred.credentials:
            raise Refusal(401, "missing bearer token (Authorization: Bearer <token>)")
        who = self.tokens.authenticate(cred.credentials)
        if who is None:
            raise Refusal(401, "unknown or revoked token")
        return who

    def audit(self, who: Principal | None, command: str, args: dict, reason: str | None, request_id: str | None,
              accepted: bool, result: str) -> None:
        self.sup.journal.record_command(actor=who.name if who else "anonymous", role=who.role if who else None,
                                        command=command, args=args, reason=reason, request_id=request_id,
                                        accepted=accepted, result=result[:2000])

    # -- the pipeline ----------------------------------------------------------------------
    async def command(self, request: Request, cred, spec: CommandSpec, extra: dict):
        """Authorize, parse, validate, run and audit one command."""
        obj: Any = None
        parse_error = None
        raw = b""
        try:
            raw = await read_body(request, MAX_BODY)
            if not raw.strip():
                raise WireError(400, "a JSON body is required")
            obj = loads(raw)  # finite numbers only, invalid Unicode replaced: safe to audit
        except WireError as e:
            parse_error = e.message
        d = obj if isinstance(obj, dict) else {}
        reason = d.get("reason") if isinstance(d.get("reason"), str) else None
        rid = d.get("request_id") if isinstance(d.get("request_id"), str) else None
        args = {k: v for k, v in d.items() if k not in ("reason", "request_id")} if len(raw) <= 4096 else {}
        args.update({k: str(v)[:32] for k, v in extra.items()})
        who: Principal | None = None
        try:
            who = self.identify(cred, spec.role)
            self.require(who, spec.role)
            extra = {k: _int_arg(v, k) for k, v in extra.items()}  # path ids: after auth, audited
            if parse_error:
                raise Refusal(400, parse_error)
            if not isinstance(obj, dict):
                raise Refusal(400, f"body must be a JSON object (a {spec.body.__name__})")
            try:
                body = spec.body.model_validate(obj)
            except ValidationError as e:
                details = _validation_details(e)
                raise Refusal(400, f"invalid {spec.name} command: " + "; ".join(
                    f"{x['field']}: {x['problem']}" for x in details), details) from None
            payload = await self.run(spec, who, body, extra)
        except Refusal as r:
            self.audit(who, spec.name, args, reason, rid, False, f"{r.status} {r.error}")
            return r.response()
        self.audit(who, spec.name, args, reason, payload.get("request_id", rid), True,
                   f"200 {payload.get('message', 'ok')}")
        return JSONResponse(payload)

    async def run(self, spec: CommandSpec, who: Principal, b, extra: dict) -> dict:
        if not b.dry_run:
            if spec.replay is not None:
                r = spec.replay(self, b, extra)
            else:
                r = self.replayed(b.request_id, spec.kind, spec.keys(b, extra)) if spec.kind else None
            if r is not None:
                return r | {"command": spec.name}
        if spec.exclusive and not b.dry_run:
            self.ensure_idle()  # first: a racing second command learns what runs, not a side effect of it
        plan = spec.plan(self, who, b, extra)
        what = spec.describe(plan, b)
        if b.dry_run:
            return {"command": spec.name, "accepted": True, "dry_run": True, "plan": plan,
                    "message": f"dry run: would {what}"}
        rid = b.request_id or _new_request_id()
        out = await spec.start(self, who, b, plan, rid)
        return {"command": spec.name, "accepted": True, "dry_run": False, "replayed": False, "request_id": rid,
                "plan": plan, **out}

    # -- shared checks ---------------------------------------------------------------------
    def ensure_idle(self) -> None:
        a = self.sup.runner.current
        if a is not None:
            row = self.sup.journal.action(a.id) or {}
            raise Refusal(409, f"action {a.id} ({a.kind}, by {row.get('actor', 'policy')}) is in progress; "
                               "nothing was done. Retry when it has finished (see `titan-supervisor status`)",
                          [{"action_id": a.id, "kind": a.kind, "actor": row.get("actor")}])

    def ensure_trainer(self, what: str) -> None:
        if not self.sup.generations.alive():
            raise Refusal(409, f"{what} needs a running trainer, and none is running (state {self.sup.state})")

    def replayed(self, request_id: str | None, kind: str, keys: dict) -> dict | None:
        """The first action of a repeated request id, or None; a different command is a 409."""
        if request_id is None:
            return None
        row = self.sup.journal.action_by_request(request_id)
        if row is None:
            return None
        params = row.get("params") or {}
        if row["kind"] != kind or any(params.get(k) != v for k, v in keys.items()):
            shown = {k: params.get(k) for k in keys} if row["kind"] == kind else params
            raise Refusal(409, f"request id {request_id!r} was already used for action {row['id']} "
                               f"({row['kind']} {json.dumps(shown, default=str)}); "
                               "use a new request id for a different command")
        return {"accepted": True, "replayed": True, "request_id": request_id, "action_id": row["id"],
                "state": row["state"], "outcome": row.get("outcome"),
                "message": f"request {request_id} was already accepted as action {row['id']} ({row['state']}); "
                           "nothing new was done"}

    # -- rollback --------------------------------------------------------------------------
    def rollback_plan(self, to_step, skip_batches: int, lr_scale: float | None, ramp_steps: int) -> dict:
        sup = self.sup
        target = rollback_target(to_step)
        if sup.state == "finished":
            raise Refusal(409, "the run has finished; there is nothing to roll back")
        catalog = sup.catalog
        try:
            info = catalog.resolve(target)
        except CheckpointNotFound:
            q = [x for x in catalog.quarantined() if x["step"] == target]
            valid = sup.ledger.valid_steps()
            if q:
                raise Refusal(400, f"checkpoint step-{target} is in quarantine ({q[-1]['reason'] or 'set aside'}); "
                                   f"it cannot be a rollback target. Valid checkpoints: {valid}") from None
            raise Refusal(400, f"no checkpoint step-{target} in the catalog; valid checkpoints: {valid}") from None
        if not info.valid:
            raise Refusal(400, f"checkpoint step-{target} is not valid ({info.state}): {info.reason}")
        if target > sup.last_step and sup.last_step > 0:
            raise Refusal(400, f"checkpoint step-{target} is ahead of the run (at step {sup.last_step})")
        hot = sup.generations.alive()
        # earlier rollbacks' data windows after this checkpoint are skipped again (supervisor/data_lineage.py)
        carried = sup.remedies.carried_skip(target)
        return {
            "action": "rollback", "target_step": target, "checkpoint": str(info.path), "from_step": sup.last_step,
            "steps_to_redo": max(0, sup.last_step - target), "skip_batches": skip_batches,
            "carried_skip": carried, "batches_skipped": skip_batches + carried,
            "lr_scale": lr_scale if lr_scale is not None else sup.lr_scale,
            "ramp_steps": ramp_steps if lr_scale is not None else 0,
            "mode": "hot: the running trainer reloads step-%d in-process" % target if hot else
                    "cold: a new generation starts from step-%d" % target,
            "quarantine": [i.step for i in catalog.scan() if i.step > target],
        }

    async def start_rollback(self, who: Principal, b: RollbackBody, plan: dict, rid: str) -> dict:
        decision = Decision(action=ROLLBACK, reason=f"operator {who.name}: {b.reason}", rung=0,
                            target_step=plan["target_step"], skip_batches=b.skip_batches, lr_scale=b.lr_scale,
                            ramp_steps=plan["ramp_steps"])
        a = self.sup.runner.begin(decision, None, None, actor=who.name, request_id=rid)
        return {"action_id": a.id, "state": "running", "message": f"action {a.id}: {describe_rollback(plan, b)}"}

    # -- pause / resume --------------------------------------------------------------------
    def pause_plan(self, who, b, extra) -> dict:
        sup = self.sup
        if sup.state not in ACTIVE:
            raise Refusal(409, f"the run is {sup.state}; only a running run can be paused")
        self.ensure_trainer("pause")
        return {"action": "pause", "at_step": sup.last_step, "generation": sup.generation,
                "steps": "the trainer finishes its step, saves a checkpoint and exits; the run waits in state "
                         "'paused' until `resume`"}

    def resume_plan(self, who, b, extra) -> dict:
        sup = self.sup
        if sup.state not in RESUMABLE or sup.generations.alive():
            raise Refusal(409, f"the run is {sup.state}; resume applies to a paused or stopped run")
        load = sup.ledger.newest_valid_step()  # a query: a dry run moves nothing
        if load is None and sup.last_step > 0:
            raise Refusal(409, "no valid checkpoint to resume from; refusing to restart the run from scratch")
        return {"action": "resume", "load_step": load, "lr_scale": sup.lr_scale, "generation": sup.generation + 1}

    def reshard_plan(self, who, b, extra) -> dict:
        sup = self.sup
        if sup.state not in ACTIVE and sup.state not in RESUMABLE:
            raise Refusal(409, f"the run is {sup.state}; reshard applies to a running, paused or stopped run")
        if b.ranks == sup.ranks:
            raise Refusal(409, f"the run already uses {b.ranks} ranks per node")
        gb = sup.settings.training.global_batch_size
        mb = local_batch(sup.settings)
        if gb is not None and gb % (b.ranks * mb) != 0:
            raise Refusal(409, f"[training] global_batch_size {gb} is not a multiple of {b.ranks} ranks x local batch "
                               f"{mb}: the trainer could not keep the global batch by gradient accumulation")
        alive = sup.generations.alive()
        load = sup.ledger.newest_valid_step()  # a query: a dry run moves nothing
        if not alive and load is None and sup.last_step > 0:
            raise Refusal(409, "no valid checkpoint to restart from; refusing to restart the run from scratch")
        return {"action": "reshard", "ranks_from": sup.ranks, "ranks_to": b.ranks, "generation": sup.generation + 1,
                "global_batch": gb if gb is not None else f"{b.ranks} x {mb} (no [training] global_batch_size: it changes)",
                "load_step": f"a checkpoint saved at the next step boundary after {sup.last_step}" if alive else load,
                "data": "continues from the same global sample (training/data.py)"}

    async def start_heavy(self, kind: str, who: Principal, params: dict, rid: str, message: str) -> dict:
        a = self.sup.runner.start(kind, params, actor=who.name, request_id=rid)
        return {"action_id": a.id, "state": "running", "message": f"action {a.id}: {message}"}

    # -- directive commands ----------------------------------------------------------------
    def directive_plan(self, kind: str, directive: dict) -> dict:
        self.ensure_trainer(kind)
        return {"action": kind, "directive": directive,
                "at_step": f"the next step boundary after {self.sup.last_step}", "generation": self.sup.generation}

    async def start_directive(self, who: Principal, b: LightCommand, plan: dict, rid: str, *, command: str,
                              describe: str, on_ack: Callable[[Any], None] | None = None) -> dict:
        directive = plan["directive"]
        keys = {k: v for k, v in directive.items() if k != "kind"}
        a, d = self.sup.runner.send_directive(plan["action"], keys, directive, actor=who.name, request_id=rid,
                                              reason=f"{command} by {who.name}", on_ack=on_ack)
        ack = await self.sup.directives.wait(d.id, b.wait_s)
        out: dict = {"action_id": a.id, "directive": d.id}
        if ack is None:
            return out | {"applied": None, "message": f"action {a.id}: {describe}; queued as directive {d.id}, "
                                                      f"not yet acknowledged after {b.wait_s:g}s"}
        verdict = "applied" if ack.ok else "REFUSED by the trainer"
        return out | {"applied": ack.ok, "applied_at_step": ack.step, "detail": ack.detail,
                      "message": f"action {a.id}: {verdict} at step {ack.step}: {ack.detail}"}

    def set_lr_scale(self, scale: float) -> Callable[[Any], None]:
        def apply(ack) -> None:
            self.sup.status.lr_scale = scale
        return apply

    def set_total_steps(self, ack) -> None:
        m = re.search(r"(?:ends at|extended to) (\d+)", ack.detail or "")
        if m:
            self.sup.status.total_steps = int(m.group(1))

    def extend_plan(self, who, b: ExtendBody, extra) -> dict:
        sup = self.sup
        if b.steps <= sup.last_step:
            raise Refusal(400, f"extend to {b.steps} steps: the run is already at step {sup.last_step}")
        if sup.total_steps is not None and b.steps <= sup.total_steps:
            raise Refusal(400, f"extend to {b.steps} steps: the run is already {sup.total_steps} steps long "
                               "(use decay-now to end it earlier)")
        return self.directive_plan("extend", {"kind": "extend", "steps": b.steps})

    # -- policy / proposals / incidents ----------------------------------------------------
    async def start_policy(self, who: Principal, b: PolicyBody, plan: dict, rid: str) -> dict:
        sup = self.sup
        sup.mode = b.mode
        sup.journal.set_meta("mode", b.mode)
        sup.log.info("policy mode", mode=b.mode, previous=plan["from"], actor=who.name)
        return {"mode": b.mode, "message": f"policy mode {plan['from']} -> {b.mode}"}

    def proposals(self) -> list[dict]:
        """Advisory decisions that would act, not yet carried out, made in this generation."""
        sup = self.sup
        gen = sup.journal.generation(sup.generation) if sup.generation >= 0 else None
        since = gen["started_at"] if gen else 0.0
        taken = {a["decision_id"] for a in sup.journal.actions(limit=1000) if a.get("decision_id") is not None}
        return [{"decision_id": d["id"], "action": d["action"], "reason": d["reason"], "params": d["params"],
                 "incident_id": d["incident_id"], "created_at": d["created_at"], "finding_id": d["finding_id"]}
                for d in sup.journal.decisions(limit=200)
                if d["advisory"] and d["action"] in CONFIRMABLE and d["id"] not in taken and d["created_at"] >= since]

    def confirm_replayed(self, b: Command, extra: dict) -> dict | None:
        decision_id = extra["decision_id"]
        if b.request_id is None:
            return None
        row = self.sup.journal.action_by_request(b.request_id)
        if row is None:
            return None
        if row.get("decision_id") != decision_id:
            raise Refusal(409, f"request id {b.request_id!r} was already used for action {row['id']}")
        return {"command": "confirm", "accepted": True, "replayed": True, "request_id": b.request_id,
                "action_id": row["id"], "state": row["state"],
                "message": f"proposal {decision_id} was already confirmed as action {row['id']}"}

    def confirm_plan(self, who: Principal, b: Command, extra: dict) -> dict:
        decision_id = extra["decision_id"]
        prop = next((p for p in self.proposals() if p["decision_id"] == decision_id), None) \
            if 0 <= decision_id < 2**62 else None
        if prop is None:
            raise Refusal(409, f"decision {decision_id} is not a pending proposal (unknown, not advisory, "
                               "already carried out, or from an earlier generation); see GET /v1/proposals")
        params = {k: v for k, v in prop["params"].items() if k in Decision.__dataclass_fields__}
        decision = Decision.from_dict(params | {"advisory": False})
        if decision.action in (ROLLBACK, ROLLBACK_LR_DOWN):
            if decision.target_step is None:
                raise Refusal(409, f"proposal {decision_id} names no checkpoint")
            self.rollback_plan(decision.target_step, decision.skip_batches, None, 0)
        if decision.action == SKIP_UPDATE:
            self.ensure_trainer("skip_update")
        return {"decision_id": decision_id, **{k: v for k, v in decision.to_dict().items() if k != "reason"},
                "proposed": prop["reason"], "finding_id": prop["finding_id"], "incident_id": prop["incident_id"]}

    async def start_confirm(self, who: Principal, b: Command, plan: dict, rid: str) -> dict:
        fields = {k: v for k, v in plan.items() if k in Decision.__dataclass_fields__}
        decision = Decision.from_dict(fields | {"reason": f"confirmed by {who.name}: {b.reason} "
                                                          f"(proposed: {plan['proposed']})"})
        finding = self._finding(plan["finding_id"], plan["incident_id"])
        a = self.sup.runner.begin(decision, finding, plan["decision_id"], actor=who.name, request_id=rid)
        return {"action_id": a.id,
                "message": f"action {a.id}: carrying out proposal {plan['decision_id']} ({decision.action})"}

    def _finding(self, finding_id: int | None, incident_id: int | None) -> Finding | None:
        if finding_id is None:
            return None
        j = self.sup.journal
        rows = j.findings(incident_id=incident_id, limit=10_000) if incident_id else j.findings(limit=10_000)
        r = next((f for f in rows if f["id"] == finding_id), None)
        if r is None:
            return None
        try:
            return Finding(kind=r["kind"], step=r["step"] or 0, severity=r["severity"],
                           wall_time=r["wall_time"] or time.time(), evidence=r["evidence"] or {}, rank=r["rank"])
        except ValueError:
            return None

    def ack_plan(self, who: Principal, b: Command, extra: dict) -> dict:
        incident_id = extra["incident_id"]
        inc = self.sup.journal.incident(incident_id) if 0 <= incident_id < 2**62 else None
        if inc is None:
            raise Refusal(404, f"no incident {incident_id}")
        return {"incident_id": incident_id, "state": inc["state"], "acked_by": who.name}

    async def start_ack(self, who: Principal, b: Command, plan: dict, rid: str) -> dict:
        j = self.sup.journal
        incident_id = plan["incident_id"]
        new = j.ack_incident(incident_id, who.name)
        inc = j.incident(incident_id)
        msg = (f"incident {incident_id} acknowledged by {who.name}" if new else
               f"incident {incident_id} was already acknowledged by {inc['acked_by']}")
        return {"incident": inc, "message": msg}

    # -- read views ------------------------------------------------------------------------
    def status(self) -> dict:
        sup = self.sup
        r = sup.last_record
        a = sup.runner.current
        incidents = [{"id": i["id"], "kind": i["kind"], "onset_step": i["onset_step"], "state": i["state"],
                      "opened_at": i["opened_at"], "acked_by": i["acked_by"], "summary": i["summary"]}
                     for i in sup.journal.incidents(state="unresolved", limit=50)]
        action = None
        if a is not None:
            row = sup.journal.action(a.id) or {}
            action = {"id": a.id, "kind": a.kind, "actor": row.get("actor"), "since": row.get("created_at"),
                      "params": a.params}
        proposals = len(self.proposals()) if sup.mode == "advise" else 0
        valid = sup.ledger.valid_steps()
        return {
            "schema": STATUS_SCHEMA, "run_id": sup.settings.run.run_id, "state": sup.state, "mode": sup.mode,
            "generation": sup.generation, "step": sup.last_step, "total_steps": sup.total_steps,
            "loss": json_number(r.loss) if r else None, "grad_norm": json_number(r.grad_norm) if r else None,
            "tokens_per_s": r.tokens_per_s if r else None, "lr": r.lr if r else None, "lr_scale": sup.lr_scale,
            "last_known_good": sup.last_known_good, "newest_checkpoint": valid[-1] if valid else None,
            "open_incidents": incidents, "action": action, "policy_now": self._policy_now(action, incidents, proposals),
            "proposals": proposals, "pending_directives": sorted(sup.directives.pending),
            "trainer_pids": dict(sup.gen.rank_pids) if sup.gen else {},
            "layout": sup.generations.layout_label,  # None: the preset's own parallelism
            "nodes": {"excluded": sorted(sup.nodes.excluded), "live": [v.node for v in sup.nodes.live()],
                      "in_generation": list(getattr(sup.gen, "nodes", ()) or ()),
                      "returning": sup.grow.view()},
            "checkpoint_interval": sup.interval.current,
            "recommended_checkpoint_interval": sup.interval.view(),
            "updated_at": r.wall_time if r else None,
        }

    def _policy_now(self, action: dict | None, incidents: list[dict], proposals: int) -> str:
        mode = self.sup.mode
        if action is not None:
            return f"acting: {action['kind']} (action {action['id']}, by {action['actor']})"
        if mode == "off":
            return "off: recording findings only, no decisions carried out"
        if mode == "advise":
            return (f"advising: {proposals} proposal(s) wait for confirmation" if proposals else
                    "advising: watching, proposals need a human to confirm")
        if incidents:
            return f"watching incident {incidents[0]['id']} ({incidents[0]['kind']})"
        return "watching"

    def checkpoints(self) -> dict:
        sup = self.sup
        lkg = sup.last_known_good
        rows = [{"step": i.step, "state": i.state, "valid": i.valid, "reason": i.reason, "pinned": i.pinned,
                 "last_known_good": i.step == lkg, "size_bytes": i.size_bytes, "mtime": i.mtime,
                 "path": str(i.path)} for i in sup.catalog.scan()]
        return {"checkpoints": rows, "quarantined": sup.catalog.quarantined(), "last_known_good": lkg}

    def audit_rows(self, limit: int) -> list[dict]:
        j = self.sup.journal
        out = []
        for c in j.commands(limit=limit):
            row = dict(c)
            if c.get("request_id"):
                a = j.action_by_request(c["request_id"])
                if a is not None:
                    row["action"] = {"id": a["id"], "kind": a["kind"], "state": a["state"], "outcome": a["outcome"]}
            out.append(json_safe(row))  # rows journaled before sanitizing may hold inf
        return out


def describe_rollback(plan: dict, b: RollbackBody) -> str:
    carried = plan.get("carried_skip", 0)
    also = f" (+{carried} an earlier rollback skipped after step {plan['target_step']}, skipped again)" if carried else ""
    return (f"roll back from step {plan['from_step']} to step {plan['target_step']}, skip {b.skip_batches} batches{also}, "
            f"LR scale {plan['lr_scale']:g}; {len(plan['quarantine'])} newer checkpoint(s) to quarantine")


def _directive(command: str, kind: str, body: type[LightCommand], summary: str, directive: Callable[[Any], dict],
               describe: Callable[[Any], str], on_ack: Callable[["ControlPlane", Any], Any] | None = None,
               plan: Callable | None = None) -> CommandSpec:
    """A command that is one trainer directive, acknowledged at the next step boundary."""
    return CommandSpec(
        name=command, body=body, summary=summary, kind=kind,
        keys=lambda b, extra: {k: v for k, v in directive(b).items() if k != "kind"},
        plan=plan or (lambda cp, who, b, extra: cp.directive_plan(kind, directive(b))),
        describe=lambda p, b: describe(b),
        start=lambda cp, who, b, p, rid: cp.start_directive(
            who, b, p, rid, command=command, describe=describe(b),
            on_ack=on_ack(cp, b) if on_ack else None))


#: every operator command, in the order of `titan-supervisor --help`
COMMAND_SPECS: tuple[CommandSpec, ...] = (
    CommandSpec(
        name="rollback", body=RollbackBody, kind=ROLLBACK,
        summary="Roll back to a checkpoint (hot if a trainer runs, else cold)",
        keys=lambda b, extra: {"target_step": rollback_target(b.to_step), "skip_batches": b.skip_batches,
                               "lr_scale": b.lr_scale, "ramp_steps": b.ramp_steps if b.lr_scale is not None else 0},
        plan=lambda cp, who, b, extra: cp.rollback_plan(b.to_step, b.skip_batches, b.lr_scale, b.ramp_steps),
        describe=describe_rollback, start=ControlPlane.start_rollback),
    CommandSpec(
        name="pause", body=Command, kind="pause",
        summary="Finish the step, checkpoint, stop the generation, keep state",
        plan=ControlPlane.pause_plan,
        describe=lambda p, b: f"pause at step {p['at_step']} (checkpoint, then stop)",
        start=lambda cp, who, b, p, rid: cp.start_heavy("pause", who, {"reason": b.reason}, rid,
                                                        f"pausing at step {p['at_step']}")),
    CommandSpec(
        name="resume", body=Command, kind="resume",
        summary="Start a new generation from the newest valid checkpoint",
        plan=ControlPlane.resume_plan,
        describe=lambda p, b: f"start generation {p['generation']} from {_where(p)}",
        start=lambda cp, who, b, p, rid: cp.start_heavy("resume", who, {"reason": b.reason, "load_step": p["load_step"]},
                                                        rid, f"resuming from {_where(p)}")),
    CommandSpec(
        name="reshard", body=ReshardBody, kind="reshard",
        summary="Restart on N ranks per node from the same checkpoint, keeping the exact data position",
        plan=ControlPlane.reshard_plan,
        describe=lambda p, b: f"reshard {p['ranks_from']} -> {p['ranks_to']} ranks from {p['load_step']}",
        start=lambda cp, who, b, p, rid: cp.start_heavy(
            "reshard", who, {"reason": b.reason, "ranks": b.ranks, "ranks_from": p["ranks_from"]}, rid,
            f"resharding {p['ranks_from']} -> {p['ranks_to']} ranks")),
    _directive("lr", "lr", LrBody, "Set the LR scale (optionally ramped)",
               lambda b: {"kind": "set_lr_scale", "scale": b.scale, "ramp_steps": b.ramp_steps},
               lambda b: f"set the LR scale to {b.scale:g} over {b.ramp_steps} steps",
               on_ack=lambda cp, b: cp.set_lr_scale(b.scale)),
    _directive("skip-data", "skip_data", SkipDataBody, "Consume the next K batches without an optimizer update",
               lambda b: {"kind": "skip_updates", "n": b.batches},
               lambda b: f"skip the next {b.batches} batches (no update)"),
    _directive("checkpoint-now", "checkpoint_now", LightCommand, "Save a checkpoint at the next step boundary",
               lambda b: {"kind": "checkpoint_now"}, lambda b: "save a checkpoint at the next step boundary"),
    _directive("decay-now", "decay_now", DecayNowBody, "Start the WSD decay at this step",
               lambda b: {"kind": "decay_now"} | ({"steps": b.steps} if b.steps else {}),
               lambda b: f"start the LR decay now ({b.steps or 'default'} decay steps)",
               on_ack=lambda cp, b: cp.set_total_steps),
    _directive("extend", "extend", ExtendBody, "Make the run N steps long in total",
               lambda b: {"kind": "extend", "steps": b.steps}, lambda b: f"extend the run to {b.steps} steps",
               on_ack=lambda cp, b: cp.set_total_steps, plan=ControlPlane.extend_plan),
    CommandSpec(
        name="policy", body=PolicyBody, role="admin", exclusive=False, path="/policy",
        summary="Set the policy mode (admin): auto | advise | off",
        plan=lambda cp, who, b, extra: {"from": cp.sup.mode, "to": b.mode},
        describe=lambda p, b: f"set the policy mode {p['from']} -> {p['to']}",
        start=ControlPlane.start_policy),
    CommandSpec(
        name="ack", body=Command, exclusive=False, path="/incidents/{incident_id}/ack", path_args=("incident_id",),
        summary="Acknowledge an incident (take ownership)",
        plan=ControlPlane.ack_plan,
        describe=lambda p, b: f"acknowledge incident {p['incident_id']} as {p['acked_by']}",
        start=ControlPlane.start_ack),
    CommandSpec(
        name="confirm", body=Command, path="/proposals/{decision_id}/confirm", path_args=("decision_id",),
        summary="Advise mode: carry out a proposed decision",
        replay=ControlPlane.confirm_replayed, plan=ControlPlane.confirm_plan,
        describe=lambda p, b: f"carry out proposal {p['decision_id']} ({p['action']})",
        start=ControlPlane.start_confirm),
)
COMMANDS = tuple(s.name for s in COMMAND_SPECS if s.path is None)


def rollback_target(to_step) -> int:
    try:
        return parse_step(to_step)
    except ValueError as e:
        raise Refusal(400, f"invalid rollback target: {e}") from None


def _where(plan: dict) -> str:
    return f"step {plan['load_step']}" if plan["load_step"] is not None else "scratch"


# --- routes --------------------------------------------------------------------------------

def build_router(sup, tokens: TokenStore | None = None, *, extra_specs: tuple[CommandSpec, ...] = (),
                 extra_routes: Callable | None = None) -> APIRouter:
    """The /v1 routes: reads (viewer), one route per `CommandSpec` (these and ``extra_specs``), the
    Alertmanager receiver, and ``extra_routes(router, control_plane, cred_dep)`` (the node agents')."""
    cp = ControlPlane(sup, tokens)
    bearer = HTTPBearer(auto_error=False, description="A token from `titan-supervisor token add`.")
    r = APIRouter(prefix="/v1")
    cred_dep = Security(bearer)
    if extra_routes is not None:
        # first: routes are matched in order, twice per request, and the node agents' report is
        # the hot route (thousands a second; 50 regex matches before it cost more than its work)
        extra_routes(r, cp, cred_dep)
    _read_routes(r, cp, cred_dep)
    for spec in COMMAND_SPECS + tuple(extra_specs):
        _command_route(r, cp, spec, cred_dep)
    _unknown_command_route(r, cp, cred_dep)
    _alert_route(r, cp, cred_dep)
    return r


def _read_routes(r: APIRouter, cp: ControlPlane, cred_dep) -> None:
    sup = cp.sup

    def read(cred, fn):
        try:
            cp.authorize(cred, "viewer")
        except Refusal as e:
            return e.response()
        return fn()

    # -- reads -----------------------------------------------------------------------------
    @r.get("/status", tags=["read"], responses=_ERRORS,
           summary="What the run and the supervisor are doing now (schema documented in README 'On-call CLI')")
    async def status(cred: HTTPAuthorizationCredentials | None = cred_dep):
        return read(cred, cp.status)

    @r.get("/incidents", tags=["read"], responses=_ERRORS, summary="Incidents, newest first")
    async def incidents(state: Literal["open", "acked", "closed", "unresolved"] | None = None,
                        limit: int = 50, cred: HTTPAuthorizationCredentials | None = cred_dep):
        if not 1 <= limit <= 1000:
            return Refusal(400, "limit must be between 1 and 1000").response()
        return read(cred, lambda: {"incidents": sup.journal.incidents(state=state, limit=limit)})

    @r.get("/incidents/{incident_id}", tags=["read"], responses={**_ERRORS, 404: {"model": ErrorBody}},
           summary="One incident with its findings, decisions and actions")
    async def incident(incident_id: int, cred: HTTPAuthorizationCredentials | None = cred_dep):
        def get():
            if not 0 <= incident_id < 2**62:
                return Refusal(400, "incident id out of range").response()
            inc = sup.journal.incident_detail(incident_id)
            if inc is None:
                return Refusal(404, f"no incident {incident_id}").response()
            end = inc["closed_at"] or time.time()
            inc["operator_actions"] = [a for a in sup.journal.actions(limit=1000)
                                       if a["actor"] != "policy" and inc["opened_at"] <= a["created_at"] <= end]
            return inc
        return read(cred, get)

    @r.get("/checkpoints", tags=["read"], responses=_ERRORS,
           summary="Checkpoints with validity, pins, last-known-good, and the quarantine")
    async def checkpoints(cred: HTTPAuthorizationCredentials | None = cred_dep):
        try:
            cp.authorize(cred, "viewer")
        except Refusal as e:
            return e.response()
        return await asyncio.to_thread(cp.checkpoints)

    @r.get("/actions", tags=["read"], responses=_ERRORS, summary="Actions (policy and operator), newest first")
    async def actions(limit: int = 50, cred: HTTPAuthorizationCredentials | None = cred_dep):
        if not 1 <= limit <= 1000:
            return Refusal(400, "limit must be between 1 and 1000").response()
        return read(cred, lambda: {"actions": sup.journal.actions(limit=limit)})

    @r.get("/actions/{action_id}", tags=["read"], responses={**_ERRORS, 404: {"model": ErrorBody}},
           summary="One action: intent, running, done or failed, with its outcome")
    async def action(action_id: int, cred: HTTPAuthorizationCredentials | None = cred_dep):
        def get():
            a = sup.journal.action(action_id) if 0 <= action_id < 2**62 else None
            return a if a is not None else Refusal(404, f"no action {action_id}").response()
        return read(cred, get)

    @r.get("/audit", tags=["read"], responses=_ERRORS,
           summary="Every operator command, accepted or refused: who, when, what, reason, result")
    async def audit(limit: int = 50, cred: HTTPAuthorizationCredentials | None = cred_dep):
        if not 1 <= limit <= 10000:
            return Refusal(400, "limit must be between 1 and 10000").response()
        return read(cred, lambda: {"commands": cp.audit_rows(limit)})

    @r.get("/policy", tags=["read"], responses=_ERRORS, summary="The policy mode and its pending proposals")
    async def policy(cred: HTTPAuthorizationCredentials | None = cred_dep):
        return read(cred, lambda: {"mode": sup.mode, "proposals": cp.proposals()})

    @r.get("/proposals", tags=["read"], responses=_ERRORS,
           summary="Advise mode: decisions the policy proposes, waiting for a human to confirm")
    async def proposals(cred: HTTPAuthorizationCredentials | None = cred_dep):
        return read(cred, lambda: {"mode": sup.mode, "proposals": cp.proposals()})



def _unknown_command_route(r: APIRouter, cp: ControlPlane, cred_dep) -> None:
    @r.post("/commands/{command}", tags=["commands"], responses=_CMD_ERRORS, include_in_schema=False)
    async def unknown(command: str, request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        who = None
        try:
            who = cp.identify(cred, "operator")
            cp.require(who, "operator")
            raise Refusal(400, f"unknown command {command[:64]!r}; known: {', '.join(COMMANDS)}")
        except Refusal as e:
            cp.audit(who, command[:64], {}, None, None, False, f"{e.status} {e.error}")
            return e.response()



def _alert_route(r: APIRouter, cp: ControlPlane, cred_dep) -> None:
    @r.post("/alerts", tags=["alerts"], openapi_extra=_body_doc(AlertmanagerPayload),
            responses={**_ERRORS, 202: {"description": "Alerts queued (de-duplicated and capped); ignored ones listed"}},
            summary="Alertmanager webhook (token role alerts): firing alerts labelled with a node are queued "
                    "to become hardware findings")
    async def alerts(request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        try:
            cp.authorize(cred, "alerts")
            try:
                obj = loads(await read_body(request, MAX_ALERT_BODY))
            except WireError as e:
                raise Refusal(e.status, e.message) from None
            try:
                payload = AlertmanagerPayload.model_validate(obj)
            except ValidationError as e:
                raise Refusal(400, "body is not an Alertmanager webhook payload", _validation_details(e)) from None
        except Refusal as e:
            return e.response()
        return JSONResponse(cp.alerts.receive(payload), status_code=202)



def _int_arg(value, what: str) -> int:
    """A path id: ASCII digits only (``int()`` took "１", " 1", "+1" and "1_0")."""
    n = ascii_int(value)
    if n is None:
        raise Refusal(400, f"{what} must be a number of at most 18 digits, got {str(value)[:32]!r}")
    return n


def _command_route(r: APIRouter, cp: ControlPlane, spec: CommandSpec, cred_dep) -> None:
    async def handler(request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        return await cp.command(request, cred, spec, {k: request.path_params[k] for k in spec.path_args})
    errors = {**_CMD_ERRORS, **({404: {"model": ErrorBody}} if spec.name == "ack" else {})}
    r.add_api_route(spec.path or f"/commands/{spec.name}", handler, methods=["POST"], tags=["commands"],
                    summary=spec.summary, responses=errors, openapi_extra=_body_doc(spec.body),
                    name=f"command_{spec.name.replace('-', '_')}")
