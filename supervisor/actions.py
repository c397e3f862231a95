"""Actions: the one-heavy-action-at-a-time rule and the life cycle of each action.

`DecisionLoop` is pure (no I/O, no clock): finding -> decision, except that while a heavy action
(rollback, restart, stop, pause, resume) is in flight, findings get no decision — the running
action owns the incident. The daemon and `supervisor.replay` both drive it, so a replayed run makes
the decisions the daemon made.

`ActionRunner` is the daemon's side: every action's intent is journaled before it runs and its
outcome after (intent -> running -> done | failed). Light actions (record, skip an update) run
synchronously and never block a heavy one; heavy actions run as one asyncio task. A daemon killed
mid-action finds the intent in the journal on restart and `resume`s it: every remedy is
idempotent, so it completes exactly once.

An optional `ActionListener` (e.g. `supervisor.annotations.IncidentAnnotations`) hears every
action that ends, done or failed, with its outcome, after the journal has it; a listener that
raises is logged and changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from supervisor.detect.findings import Finding
from supervisor.policy import (LR_ACTIONS, RECORD, RESTART_ACTIONS, ROLLBACK_ACTIONS, SKIP_UPDATE, STOP_PAGE,
                               Decision, History, Policy, RunState)

LIGHT_ACTIONS = frozenset({SKIP_UPDATE, RECORD}) | LR_ACTIONS
#: operator actions that are one trainer directive each (acknowledged, never block a heavy action)
DIRECTIVE_ACTIONS = frozenset({"lr", "skip_data", "checkpoint_now", "decay_now", "extend", "set_checkpoint_interval"})
#: heavy actions that carry a policy Decision (rebuilt from the journal when resumed)
DECISION_ACTIONS = ROLLBACK_ACTIONS | RESTART_ACTIONS | {STOP_PAGE}


@dataclass
class ActiveAction:
    """One journaled action (intent -> running -> done/failed)."""

    id: int
    kind: str
    params: dict
    finding: Finding | None = None
    decision: Decision | None = None
    directive_id: str | None = None


class ActionListener(Protocol):
    def action_finished(self, kind: str, action_id: int, ok: bool, outcome: dict) -> None: ...


class DecisionLoop:
    """Finding -> Decision under the one-heavy-action-at-a-time rule. Pure."""

    def __init__(self, policy: Policy, history: History | None = None) -> None:
        self.policy = policy
        self.history = history or History()
        self.in_flight = None  # the heavy action in flight (the driver's object; has a .kind)

    def decide(self, finding: Finding, state: RunState) -> Decision | None:
        """The policy's decision, or None while a heavy action owns the incident. A hardware
        finding naming a host is counted either way (the policy excludes on repeated ones)."""
        if self.in_flight is not None:
            self.history.record_hardware(finding)
            return None
        d = self.policy.decide(finding, state, self.history)
        self.history.record_hardware(finding)
        if d.acts and d.action in LR_ACTIONS:  # light and synchronous: carried out as decided
            self.history.record_lr(finding, d, state.lr_scale)
        return d

    def started(self, action) -> None:
        if action.kind not in LIGHT_ACTIONS and action.kind not in DIRECTIVE_ACTIONS:
            self.in_flight = action

    def finished(self, finding: Finding | None, decision: Decision | None, *, ok: bool) -> None:
        """A heavy action ended; a carried-out decision counts against its rung's budget."""
        self.in_flight = None
        if ok and finding is not None and decision is not None:
            self.history.record(finding, decision)


