"""Carry out a decision, idempotently (DESIGN.md §3 "Remedies").

Light remedies are directives to the running trainer (applied at a step boundary on every
rank); heavy ones restart the generation through the launcher. Each step of a remedy is safe
to repeat: quarantining an already quarantined checkpoint moves nothing, a directive id the
trainer has applied is acknowledged again without effect, and starting a generation is only
done when none is running. That is what lets a restarted daemon finish a half-done action
(``resume``) without doing it twice.

Guarantees: nothing is deleted (newer checkpoints move to the quarantine folder); a hot
rollback that is not acknowledged in ``launch.directive_timeout_s`` (or whose trainer dies)
falls back to a cold restart from the same checkpoint with the same data skip.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from typing import TYPE_CHECKING

from supervisor.policy import (KILL_RESTART_HANG, RECORD, RESTART, ROLLBACK, ROLLBACK_LR_DOWN, SKIP_UPDATE,
                               STOP_PAGE)

if TYPE_CHECKING:
    from supervisor.daemon import ActiveAction, Supervisor

PAUSE, RESUME = "pause", "resume"  # operator actions (supervisor/control.py)


async def carry_out(sup: "Supervisor", a: "ActiveAction") -> dict:
    kind = a.kind
    if kind in (ROLLBACK, ROLLBACK_LR_DOWN, "operator_rollback"):
        return await rollback(sup, a)
    if kind in (RESTART, KILL_RESTART_HANG):
        return await restart(sup, a, hang=kind == KILL_RESTART_HANG)
    if kind == STOP_PAGE:
        return await stop_and_page(sup, a)
    if kind in (SKIP_UPDATE, RECORD):
        return light(sup, a)
    if kind == PAUSE:
        return await pause(sup, a)
    if kind == RESUME:
        return await resume_run(sup, a)
    raise ValueError(f"no remedy for action {kind!r}")


def light(sup: "Supervisor", a: "ActiveAction") -> dict:
    """Actions that only record, or only queue a directive: synchronous, never wait."""
    if a.kind == RECORD:
        return {"note": "recorded"}
    if a.finding is not None and a.finding.evidence.get("update_skipped"):
        return {"note": "the trainer's guard already skipped the update"}
    if sup.gen is None or sup.gen.exited is not None:
        return {"note": "no trainer running; nothing to skip"}
    d = sup.send_directive(a, kind="skip_updates", n=1, reason=f"action {a.id}")
    return {"directive": d.id, "note": "the next update will be skipped"}


# Operator commands that are a single trainer directive (supervisor/control.py).
DIRECTIVE_ACTIONS = frozenset({"lr", "skip_data", "checkpoint_now", "decay_now", "extend", "set_checkpoint_interval"})


async def resume(sup: "Supervisor", a: "ActiveAction", row: dict) -> dict:
    """Finish an action found unfinished in the journal after a daemon restart."""
    if a.kind in DIRECTIVE_ACTIONS:
        # Its outcome is whatever the trainer acknowledged; a directive queued but never
        # delivered is not re-sent on the operator's behalf minutes later.
        directive = sup.journal.get_meta(f"action_{a.id}_directive")
        applied = _applied_in_spool(sup, directive["id"]) if directive else None
        if applied is None:
            raise RuntimeError("the trainer had not acknowledged it when the daemon restarted; not re-sent")
        ok, detail = applied
        if not ok:
            raise RuntimeError(f"refused by the trainer: {detail}")
        return {"directive": directive["id"], "detail": detail, "resumed": True}
    if a.kind in (ROLLBACK, ROLLBACK_LR_DOWN, "operator_rollback"):
        directive = sup.journal.get_meta(f"action_{a.id}_directive")
        applied = _applied_in_spool(sup, directive["id"]) if directive else None
        if applied is not None:
            ok, detail = applied
            if ok:
                _after_rollback(sup, a, int(a.params["target_step"]))
                return {"mode": "hot", "detail": detail, "resumed": True, "note": "applied before the daemon restarted"}
        return await rollback(sup, a)
    return await carry_out(sup, a)


def _applied_in_spool(sup: "Supervisor", directive_id: str) -> tuple[bool, str] | None:
    """(ok, detail) of the trainer's acknowledgement of a directive, if the spool holds one."""
    from supervisor.spool import read_spool, spool_path

    found = None
    for ev in read_spool(spool_path(sup.workdir), strict=False):
        if ev.get("kind") == "directive_applied" and ev.get("directive_id") == directive_id:
            if found is None or ev.get("ok"):
                found = (bool(ev.get("ok")), str(ev.get("detail", "")))
    return found


def _quarantine_newer(sup: "Supervisor", target: int, action_id: int) -> list[int]:
    moved = sup.catalog.quarantine_after(target, reason=f"rollback to step {target} (action {action_id})",
                                         tag=f"rollback-a{action_id}")
    for m in moved:
        sup.journal.record_checkpoint(m.step, path=str(m.dst), state="quarantined",
                                      note=f"rolled back past it (action {action_id})")
    sup._valid_cache = None
    return [m.step for m in moved]


