"""The on-call control plane: the daemon's /v1 read and command routes (DESIGN.md §2, §6).

Mounted by `supervisor.api.build_app`. Every route here follows the same rules:

- **Auth** (`supervisor.auth`): with tokens configured (``server.token_file`` or
  ``TITAN_SUPERVISOR_TOKENS``) every route needs a bearer token: reads a viewer, commands an
  operator, ``policy`` an admin. No token or an unknown token is 401, too weak a role is 403.
  With no tokens configured (loopback only, settings refuse anything else) reads are open and
  commands are refused unless ``server.allow_unauthenticated_loopback`` is set, in which case
  they run as actor ``local``. ``/v1/alerts`` needs an operator token once tokens exist and is
  open on loopback otherwise (Alertmanager on the same host, like the trainers' telemetry).
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
import time
import uuid
from typing import Any, Awaitable, Callable, Literal

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supervisor.auth import Principal, TokenStore
from supervisor.checkpoints import CheckpointNotFound, parse_step
from supervisor.daemon import _num
from supervisor.detect.findings import Finding
from supervisor.policy import (KILL_RESTART_HANG, RESTART, ROLLBACK, ROLLBACK_LR_DOWN, SKIP_UPDATE, STOP_PAGE,
                               Decision)

MAX_BODY = 64 * 1024
STATUS_SCHEMA = 1
CONFIRMABLE = frozenset({SKIP_UPDATE, ROLLBACK, ROLLBACK_LR_DOWN, RESTART, KILL_RESTART_HANG, STOP_PAGE})
RUNNING_STATES = ("starting", "running", "recovering")
RESUMABLE_STATES = ("paused", "stopped", "failed")


# --- request bodies ----------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Command(_Body):
    reason: str = Field(min_length=1, max_length=1000, description="Why (journaled with the command).")
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


class AlertmanagerAlert(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = ""


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook body (version 4)."""

    model_config = ConfigDict(extra="allow")
    version: str
    status: Literal["firing", "resolved"]
    alerts: list[AlertmanagerAlert] = Field(max_length=1000)
    receiver: str = ""
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""


class ErrorBody(BaseModel):
    error: str
    details: list[Any] = []


NODE_LABELS = ("node", "Hostname", "hostname", "host", "kubernetes_node", "nodename", "instance")

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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _validation_details(e: ValidationError) -> list[dict]:
    return [{"field": ".".join(str(x) for x in err.get("loc", ())), "problem": err.get("msg", "")}
            for err in e.errors()]


# --- the control plane -------------------------------------------------------------------