class ActionRunner:
    """Journal, run and resume actions through the remedies; one heavy action at a time."""

    def __init__(self, loop: DecisionLoop, remedies, journal, metrics, log, *,
                 spawn: Callable[[Awaitable], asyncio.Task], context: Callable[[], dict],
                 on_done: Callable[[ActiveAction], None], listener: ActionListener | None = None) -> None:
        self.loop = loop
        self._remedies = remedies
        self._journal, self._metrics, self._log = journal, metrics, log
        self._spawn = spawn
        self._context = context  # {"generation": g, "from_step": s} stamped on every action
        self._on_done = on_done  # after a heavy or light action succeeded
        self._listener = listener  # hears every action that ends (done or failed)

    @property
    def current(self) -> ActiveAction | None:
        """The heavy action in flight (the one-at-a-time rule is the DecisionLoop's)."""
        return self.loop.in_flight

    @current.setter
    def current(self, a: ActiveAction | None) -> None:
        self.loop.in_flight = a

    @property
    def busy(self) -> bool:
        return self.current is not None

    def _intent(self, kind: str, params: dict, **kw) -> ActiveAction:
        params = dict(params, **self._context())
        intent = self._journal.action_intent(kind, params, **kw)
        return ActiveAction(intent.id, kind, params)

    def begin(self, decision: Decision, finding: Finding | None, decision_id: int | None, *,
              actor: str = "policy", request_id: str | None = None) -> ActiveAction:
        """Carry out a decision (the policy's, or one an operator confirmed or ordered)."""
        a = self._intent(decision.action, {k: v for k, v in decision.to_dict().items() if k != "reason"},
                         actor=actor, decision_id=decision_id, request_id=request_id)
        a.finding, a.decision = finding, decision
        if decision.action in LIGHT_ACTIONS:
            self._journal.action_running(a.id)
            self._finish(a, self._remedies.light(a))
            return a
        return self._start_heavy(a)

    def start(self, kind: str, params: dict, *, actor: str, request_id: str | None) -> ActiveAction:
        """An operator's heavy action without a policy decision (pause, resume)."""
        return self._start_heavy(self._intent(kind, params, actor=actor, request_id=request_id))

    def _start_heavy(self, a: ActiveAction) -> ActiveAction:
        self.loop.started(a)
        self._spawn(self._run(a, self._remedies.carry_out(a)))
        return a

    def send_directive(self, kind: str, params: dict, fields: dict, *, actor: str, request_id: str,
                       reason: str, on_ack: Callable | None = None) -> tuple[ActiveAction, object]:
        """An operator's single-directive action: running until the trainer acknowledges it."""
        a = self._intent(kind, params, actor=actor, request_id=request_id)
        self._journal.action_running(a.id)
        d = self._remedies.directives.send(a.id, **fields, reason=f"{reason} (action {a.id})"[:500])
        a.directive_id = d.id
        self._spawn(self._follow_ack(a, on_ack))
        return a, d

    async def _follow_ack(self, a: ActiveAction, on_ack) -> None:
        timeout = self._remedies.directive_timeout_s
        ack = await self._remedies.directives.wait(a.directive_id, timeout)
        if ack is None:
            return self._fail(a, {"directive": a.directive_id,
                                  "error": f"not acknowledged by the trainer within {timeout:g}s"})
        outcome = {"directive": a.directive_id, "applied_at_step": ack.step, "ok": ack.ok, "detail": ack.detail}
        if not ack.ok:
            return self._fail(a, outcome)
        self._journal.action_done(a.id, outcome)
        self._metrics.observe_action(a.kind, "done")
        self._tell(a, True, outcome)
        if on_ack is not None:
            on_ack(ack)

    async def _run(self, a: ActiveAction, work: Awaitable[dict], *, resumed_from: str | None = None) -> None:
        if resumed_from in (None, "intent"):
            self._journal.action_running(a.id)
        self._log.info("action", id=a.id, kind=a.kind, params=a.params, resumed=resumed_from is not None)
        ok = False
        try:
            outcome = await work
            ok = True
        except Exception as e:  # noqa: BLE001 - an action failing must not kill the daemon
            self._fail(a, {"error": repr(e), **({"resumed": True} if resumed_from else {})})
        finally:
            if self.current is a:
                self.loop.finished(a.finding, a.decision, ok=ok)
        if ok:
            self._finish(a, outcome)

    def _finish(self, a: ActiveAction, outcome: dict) -> None:
        self._journal.action_done(a.id, outcome)
        self._metrics.observe_action(a.kind, "done", outcome)
        self._log.info("action done", id=a.id, kind=a.kind, outcome=outcome)
        self._tell(a, True, outcome)
        self._on_done(a)

    def _fail(self, a: ActiveAction, outcome: dict) -> None:
        self._journal.action_failed(a.id, outcome)
        self._metrics.observe_action(a.kind, "failed")
        self._log.error("action failed", id=a.id, kind=a.kind, outcome=outcome)
        self._tell(a, False, outcome)

    def _tell(self, a: ActiveAction, ok: bool, outcome: dict) -> None:
        if self._listener is None:
            return
        try:
            self._listener.action_finished(a.kind, a.id, ok, outcome)
        except Exception as e:  # noqa: BLE001 - a view failing never changes an action
            self._log.warning("action listener failed", id=a.id, kind=a.kind, error=repr(e)[:300])

    def _finding_of(self, row: dict, decision: Decision | None) -> Finding | None:
        """The journaled finding behind a resumed action, so that finishing it counts against its
        rung's budget (a restart resumed by a new daemon is still one of `max_restarts`)."""
        if decision is None or row.get("decision_id") is None:
            return None
        f = self._journal.finding_of_decision(int(row["decision_id"]))
        if f is None or f.get("wall_time") is None:
            return None
        try:
            return Finding.from_dict(f)
        except (ValueError, TypeError):
            return None

    async def resume(self, row: dict) -> None:
        """Finish an action a previous daemon journaled but did not complete (crash-only)."""
        kind, params = row["kind"], row.get("params") or {}
        decision = None
        if kind in DECISION_ACTIONS:
            decision = Decision.from_dict({k: v for k, v in params.items() if k in Decision.__dataclass_fields__}
                                          | {"action": kind, "reason": params.get("reason", "resumed")})
        a = ActiveAction(int(row["id"]), kind, params, self._finding_of(row, decision), decision,
                         directive_id=params.get("directive_id"))
        self.loop.started(a)
        self._log.info("resuming unfinished action", id=a.id, kind=kind, state=row.get("state"))
        await self._run(a, self._remedies.resume(a), resumed_from=row.get("state") or "intent")