def _after_rollback(sup: "Supervisor", a: "ActiveAction", target: int) -> None:
    _quarantine_newer(sup, target, a.id)  # anything saved between the order and the ack
    sup.suite.reset_generation(sup.generation, time.time(), resume_step=target,
                               world_size=sup.settings.run.nproc_per_node)
    lost = max(0, int(a.params.get("from_step", sup.last_step)) - target)
    sup.metrics.add_lost(steps=lost, gpu_hours=lost * _median_step(sup) * sup.settings.run.nproc_per_node / 3600)
    sup.last_step = target
    sup.lkg_candidate = None


def _median_step(sup: "Supervisor") -> float:
    import statistics

    return statistics.median(sup._step_times) if sup._step_times else 0.0


def _resolve_target(sup: "Supervisor", target: int) -> int:
    """The target if it is a valid checkpoint; else the newest valid older one (a corrupt
    checkpoint is quarantined, never used, never deleted)."""
    found = None
    for info in sorted(sup.catalog.scan(), key=lambda i: -i.step):
        if info.state == "corrupt":
            moved = sup.catalog.quarantine(info.step, reason=f"corrupt: {info.reason}", tag="corrupt")
            sup.journal.record_checkpoint(info.step, path=str(moved.dst) if moved else None, state="corrupt",
                                          note=info.reason)
            sup.log.warning("corrupt checkpoint set aside", step=info.step, reason=info.reason)
        elif info.valid and info.step <= target and found is None:
            found = info.step
    sup._valid_cache = None
    if found is None:
        raise LookupError(f"no valid checkpoint at or before step {target}")
    return found


async def rollback(sup: "Supervisor", a: "ActiveAction") -> dict:
    p = a.params
    target = _resolve_target(sup, int(p["target_step"]))
    skip = int(p.get("skip_batches", 0))
    lr_scale = p.get("lr_scale")
    ramp = int(p.get("ramp_steps", 0))
    sup._set_state("recovering")
    moved = _quarantine_newer(sup, target, a.id)
    gen = sup.gen
    if gen is not None and gen.exited is None and gen.alive():
        fields = {"kind": "rollback", "step": target, "skip_batches": skip, "reason": f"action {a.id}"}
        if lr_scale is not None and float(lr_scale) != sup.lr_scale:
            fields.update(lr_scale=float(lr_scale), ramp_steps=ramp)
        if a.directive_id is None or a.directive_id not in sup.pending:
            sup.send_directive(a, **fields)
        sup.suite.expect_pause(time.time() + sup.settings.launch.directive_timeout_s)
        try:
            await asyncio.wait_for(_ack_or_death(sup, a, gen), sup.settings.launch.directive_timeout_s)
        except asyncio.TimeoutError:
            a.ack_ok, a.ack_detail = False, "not acknowledged in time"
        if a.acked.is_set() and a.ack_ok:
            if lr_scale is not None:
                sup.lr_scale = float(lr_scale)
            _after_rollback(sup, a, target)
            sup._set_state("running")
            return {"mode": "hot", "target_step": target, "skip_batches": skip, "quarantined": moved,
                    "detail": a.ack_detail}
        sup.pending.pop(a.directive_id or "", None)
        sup.log.warning("hot rollback failed, restarting cold", detail=a.ack_detail or "trainer died")
    await sup._stop_generation(f"cold rollback to step {target} (action {a.id})")
    scale = float(lr_scale) if lr_scale is not None else sup.lr_scale
    _after_rollback(sup, a, target)
    await sup._launch(load_step=target, skip_batches=skip, lr_scale=scale,
                      ramp_steps=ramp if lr_scale is not None else 0, reason=f"rollback (action {a.id})")
    return {"mode": "cold", "target_step": target, "skip_batches": skip, "quarantined": moved,
            "generation": sup.generation, "detail": a.ack_detail}


async def _ack_or_death(sup, a, gen) -> None:
    while not a.acked.is_set():
        if gen.exited is not None or not gen.alive():
            return
        await asyncio.sleep(0.05)


async def restart(sup: "Supervisor", a: "ActiveAction", *, hang: bool) -> dict:
    p = a.params
    out: dict = {}
    sup._set_state("recovering")
    if hang and sup.gen is not None:
        out["stacks"] = (await asyncio.to_thread(sup.gen.dump_stacks))[-20000:]
    # A hung rank (SIGSTOPped, or stuck in a collective) ignores SIGTERM: its stacks are
    # already dumped, so kill at once.
    await sup._stop_generation(f"{a.kind} (action {a.id})", grace_s=0.0 if hang else None)
    backoff = float(p.get("backoff_seconds", 0.0))
    if backoff > 0:
        sup.log.info("backing off before restart", seconds=backoff)
        await asyncio.sleep(backoff)
    target = p.get("target_step")
    try:
        load = _resolve_target(sup, int(target)) if target is not None else _resolve_target(sup, 10**12)
    except LookupError:
        load = None  # nothing valid yet: a fresh start
    lost = max(0, int(p.get("from_step", sup.last_step)) - (load or 0))
    sup.metrics.add_lost(steps=lost, gpu_hours=lost * _median_step(sup) * sup.settings.run.nproc_per_node / 3600)
    if load is not None:
        _quarantine_newer(sup, load, a.id)
    await sup._launch(load_step=load, skip_batches=0, lr_scale=sup.lr_scale, reason=f"{a.kind} (action {a.id})")
    out.update({"load_step": load, "generation": sup.generation, "backoff_s": backoff, "lost_steps": lost})
    return out