class ControlPlane:
    def __init__(self, sup, tokens: TokenStore | None = None) -> None:
        self.sup = sup
        self.tokens = tokens if tokens is not None else TokenStore.from_settings(sup.settings)

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

    def audit(self, actor: str, role: str | None, command: str, args: dict, reason: str | None,
              request_id: str | None, accepted: bool, result: str) -> None:
        self.sup.journal.record_command(actor=actor, role=role, command=command, args=args, reason=reason,
                                        request_id=request_id, accepted=accepted, result=result[:2000])

    async def command(self, request: Request, cred, command: str, need: str, model: type[BaseModel] | None,
                      handler: Callable[[Principal, Any], Awaitable[dict]], extra_args: dict | None = None):
        """Authorize, parse, validate, run and journal one command."""
        raw = await request.body()
        obj: Any = None
        parse_error = None
        if len(raw) > MAX_BODY:
            parse_error = f"body is {len(raw)} bytes; the limit is {MAX_BODY}"
        elif raw.strip():
            try:
                obj = json.loads(raw, parse_constant=_reject_constant)
            except (ValueError, UnicodeDecodeError) as e:
                parse_error = f"body is not JSON: {e}"
        elif model is not None:
            parse_error = "a JSON body is required"
        d = obj if isinstance(obj, dict) else {}
        reason = d.get("reason") if isinstance(d.get("reason"), str) else None
        rid = d.get("request_id") if isinstance(d.get("request_id"), str) else None
        args = {k: v for k, v in d.items() if k not in ("reason", "request_id")} if len(raw) <= 4096 else {}
        args.update(extra_args or {})
        who: Principal | None = None
        try:
            who = self.identify(cred, need)
            self.require(who, need)
            if parse_error:
                raise Refusal(400, parse_error)
            if model is not None:
                if not isinstance(obj, dict):
                    raise Refusal(400, f"body must be a JSON object (a {model.__name__})")
                try:
                    body = model.model_validate(obj)
                except ValidationError as e:
                    raise Refusal(400, f"invalid {command} command: " + "; ".join(
                        f"{x['field']}: {x['problem']}" for x in _validation_details(e)),
                        _validation_details(e)) from None
            else:
                body = None
            payload = await handler(who, body)
        except Refusal as r:
            self.audit(who.name if who else "anonymous", who.role if who else None, command, args, reason, rid,
                       False, f"{r.status} {r.error}")
            return r.response()
        rid = payload.get("request_id", rid)
        self.audit(who.name, who.role, command, args, reason, rid, True, f"200 {payload.get('message', 'ok')}")
        return JSONResponse(payload)

    # -- shared checks ---------------------------------------------------------------------
    def ensure_idle(self) -> None:
        a = self.sup.action
        if a is not None:
            row = self.sup.journal.action(a.id) or {}
            raise Refusal(409, f"action {a.id} ({a.kind}, by {row.get('actor', 'policy')}) is in progress; "
                               "nothing was done. Retry when it has finished (see `titan-supervisor status`)",
                          [{"action_id": a.id, "kind": a.kind, "actor": row.get("actor")}])

    def trainer_alive(self) -> bool:
        g = self.sup.gen
        return g is not None and g.exited is None and g.alive()

    def ensure_trainer(self, what: str) -> None:
        if not self.trainer_alive():
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
            raise Refusal(409, f"request id {request_id!r} was already used for action {row['id']} "
                               f"({row['kind']} {json.dumps({k: params.get(k) for k in keys} if row['kind'] == kind else params, default=str)}); "
                               "use a new request id for a different command")
        return {"accepted": True, "replayed": True, "request_id": request_id, "action_id": row["id"],
                "state": row["state"], "outcome": row.get("outcome"),
                "message": f"request {request_id} was already accepted as action {row['id']} ({row['state']}); "
                           "nothing new was done"}

    def start_action(self, kind: str, params: dict, who: Principal, request_id: str):
        """Journal the intent and run a heavy operator action (pause/resume) as THE action."""
        from supervisor.daemon import ActiveAction

        sup = self.sup
        params = dict(params, generation=sup.generation, from_step=sup.last_step)
        intent = sup.journal.action_intent(kind, params, actor=who.name, request_id=request_id)
        a = ActiveAction(intent.id, kind, params, None, None)
        sup.action = a
        sup._spawn(sup._run_action(a))
        return a

    # -- rollback --------------------------------------------------------------------------
    def quarantined(self) -> list[dict]:
        out = []
        qdir = self.sup.catalog.quarantine_dir
        for p in sorted(qdir.glob("step-*")):
            if not p.is_dir():
                continue
            name = p.name
            try:
                step = int(name[5:].split(".")[0])
            except ValueError:
                continue
            note = {}
            try:
                note = json.loads(p.with_name(name + ".reason.json").read_text())
            except (OSError, ValueError):
                pass
            out.append({"step": step, "name": name, "path": str(p), "reason": note.get("reason", ""),
                        "at": note.get("at")})
        return sorted(out, key=lambda q: (q["step"], q["name"]))

    def rollback_plan(self, b: RollbackBody, target: int) -> dict:
        sup = self.sup
        if sup.state == "finished":
            raise Refusal(409, "the run has finished; there is nothing to roll back")
        try:
            info = sup.catalog.resolve(target)
        except CheckpointNotFound:
            q = [x for x in self.quarantined() if x["step"] == target]
            valid = [i.step for i in sup.catalog.scan() if i.valid]
            if q:
                raise Refusal(400, f"checkpoint step-{target} is in quarantine ({q[-1]['reason'] or 'set aside'}); "
                                   f"it cannot be a rollback target. Valid checkpoints: {valid}") from None
            raise Refusal(400, f"no checkpoint step-{target} in the catalog; valid checkpoints: {valid}") from None
        if not info.valid:
            raise Refusal(400, f"checkpoint step-{target} is not valid ({info.state}): {info.reason}")
        if target > sup.last_step and sup.last_step > 0:
            raise Refusal(400, f"checkpoint step-{target} is ahead of the run (at step {sup.last_step})")
        newer = [i.step for i in sup.catalog.scan() if i.step > target]
        hot = self.trainer_alive()
        return {
            "action": "rollback", "target_step": target, "checkpoint": str(info.path), "from_step": sup.last_step,
            "steps_to_redo": max(0, sup.last_step - target), "skip_batches": b.skip_batches,
            "lr_scale": b.lr_scale if b.lr_scale is not None else sup.lr_scale,
            "ramp_steps": b.ramp_steps if b.lr_scale is not None else 0,
            "mode": "hot: the running trainer reloads step-%d in-process" % target if hot else
                    "cold: a new generation starts from step-%d" % target,
            "quarantine": newer,
        }

    async def rollback(self, who: Principal, b: RollbackBody) -> dict:
        try:
            target = parse_step(b.to_step)
        except ValueError as e:
            raise Refusal(400, f"invalid rollback target: {e}") from None
        keys = {"target_step": target, "skip_batches": b.skip_batches, "lr_scale": b.lr_scale,
                "ramp_steps": b.ramp_steps if b.lr_scale is not None else 0}
        if not b.dry_run and (r := self.replayed(b.request_id, ROLLBACK, keys)):
            return r | {"command": "rollback"}
        if not b.dry_run:
            self.ensure_idle()  # first: a racing second command learns what runs, not a side effect of it
        plan = self.rollback_plan(b, target)
        msg = (f"roll back from step {plan['from_step']} to step {target}, skip {b.skip_batches} batches, "
               f"LR scale {plan['lr_scale']:g}; {len(plan['quarantine'])} newer checkpoint(s) to quarantine")
        if b.dry_run:
            return {"command": "rollback", "accepted": True, "dry_run": True, "plan": plan,
                    "message": "dry run: would " + msg}
        rid = b.request_id or f"srv-{uuid.uuid4().hex}"
        decision = Decision(action=ROLLBACK, reason=f"operator {who.name}: {b.reason}", rung=0, target_step=target,
                            skip_batches=b.skip_batches, lr_scale=b.lr_scale, ramp_steps=keys["ramp_steps"])
        a = self.sup._begin_action(decision, None, None, actor=who.name, request_id=rid)
        return {"command": "rollback", "accepted": True, "dry_run": False, "replayed": False, "request_id": rid,
                "action_id": a.id, "state": "running", "plan": plan, "message": f"action {a.id}: {msg}"}

    # -- pause / resume --------------------------------------------------------------------
    async def pause(self, who: Principal, b: Command) -> dict:
        sup = self.sup
        if not b.dry_run and (r := self.replayed(b.request_id, "pause", {})):
            return r | {"command": "pause"}
        if not b.dry_run:
            self.ensure_idle()
        if sup.state not in RUNNING_STATES:
            raise Refusal(409, f"the run is {sup.state}; only a running run can be paused")
        self.ensure_trainer("pause")
        plan = {"action": "pause", "at_step": sup.last_step, "generation": sup.generation,
                "steps": "the trainer finishes its step, saves a checkpoint and exits; the run waits in state "
                         "'paused' until `resume`"}
        if b.dry_run:
            return {"command": "pause", "accepted": True, "dry_run": True, "plan": plan,
                    "message": f"dry run: would pause at step {sup.last_step} (checkpoint, then stop)"}
        rid = b.request_id or f"srv-{uuid.uuid4().hex}"
        a = self.start_action("pause", {"reason": b.reason}, who, rid)
        return {"command": "pause", "accepted": True, "dry_run": False, "replayed": False, "request_id": rid,
                "action_id": a.id, "state": "running", "plan": plan,
                "message": f"action {a.id}: pausing at step {sup.last_step}"}

    async def resume(self, who: Principal, b: Command) -> dict:
        sup = self.sup
        if not b.dry_run and (r := self.replayed(b.request_id, "resume", {})):
            return r | {"command": "resume"}
        if not b.dry_run:
            self.ensure_idle()
        if sup.state not in RESUMABLE_STATES or self.trainer_alive():
            raise Refusal(409, f"the run is {sup.state}; resume applies to a paused or stopped run")
        load = sup._newest_valid_step()
        if load is None and sup.last_step > 0:
            raise Refusal(409, "no valid checkpoint to resume from; refusing to restart the run from scratch")
        plan = {"action": "resume", "load_step": load, "lr_scale": sup.lr_scale, "generation": sup.generation + 1}
        where = f"step {load}" if load is not None else "scratch"
        if b.dry_run:
            return {"command": "resume", "accepted": True, "dry_run": True, "plan": plan,
                    "message": f"dry run: would start generation {sup.generation + 1} from {where}"}
        rid = b.request_id or f"srv-{uuid.uuid4().hex}"
        a = self.start_action("resume", {"reason": b.reason, "load_step": load}, who, rid)
        return {"command": "resume", "accepted": True, "dry_run": False, "replayed": False, "request_id": rid,
                "action_id": a.id, "state": "running", "plan": plan,
                "message": f"action {a.id}: resuming from {where}"}

    # -- light commands (directives) -------------------------------------------------------
    async def light(self, who: Principal, b: LightCommand, command: str, kind: str, directive: dict,
                    describe: str, on_ack: Callable[[Any], None] | None = None) -> dict:
        sup = self.sup
        keys = {k: v for k, v in directive.items() if k not in ("kind", "reason")}
        if not b.dry_run and (r := self.replayed(b.request_id, kind, keys)):
            return r | {"command": command}
        if not b.dry_run:
            self.ensure_idle()
        self.ensure_trainer(command)
        plan = {"action": kind, "directive": directive, "at_step": f"the next step boundary after {sup.last_step}",
                "generation": sup.generation}
        if b.dry_run:
            return {"command": command, "accepted": True, "dry_run": True, "plan": plan,
                    "message": f"dry run: would {describe}"}
        from supervisor.daemon import ActiveAction

        rid = b.request_id or f"srv-{uuid.uuid4().hex}"
        params = dict(keys, generation=sup.generation, from_step=sup.last_step)
        intent = sup.journal.action_intent(kind, params, actor=who.name, request_id=rid)
        sup.journal.action_running(intent.id)
        a = ActiveAction(intent.id, kind, params, None, None)
        d = sup.send_directive(a, **directive, reason=f"{command} by {who.name} (action {intent.id})"[:500])
        # The action row stays "running" until the trainer acknowledges (or refuses) it.
        sup._spawn(self._follow_ack(intent.id, kind, d.id, on_ack))
        ack = await self._wait_ack(d.id, b.wait_s)
        out = {"command": command, "accepted": True, "dry_run": False, "replayed": False, "request_id": rid,
               "action_id": intent.id, "directive": d.id, "plan": plan}
        if ack is None:
            out.update(applied=None, message=f"action {intent.id}: {describe}; queued as directive {d.id}, not yet "
                                             f"acknowledged after {b.wait_s:g}s")
        else:
            out.update(applied=ack.ok, applied_at_step=ack.step, detail=ack.detail,
                       message=f"action {intent.id}: {'applied' if ack.ok else 'REFUSED by the trainer'} at step "
                               f"{ack.step}: {ack.detail}")
        return out

    async def _wait_ack(self, directive_id: str, wait_s: float):
        deadline = time.monotonic() + wait_s
        while True:
            ack = self.sup.directive_acks.get(directive_id)
            if ack is not None or time.monotonic() >= deadline:
                return ack
            await asyncio.sleep(0.05)

    async def _follow_ack(self, action_id: int, kind: str, directive_id: str, on_ack) -> None:
        sup = self.sup
        timeout = sup.settings.launch.directive_timeout_s
        ack = await self._wait_ack(directive_id, timeout)
        if ack is None:
            sup.journal.action_failed(action_id, {"directive": directive_id,
                                                  "error": f"not acknowledged by the trainer within {timeout:g}s"})
            sup.metrics.observe_action(kind, "failed")
            return
        outcome = {"directive": directive_id, "applied_at_step": ack.step, "ok": ack.ok, "detail": ack.detail}
        if ack.ok:
            sup.journal.action_done(action_id, outcome)
            sup.metrics.observe_action(kind, "done")
            if on_ack is not None:
                on_ack(ack)
        else:
            sup.journal.action_failed(action_id, outcome)
            sup.metrics.observe_action(kind, "failed")

    def _set_lr(self, scale: float):
        def apply(ack):
            self.sup.lr_scale = scale
        return apply

    def _set_total(self, ack) -> None:
        import re

        m = re.search(r"(?:ends at|extended to) (\d+)", ack.detail or "")
        if m:
            self.sup.total_steps = int(m.group(1))

    # -- policy / proposals / incidents ----------------------------------------------------
    async def set_policy(self, who: Principal, b: PolicyBody) -> dict:
        sup = self.sup
        plan = {"from": sup.mode, "to": b.mode}
        if b.dry_run:
            return {"command": "policy", "accepted": True, "dry_run": True, "plan": plan,
                    "message": f"dry run: would set the policy mode {sup.mode} -> {b.mode}"}
        before = sup.mode
        sup.mode = b.mode
        sup.journal.set_meta("mode", b.mode)
        sup.log.info("policy mode", mode=b.mode, previous=before, actor=who.name)
        return {"command": "policy", "accepted": True, "dry_run": False, "plan": plan, "mode": b.mode,
                "message": f"policy mode {before} -> {b.mode}"}

    def proposals(self) -> list[dict]:
        """Advisory decisions that would act, not yet carried out, made in this generation."""
        sup = self.sup
        gen = sup.journal.generation(sup.generation) if sup.generation >= 0 else None
        since = gen["started_at"] if gen else 0.0
        taken = {a["decision_id"] for a in sup.journal.actions(limit=1000) if a.get("decision_id") is not None}
        out = []
        for d in sup.journal.decisions(limit=200):
            if (d["advisory"] and d["action"] in CONFIRMABLE and d["id"] not in taken
                    and d["created_at"] >= since):
                out.append({"decision_id": d["id"], "action": d["action"], "reason": d["reason"],
                            "params": d["params"], "incident_id": d["incident_id"], "created_at": d["created_at"],
                            "finding_id": d["finding_id"]})
        return out

    async def confirm(self, who: Principal, b: Command, decision_id: int) -> dict:
        sup = self.sup
        if not 0 <= decision_id < 2**62:
            raise Refusal(409, f"decision {decision_id} is not a pending proposal")
        if b.request_id is not None and not b.dry_run:
            row = sup.journal.action_by_request(b.request_id)
            if row is not None:
                if row.get("decision_id") != decision_id:
                    raise Refusal(409, f"request id {b.request_id!r} was already used for action {row['id']}")
                return {"command": "confirm", "accepted": True, "replayed": True, "request_id": b.request_id,
                        "action_id": row["id"], "state": row["state"],
                        "message": f"proposal {decision_id} was already confirmed as action {row['id']}"}
        if not b.dry_run:
            self.ensure_idle()
        prop = next((p for p in self.proposals() if p["decision_id"] == decision_id), None)
        if prop is None:
            raise Refusal(409, f"decision {decision_id} is not a pending proposal (unknown, not advisory, "
                               "already carried out, or from an earlier generation); see GET /v1/proposals")
        params = {k: v for k, v in prop["params"].items() if k in Decision.__dataclass_fields__}
        decision = Decision.from_dict(params | {"advisory": False,
                                                "reason": f"confirmed by {who.name}: {b.reason} "
                                                          f"(proposed: {prop['reason']})"})
        if decision.action in (ROLLBACK, ROLLBACK_LR_DOWN):
            if decision.target_step is None:
                raise Refusal(409, f"proposal {decision_id} names no checkpoint")
            self.rollback_plan(RollbackBody(reason=b.reason, to_step=decision.target_step,
                                            skip_batches=decision.skip_batches), decision.target_step)
        if decision.action == SKIP_UPDATE:
            self.ensure_trainer("skip_update")
        plan = {"decision_id": decision_id, **{k: v for k, v in decision.to_dict().items() if k != "reason"}}
        if b.dry_run:
            return {"command": "confirm", "accepted": True, "dry_run": True, "plan": plan,
                    "message": f"dry run: would carry out proposal {decision_id} ({decision.action})"}
        finding = self._finding(prop["finding_id"], prop["incident_id"])
        rid = b.request_id or f"srv-{uuid.uuid4().hex}"
        a = sup._begin_action(decision, finding, decision_id, actor=who.name, request_id=rid)
        return {"command": "confirm", "accepted": True, "dry_run": False, "replayed": False, "request_id": rid,
                "action_id": a.id, "plan": plan,
                "message": f"action {a.id}: carrying out proposal {decision_id} ({decision.action})"}

    def _finding(self, finding_id: int | None, incident_id: int | None) -> Finding | None:
        if finding_id is None:
            return None
        rows = self.sup.journal.findings(incident_id=incident_id, limit=10_000) if incident_id else \
            self.sup.journal.findings(limit=10_000)
        r = next((f for f in rows if f["id"] == finding_id), None)
        if r is None:
            return None
        try:
            return Finding(kind=r["kind"], step=r["step"] or 0, severity=r["severity"],
                           wall_time=r["wall_time"] or time.time(), evidence=r["evidence"] or {}, rank=r["rank"])
        except ValueError:
            return None

    async def ack(self, who: Principal, b: Command, incident_id: int) -> dict:
        j = self.sup.journal
        inc = j.incident(incident_id) if 0 <= incident_id < 2**62 else None
        if inc is None:
            raise Refusal(404, f"no incident {incident_id}")
        if b.dry_run:
            return {"command": "ack", "accepted": True, "dry_run": True,
                    "plan": {"incident_id": incident_id, "state": inc["state"], "acked_by": who.name},
                    "message": f"dry run: would acknowledge incident {incident_id} as {who.name}"}
        new = j.ack_incident(incident_id, who.name)
        inc = j.incident(incident_id)
        msg = (f"incident {incident_id} acknowledged by {who.name}" if new else
               f"incident {incident_id} was already acknowledged by {inc['acked_by']}")
        return {"command": "ack", "accepted": True, "dry_run": False, "incident": inc, "message": msg}

    # -- alerts ----------------------------------------------------------------------------
    def alerts(self, payload: AlertmanagerPayload) -> dict:
        sup = self.sup
        now = time.time()
        planned, ignored = [], []
        for i, al in enumerate(payload.alerts):
            name = al.labels.get("alertname", "")
            host = next((al.labels[k] for k in NODE_LABELS if al.labels.get(k)), None)
            if al.status != "firing":
                ignored.append({"index": i, "alertname": name, "why": "resolved"})
                continue
            if host is None:
                ignored.append({"index": i, "alertname": name, "why": f"no node label ({', '.join(NODE_LABELS)})"})
                continue
            if ":" in host and not host.startswith("["):
                host = host.rsplit(":", 1)[0]  # instance = host:port
            rank = al.labels.get("rank")
            rank_n = int(rank) if rank is not None and rank.isdigit() else None
            detail = al.annotations.get("summary") or al.annotations.get("description") or name
            planned.append((name or "alert", host, rank_n, f"{name}: {detail}"[:500]))
        findings = []
        for name, host, rank, detail in planned:
            for f in sup.suite.observe_alert(name, wall_time=now, step=sup.last_step, detail=detail, rank=rank,
                                             host=host):
                sup._on_finding(f)
                findings.append({"kind": f.kind, "host": host, "alert": name})
        return {"received": len(payload.alerts), "findings": findings, "ignored": ignored}

    # -- read views ------------------------------------------------------------------------
    def status(self) -> dict:
        sup = self.sup
        r = sup.last_record
        a = sup.action
        incidents = [{"id": i["id"], "kind": i["kind"], "onset_step": i["onset_step"], "state": i["state"],
                      "opened_at": i["opened_at"], "acked_by": i["acked_by"], "summary": i["summary"]}
                     for i in sup.journal.incidents(state="unresolved", limit=50)]
        action = None
        if a is not None:
            row = sup.journal.action(a.id) or {}
            action = {"id": a.id, "kind": a.kind, "actor": row.get("actor"), "since": row.get("created_at"),
                      "params": a.params}
        proposals = len(self.proposals()) if sup.mode == "advise" else 0
        valid = sup._valid_steps()
        if action is not None:
            now = f"acting: {a.kind} (action {a.id}, by {action['actor']})"
        elif sup.mode == "off":
            now = "off: recording findings only, no decisions carried out"
        elif sup.mode == "advise":
            now = f"advising: {proposals} proposal(s) wait for confirmation" if proposals else \
                "advising: watching, proposals need a human to confirm"
        elif incidents:
            now = f"watching incident {incidents[0]['id']} ({incidents[0]['kind']})"
        else:
            now = "watching"
        return {
            "schema": STATUS_SCHEMA, "run_id": sup.settings.run.run_id, "state": sup.state, "mode": sup.mode,
            "generation": sup.generation, "step": sup.last_step, "total_steps": sup.total_steps,
            "loss": _num(r.loss) if r else None, "grad_norm": _num(r.grad_norm) if r else None,
            "tokens_per_s": r.tokens_per_s if r else None, "lr": r.lr if r else None, "lr_scale": sup.lr_scale,
            "last_known_good": sup.last_known_good, "newest_checkpoint": valid[-1] if valid else None,
            "open_incidents": incidents, "action": action, "policy_now": now, "proposals": proposals,
            "pending_directives": sorted(sup.pending), "trainer_pids": dict(sup.gen.rank_pids) if sup.gen else {},
            "updated_at": r.wall_time if r else None,
        }

    def checkpoints(self) -> dict:
        sup = self.sup
        lkg = sup.last_known_good
        rows = [{"step": i.step, "state": i.state, "valid": i.valid, "reason": i.reason, "pinned": i.pinned,
                 "last_known_good": i.step == lkg, "size_bytes": i.size_bytes, "mtime": i.mtime,
                 "path": str(i.path)} for i in sup.catalog.scan()]
        return {"checkpoints": rows, "quarantined": self.quarantined(), "last_known_good": lkg}

    def audit_rows(self, limit: int) -> list[dict]:
        j = self.sup.journal
        out = []
        for c in j.commands(limit=limit):
            row = dict(c)
            if c.get("request_id"):
                a = j.action_by_request(c["request_id"])
                if a is not None:
                    row["action"] = {"id": a["id"], "kind": a["kind"], "state": a["state"], "outcome": a["outcome"]}
            out.append(row)
        return out


def build_router(sup, tokens: TokenStore | None = None) -> APIRouter:
    cp = ControlPlane(sup, tokens)
    bearer = HTTPBearer(auto_error=False, description="A token from `titan-supervisor token add`.")
    r = APIRouter(prefix="/v1")
    cred_dep = Security(bearer)

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

    # -- commands --------------------------------------------------------------------------
    def command_route(path: str, model, summary: str, build):
        async def handler(request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
            return await cp.command(request, cred, path, "operator", model, lambda who, b: build(who, b))
        r.add_api_route(f"/commands/{path}", handler, methods=["POST"], tags=["commands"], summary=summary,
                        responses=_CMD_ERRORS, openapi_extra=_body_doc(model), name=f"command_{path}")

    command_route("rollback", RollbackBody, "Roll back to a checkpoint (hot if a trainer runs, else cold)",
                cp.rollback)
    command_route("pause", Command, "Finish the step, checkpoint, stop the generation, keep state", cp.pause)
    command_route("resume", Command, "Start a new generation from the newest valid checkpoint", cp.resume)
    command_route("lr", LrBody, "Set the LR scale (optionally ramped)",
                lambda who, b: cp.light(who, b, "lr", "lr", {"kind": "set_lr_scale", "scale": b.scale,
                                                             "ramp_steps": b.ramp_steps},
                                        f"set the LR scale to {b.scale:g} over {b.ramp_steps} steps",
                                        cp._set_lr(b.scale)))
    command_route("skip-data", SkipDataBody, "Consume the next K batches without an optimizer update",
                lambda who, b: cp.light(who, b, "skip-data", "skip_data", {"kind": "skip_updates", "n": b.batches},
                                        f"skip the next {b.batches} batches (no update)"))
    command_route("checkpoint-now", LightCommand, "Save a checkpoint at the next step boundary",
                lambda who, b: cp.light(who, b, "checkpoint-now", "checkpoint_now", {"kind": "checkpoint_now"},
                                        "save a checkpoint at the next step boundary"))
    command_route("decay-now", DecayNowBody, "Start the WSD decay at this step",
                lambda who, b: cp.light(who, b, "decay-now", "decay_now",
                                        {"kind": "decay_now"} | ({"steps": b.steps} if b.steps else {}),
                                        f"start the LR decay now ({b.steps or 'default'} decay steps)",
                                        cp._set_total))
    command_route("extend", ExtendBody, "Make the run N steps long in total",
                lambda who, b: _extend(who, b))

    async def _extend(who, b: ExtendBody):
        if b.steps <= sup.last_step:
            raise Refusal(400, f"extend to {b.steps} steps: the run is already at step {sup.last_step}")
        if sup.total_steps is not None and b.steps <= sup.total_steps:
            raise Refusal(400, f"extend to {b.steps} steps: the run is already {sup.total_steps} steps long "
                               "(use decay-now to end it earlier)")
        return await cp.light(who, b, "extend", "extend", {"kind": "extend", "steps": b.steps},
                              f"extend the run to {b.steps} steps", cp._set_total)

    @r.post("/commands/{command}", tags=["commands"], responses=_CMD_ERRORS, include_in_schema=False)
    async def unknown(command: str, request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        async def refuse(who, b):
            raise Refusal(400, f"unknown command {command[:64]!r}; known: {', '.join(COMMANDS)}")
        return await cp.command(request, cred, command[:64], "operator", None, refuse)

    @r.post("/policy", tags=["commands"], responses=_CMD_ERRORS, openapi_extra=_body_doc(PolicyBody),
            summary="Set the policy mode (admin): auto | advise | off")
    async def set_policy(request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        return await cp.command(request, cred, "policy", "admin", PolicyBody, cp.set_policy)

    @r.post("/incidents/{incident_id}/ack", tags=["commands"], openapi_extra=_body_doc(Command),
            responses={**_CMD_ERRORS, 404: {"model": ErrorBody}}, summary="Acknowledge an incident (take ownership)")
    async def ack(incident_id: int, request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        return await cp.command(request, cred, "ack", "operator", Command,
                                lambda who, b: cp.ack(who, b, incident_id), {"incident_id": incident_id})

    @r.post("/proposals/{decision_id}/confirm", tags=["commands"], openapi_extra=_body_doc(Command),
            responses=_CMD_ERRORS, summary="Advise mode: carry out a proposed decision")
    async def confirm(decision_id: int, request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        return await cp.command(request, cred, "confirm", "operator", Command,
                                lambda who, b: cp.confirm(who, b, decision_id), {"decision_id": decision_id})

    @r.post("/alerts", tags=["alerts"], openapi_extra=_body_doc(AlertmanagerPayload),
            responses={**_ERRORS, 200: {"description": "Alerts about a node became hardware findings"}},
            summary="Alertmanager webhook: firing alerts labelled with a node become hardware findings")
    async def alerts(request: Request, cred: HTTPAuthorizationCredentials | None = cred_dep):
        try:
            if cp.tokens.configured:
                cp.authorize(cred, "operator")
            raw = await request.body()
            if len(raw) > 4 * 1024 * 1024:
                raise Refusal(400, "body is too large")
            try:
                obj = json.loads(raw, parse_constant=_reject_constant)
            except (ValueError, UnicodeDecodeError) as e:
                raise Refusal(400, f"body is not JSON: {e}") from None
            try:
                payload = AlertmanagerPayload.model_validate(obj)
            except ValidationError as e:
                raise Refusal(400, "body is not an Alertmanager webhook payload", _validation_details(e)) from None
        except Refusal as e:
            return e.response()
        return cp.alerts(payload)

    return r


COMMANDS = ("rollback", "pause", "resume", "lr", "skip-data", "checkpoint-now", "decay-now", "extend")