async def stop_and_page(sup: "Supervisor", a: "ActiveAction") -> dict:
    reason = (a.decision.reason if a.decision else "") or "budget exhausted"
    gen = sup.gen
    mode = "none"
    if gen is not None and gen.alive():
        if a.directive_id is None:
            sup.send_directive(a, kind="stop", reason=reason[:500])
        mode = "directive"
        deadline = time.time() + sup.settings.launch.directive_timeout_s
        while gen.alive() and time.time() < deadline:
            await asyncio.sleep(0.1)
        if gen.alive():
            mode = "killed"
    await sup._stop_generation(f"stop and page (action {a.id})")
    sup._set_state("stopped")
    page(sup, reason, action_id=a.id)
    return {"stopped": mode, "paged": True, "reason": reason}


def page(sup: "Supervisor", reason: str, **extra) -> None:
    """Tell a human: a metric, a log event, and the webhook when one is configured."""
    sup.metrics.observe_action("page", "sent")
    body = {"run_id": sup.settings.run.run_id, "state": sup.state, "step": sup.last_step, "reason": reason,
            "generation": sup.generation, **extra}
    sup.log.error("page", **body)
    sup.journal.set_meta("last_page", body)
    url = sup.settings.page.webhook_url
    if url:
        threading.Thread(target=_post_page, args=(sup, url, body), daemon=True).start()


def _post_page(sup: "Supervisor", url: str, body: dict, attempts: int = 5) -> bool:
    """POST the page, retrying with exponential backoff (1, 2, 4, 8 s): a pager endpoint that
    blips must not swallow the one message that wakes a human. Runs off the event loop."""
    from tenacity import RetryError, retry, retry_if_exception_type, stop_after_attempt, wait_exponential

    @retry(stop=stop_after_attempt(attempts), wait=wait_exponential(multiplier=1, max=8),
           retry=retry_if_exception_type(OSError), reraise=False)
    def send() -> None:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()

    try:
        send()
        return True
    except RetryError as e:
        sup.log.error("page webhook failed", url=url, attempts=attempts, error=str(e.last_attempt.exception()))
        sup.metrics.observe_action("page", "failed")
        return False


async def pause(sup: "Supervisor", a: "ActiveAction") -> dict:
    """Operator pause: the trainer finishes its step, checkpoints and exits (a ``stop``
    directive); the generation is closed and the run waits in state "paused" with everything
    kept. Safe to repeat: with no trainer left it only records the state."""
    gen = sup.gen
    how = "no trainer running"
    if gen is not None and gen.exited is None and gen.alive():
        if a.directive_id is None or a.directive_id not in sup.pending:
            sup.send_directive(a, kind="stop", reason=f"paused by operator (action {a.id})")
        timeout = sup.settings.launch.directive_timeout_s
        sup.suite.expect_pause(time.time() + timeout)
        deadline = time.time() + timeout
        while gen.alive() and gen.exited is None and time.time() < deadline:
            await asyncio.sleep(0.05)
        how = "trainer checkpointed and exited" if not gen.alive() or gen.exited is not None else "killed (no exit in time)"
    finished = sup._trainer_finished
    await sup._stop_generation(f"paused (action {a.id})")
    sup._trainer_finished = None
    step = finished[0] if finished else sup.last_step
    if finished and finished[1] == "completed":
        sup._set_state("finished")
        sup.finished.set()
        return {"paused": False, "note": "the run completed before the pause took effect", "step": step}
    sup._set_state("paused")
    newest = sup._newest_valid_step()
    return {"paused": True, "step": step, "stopped": how, "newest_checkpoint": newest}


async def resume_run(sup: "Supervisor", a: "ActiveAction") -> dict:
    """Operator resume: a new generation from the newest valid checkpoint, same LR scale."""
    if sup.gen is not None and sup.gen.exited is None and sup.gen.alive():
        return {"note": "a generation is already running", "generation": sup.generation}
    load = sup._newest_valid_step()
    await sup._launch(load_step=load, skip_batches=0, lr_scale=sup.lr_scale,
                      reason=f"resumed by operator (action {a.id})")
    return {"load_step": load, "generation": sup.generation, "lr_scale": sup.lr_scale}
