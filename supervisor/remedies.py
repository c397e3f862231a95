"""Remedies: carry out a decision, idempotently (docs/architecture.md, "Who owns what").

`Remedies` is built with exactly what it touches — the generations, the checkpoint ledger, the
directive channel, the pager, the journal, the run status and the detectors — and maps each
action the policy (or an operator) can order to one method (`Remedies.table`). Light remedies are
directives to the running trainer; heavy ones restart the generation.

Each step of a remedy is safe to repeat: quarantining an already quarantined checkpoint moves
nothing, a directive id the trainer has applied is acknowledged again without effect, and a
generation is started only when none runs. That is what lets a restarted daemon finish a
half-done action (`resume`) without doing it twice.

Guarantees: nothing is deleted (newer checkpoints move to the quarantine folder); a hot rollback
that is not acknowledged in `launch.directive_timeout_s` (or whose trainer dies) falls back to a
cold restart from the same checkpoint with the same data skip.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from supervisor.data_lineage import Load, carried_skip
from supervisor.grow import GROW
from supervisor.policy import (COOL_LR, EXCLUDE_NODE, KILL_RESTART_HANG, RECORD, RESTART, REWARM_LR, ROLLBACK,
                               ROLLBACK_LR_DOWN, SKIP_UPDATE, STOP_PAGE)

PAUSE, RESUME, RESHARD = "pause", "resume", "reshard"  # operator actions (supervisor/control.py)


def lost_gpu_hours(steps: int, step_seconds: float, ranks: int) -> float:
    """GPU-hours thrown away by redoing `steps` steps on `ranks` ranks."""
    return steps * step_seconds * ranks / 3600


class Remedies:
    def __init__(self, *, generations, ledger, directives, pager, journal, status, suite, metrics, log,
                 step_times: list[float], ranks: int, directive_timeout_s: float, poll_s: float = 0.05,
                 stack_dump_chars: int = 20_000, layouts=None) -> None:
        self.generations, self.ledger, self.directives, self.pager = generations, ledger, directives, pager
        self._journal, self.status, self._suite, self._metrics, self._log = journal, status, suite, metrics, log
        self._step_times = step_times  # the daemon's window of recent step seconds (read only)
        self._ranks = ranks
        self.directive_timeout_s = directive_timeout_s
        self._poll_s = poll_s
        self._stack_dump_chars = stack_dump_chars
        self._layouts = layouts  # run_plan.LayoutFallback (None: no [preflight] layouts to fall back to)
        #: heavy actions: action kind -> remedy (each an idempotent coroutine)
        self.table = {
            ROLLBACK: self.rollback, ROLLBACK_LR_DOWN: self.rollback,
            RESTART: self.restart, KILL_RESTART_HANG: self.kill_restart_hang,
            EXCLUDE_NODE: self.exclude_node, STOP_PAGE: self.stop_and_page,
            PAUSE: self.pause, RESUME: self.resume_run, RESHARD: self.reshard, GROW: self.grow,
        }
        #: light actions: synchronous, never wait
        self.light_table = {RECORD: self.record, SKIP_UPDATE: self.skip_update,
                            COOL_LR: self.set_lr_scale, REWARM_LR: self.set_lr_scale}

    # -- dispatch ------------------------------------------------------------------------------
    async def carry_out(self, a) -> dict:
        remedy = self.table.get(a.kind)
        if remedy is None:
            raise ValueError(f"no remedy for action {a.kind!r}")
        return await remedy(a)

    def light(self, a) -> dict:
        return self.light_table[a.kind](a)

    async def resume(self, a) -> dict:
        """Finish an action found unfinished in the journal after a daemon restart."""
        from supervisor.actions import DIRECTIVE_ACTIONS

        directive = self.directives.journaled(a.id)
        applied = self.directives.applied_in_spool(directive["id"]) if directive else None
        if a.kind in DIRECTIVE_ACTIONS:
            # Its outcome is whatever the trainer acknowledged; a directive queued but never
            # delivered is not re-sent on the operator's behalf minutes later.
            if applied is None:
                raise RuntimeError("the trainer had not acknowledged it when the daemon restarted; not re-sent")
            ok, detail = applied
            if not ok:
                raise RuntimeError(f"refused by the trainer: {detail}")
            return {"directive": directive["id"], "detail": detail, "resumed": True}
        if a.kind in (ROLLBACK, ROLLBACK_LR_DOWN) and applied is not None and applied[0]:
            self._after_rollback(a, int(a.params["target_step"]))
            return {"mode": "hot", "detail": applied[1], "resumed": True,
                    "note": "applied before the daemon restarted"}
        if a.kind in self.light_table:
            return self.light(a)
        return await self.carry_out(a)

    # -- light ---------------------------------------------------------------------------------
    def record(self, a) -> dict:
        return {"note": "recorded"}

    def skip_update(self, a) -> dict:
        if a.finding is not None and a.finding.evidence.get("update_skipped"):
            return {"note": "the trainer's guard already skipped the update"}
        if not self.generations.alive():
            return {"note": "no trainer running; nothing to skip"}
        d = self._send(a, kind="skip_updates", n=1, reason=f"action {a.id}")
        return {"directive": d.id, "note": "the next update will be skipped"}

    def set_lr_scale(self, a) -> dict:
        """cool_lr / rewarm_lr: one `set_lr_scale` directive (applied by every rank at the next
        step boundary); the run's LR scale is the decision's from now on."""
        if not self.generations.alive():
            return {"note": "no trainer running; LR scale unchanged"}
        scale, ramp = float(a.params["lr_scale"]), int(a.params.get("ramp_steps", 0))
        d = self._send(a, kind="set_lr_scale", scale=scale, ramp_steps=ramp, reason=f"{a.kind} (action {a.id})")
        before, self.status.lr_scale = self.status.lr_scale, scale
        return {"directive": d.id, "lr_scale_before": before, "lr_scale": scale, "ramp_steps": ramp}

    # -- heavy ---------------------------------------------------------------------------------
    async def rollback(self, a) -> dict:
        p = a.params
        target = self.ledger.load_target(int(p["target_step"]))
        if target is None:
            raise LookupError(f"no valid checkpoint at or before step {p['target_step']}")
        window, lr_scale, ramp = int(p.get("skip_batches", 0)), p.get("lr_scale"), int(p.get("ramp_steps", 0))
        # the window was counted from the decided target; an older load drains the steps between too
        window += max(0, int(p["target_step"]) - target) * self.batches_per_step()
        carried = self.carried_skip(target, a.id)
        skip = window + carried
        self.status.set("recovering")
        moved = self.ledger.quarantine_newer_than(target, a.id)
        out = {"target_step": target, "skip_batches": skip, "quarantined": moved}
        if carried:
            out |= {"skip_window": window, "carried_skip": carried}
        # torchft mode too: replica group 0 reloads, then leads, and the other groups heal from it
        # at the next quorum (training/ft.py); a refusal or a timeout goes cold with every group
        detail = await self._hot_rollback(a, target, skip, lr_scale, ramp) if self.generations.alive() else None
        if detail is not None and detail[0]:
            return {"mode": "hot", **out, "detail": detail[1]}
        if detail is not None:
            self._log.warning("hot rollback failed, restarting cold", detail=detail[1])
        await self.generations.stop(f"cold rollback to step {target} (action {a.id})")
        scale = float(lr_scale) if lr_scale is not None else self.status.lr_scale
        self._after_rollback(a, target)
        await self.generations.launch(load_step=target, skip_batches=skip, lr_scale=scale,
                                      ramp_steps=ramp if lr_scale is not None else 0,
                                      reason=f"rollback (action {a.id})")
        return {"mode": "cold", **out, "generation": self.generations.id, "warm_spare": self._spare(),
                "detail": detail[1] if detail else ""}

    async def _hot_rollback(self, a, target: int, skip: int, lr_scale, ramp: int) -> tuple[bool, str]:
        """Reload `target` in the running trainer: (acknowledged ok, detail)."""
        gen = self.generations.current
        fields = {"kind": "rollback", "step": target, "skip_batches": skip, "reason": f"action {a.id}"}
        if lr_scale is not None and float(lr_scale) != self.status.lr_scale:
            fields.update(lr_scale=float(lr_scale), ramp_steps=ramp)
        if not self.directives.is_pending(a.directive_id):
            self._send(a, **fields)
        self._suite.expect_pause(time.time() + self.directive_timeout_s)
        ack = await self.directives.wait(a.directive_id, self.directive_timeout_s,
                                         alive=lambda: gen.exited is None and gen.alive())
        if ack is None or not ack.ok:
            self.directives.drop(a.directive_id)
            return False, ack.detail if ack else "not acknowledged in time, or the trainer died"
        if lr_scale is not None:
            self.status.lr_scale = float(lr_scale)
        self._after_rollback(a, target)
        self.status.set("running")
        return True, ack.detail

    def carried_skip(self, load_step: int | None, action_id: int | None = None) -> int:
        """Batches the current trajectory skipped after checkpoint `load_step` (earlier rollbacks'
        data windows), which a new load of it must skip again (supervisor/data_lineage.py).

        Only loads made before action `action_id` was journaled count: an action resumed by a
        restarted daemon must not count the generation its first attempt launched."""
        actions = self._journal.actions(limit=1_000_000)
        own = self._journal.action(action_id) if action_id is not None else None
        before = own["created_at"] if own else float("inf")
        loads = [(g["started_at"], Load(g["load_step"] or None, int(g["skip_batches"] or 0)))
                 for g in self._journal.generations(limit=1_000_000) if g["started_at"] < before]
        for act in actions:
            if act["updated_at"] >= before:
                continue
            out = act.get("outcome")
            if act["kind"] in (ROLLBACK, ROLLBACK_LR_DOWN) and act["state"] == "done" and isinstance(out, dict) \
                    and out.get("mode") == "hot":
                loads.append((act["updated_at"], Load(int(out["target_step"]), int(out.get("skip_batches", 0)))))
        return carried_skip([load for _, load in sorted(loads, key=lambda t: t[0])], load_step)

    def batches_per_step(self) -> int:
        return max(1, int(self._journal.get_meta("batches_per_step", 1) or 1))

    def _after_rollback(self, a, target: int) -> None:
        self.ledger.quarantine_newer_than(target, a.id)  # anything saved between the order and the ack
        self._suite.reset_generation(self.generations.id, time.time(), resume_step=target, world_size=self._ranks)
        self._count_lost(int(a.params.get("from_step", self.status.last_step)) - target)
        self.status.last_step = target

    def _count_lost(self, steps: int) -> int:
        steps = max(0, steps)
        median = statistics.median(self._step_times) if self._step_times else 0.0
        self._metrics.add_lost(steps=steps, gpu_hours=lost_gpu_hours(steps, median, self._ranks))
        return steps

    async def restart(self, a, *, hang: bool = False) -> dict:
        group = await self._restart_group(a, hang=hang)
        if group is not None:
            return group
        p = a.params
        out: dict = {}
        self.status.set("recovering")
        gen = self.generations.current
        if hang and gen is not None:
            out["stacks"] = (await asyncio.to_thread(gen.dump_stacks))[-self._stack_dump_chars:]
        # A hung rank (SIGSTOPped, or stuck in a collective) ignores SIGTERM: its stacks are
        # already dumped, so kill at once.
        await self.generations.stop(f"{a.kind} (action {a.id})", grace_s=0.0 if hang else None)
        backoff = float(p.get("backoff_seconds", 0.0))
        if backoff > 0:
            self._log.info("backing off before restart", seconds=backoff)
            await asyncio.sleep(backoff)
        target = p.get("target_step")
        load = self.ledger.load_target(int(target) if target is not None else None)
        lost = self._count_lost(int(p.get("from_step", self.status.last_step)) - (load or 0))
        if load is not None:
            self.ledger.quarantine_newer_than(load, a.id)
        layout = self._next_layout(a) if p.get("next_layout") else None
        if p.get("next_layout"):
            out["layout"] = layout[1] if layout else "unchanged: no next preflight-valid layout (paged)"
        carried = self.carried_skip(load, a.id)
        if carried:
            out["carried_skip"] = carried
        await self.generations.launch(load_step=load, skip_batches=carried, lr_scale=self.status.lr_scale,
                                      reason=f"{a.kind} (action {a.id})",
                                      layout_index=None if layout is None else layout[0],
                                      layout_label=None if layout is None else layout[1])
        return out | {"load_step": load, "generation": self.generations.id, "backoff_s": backoff, "lost_steps": lost,
                      "warm_spare": self._spare()}

    def _spare(self) -> str:
        """How the new generation started: "used" (a warm spare became it), or why it started cold."""
        return getattr(self.generations.current, "spare", "off")

    async def _restart_group(self, a, *, hang: bool = False) -> dict | None:
        """torchft mode (supervisor/launch/torchft.py): the failed rank's replica group alone is
        relaunched while the other groups keep stepping, and heals from them (a hung group's stacks
        are dumped first, stopped ranks included). None when this is not that case (no replica
        groups, no rank named, or no live peer to heal from): a job restart. Either way the
        detectors watch the generation again without that group's old beats."""
        from supervisor.launch.torchft import GroupExcluded

        gen = self.generations.current
        rank = a.finding.rank if a.finding is not None else None
        if gen is None or not hasattr(gen, "restart_group") or rank is None or a.params.get("next_layout"):
            return None
        group = gen.group_of(rank)
        if not any(gen.group_alive(g) for g in range(len(gen.groups)) if g != group):
            return None
        stacks = {}
        if hang:
            text = await asyncio.to_thread(gen.dump_group_stacks, group)
            stacks = {"stacks": text[-self._stack_dump_chars:]}
        excluded: GroupExcluded | None = None
        try:
            out = await asyncio.to_thread(gen.restart_group, group, f"{a.kind} (action {a.id})")
        except GroupExcluded as e:
            excluded = e
        now = time.time()
        self._suite.group_restarted(gen.ranks_of(group), now, relaunched=excluded is None)
        # the other groups stall while torchft drops the dead group (and admits the new one): a stall
        # of up to that long is torchft reconfiguring, not a hang (the survivors' step clock had
        # kept running since their last step before the death)
        self._suite.expect_pause(now + gen.reconfigure_s)
        if excluded is not None:
            self.pager.page(f"{excluded}: replica group {group} excluded, the other groups train on", action_id=a.id,
                            node=(a.finding.evidence or {}).get("host"))
            return {"group_restart": False, "excluded": True, "replica_group": group, "reason": str(excluded),
                    **stacks}
        self._log.warning("replica group relaunched", replica_group=group, action_id=a.id, pid=out["pid"])
        return {"group_restart": True, "generation": self.generations.id, **out, **stacks}

    def _next_layout(self, a) -> tuple[int, str] | None:
        """The next preflight-valid layout, or None (paged: the restart stays on the current one,
        and the outcome says so instead of claiming a layout change that did not happen)."""
        nxt = self._layouts.next(self.generations.layout_index) if self._layouts is not None else None
        if nxt is None:
            self.pager.page("repeated OOM: the policy asked for the next safer layout, but no later "
                            "[preflight] layout passes preflight: restarting on the current one",
                            action_id=a.id)
        return nxt

    async def kill_restart_hang(self, a) -> dict:
        return await self.restart(a, hang=True)

    async def exclude_node(self, a) -> dict:
        """Cordon the node through the launcher when it can (Kubernetes), journal it, and restart
        (the next generation is scheduled elsewhere). A launcher that cannot (one machine) refuses:
        a human is paged with the node's name and the run restarts where it is."""
        node = a.params.get("node")
        cordon = getattr(self.generations.launcher, "exclude_node", None)
        if node and cordon is not None:
            done = await asyncio.to_thread(cordon, node)  # idempotent: a resumed action cordons again
            excluded = sorted(set(self._journal.get_meta("excluded_nodes") or []) | {node})
            self._journal.set_meta("excluded_nodes", excluded)
            self._log.warning("node excluded (cordoned)", node=node, action_id=a.id)
            return {"excluded": True, "node": node, "cordon": done, **await self.restart(a)}
        node = node or "this node"
        self.pager.page(f"the policy would exclude node {node} after repeated failures there, but this run has "
                        "only one node: not excluded, restarting on it", action_id=a.id, node=node)
        return {"excluded": False, "node": node, "paged": True, **await self.restart(a)}

    async def stop_and_page(self, a) -> dict:
        reason = (a.decision.reason if a.decision else "") or a.params.get("reason") or "budget exhausted"
        gen = self.generations.current
        mode = "none"
        if gen is not None and gen.alive():
            if a.directive_id is None:
                self._send(a, kind="stop", reason=reason[:500])
            mode = "directive" if await self._exits_within(gen, self.directive_timeout_s) else "killed"
        await self.generations.stop(f"stop and page (action {a.id})")
        self.status.set("stopped")
        self.pager.page(reason, action_id=a.id)
        return {"stopped": mode, "paged": True, "reason": reason}

    async def _exits_within(self, gen, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while gen.exited is None and gen.alive() and time.monotonic() < deadline:
            await asyncio.sleep(self._poll_s)
        return gen.exited is not None or not gen.alive()

    async def pause(self, a) -> dict:
        """Operator pause: the trainer finishes its step, checkpoints and exits (a `stop`
        directive); the run waits in state "paused" with everything kept. Safe to repeat."""
        gen = self.generations.current
        how = "no trainer running"
        if self.generations.alive():
            if not self.directives.is_pending(a.directive_id):
                self._send(a, kind="stop", reason=f"paused by operator (action {a.id})")
            self._suite.expect_pause(time.time() + self.directive_timeout_s)
            exited = await self._exits_within(gen, self.directive_timeout_s)
            how = "trainer checkpointed and exited" if exited else "killed (no exit in time)"
        finished = self.status.trainer_finished
        await self.generations.stop(f"paused (action {a.id})")
        self.status.trainer_finished = None
        step = finished[0] if finished else self.status.last_step
        if finished and finished[1] == "completed":
            self.status.finish()
            return {"paused": False, "note": "the run completed before the pause took effect", "step": step}
        self.status.set("paused")
        return {"paused": True, "step": step, "stopped": how, "newest_checkpoint": self.ledger.load_target()}

    async def resume_run(self, a) -> dict:
        """Operator resume: a new generation from the newest valid checkpoint, same LR scale."""
        if self.generations.alive():
            return {"note": "a generation is already running", "generation": self.generations.id}
        load = self.ledger.load_target()
        await self.generations.launch(load_step=load, skip_batches=0, lr_scale=self.status.lr_scale,
                                      reason=f"resumed by operator (action {a.id})")
        return {"load_step": load, "generation": self.generations.id, "lr_scale": self.status.lr_scale}

    async def reshard(self, a) -> dict:
        """Restart on ``params["ranks"]`` ranks from the same DCP checkpoint: fewer after a node
        is lost, the full count again when it returns. The trainer's data position is global
        (`training/data.py`), so the new DP degree continues from the exact sample the old one
        reached. A running trainer first saves a checkpoint at its next step boundary (nothing is
        redone); a dead one restarts from the newest valid checkpoint. Safe to repeat: a resumed
        action finds the directive acknowledged or not and the generation stopped or not."""
        new, old = int(a.params["ranks"]), int(a.params.get("ranks_from", self._ranks))
        if self.generations.alive() and self.generations.ranks == new:  # resumed after its launch
            self._ranks = new
            return {"ranks_from": old, "ranks_to": new, "generation": self.generations.id,
                    "note": f"generation {self.generations.id} already runs on {new} ranks"}
        self.status.set("recovering")
        saved = None
        if self.generations.alive():
            if not self.directives.is_pending(a.directive_id):
                self._send(a, kind="checkpoint_now", reason=f"reshard {old} -> {new} ranks (action {a.id})")
            gen = self.generations.current
            ack = await self.directives.wait(a.directive_id, self.directive_timeout_s,
                                             alive=lambda: gen.exited is None and gen.alive())
            saved = ack.detail if ack is not None and ack.ok else None
        await self.generations.stop(f"reshard {old} -> {new} ranks (action {a.id})")
        load = self.ledger.load_target()
        lost = self._count_lost(int(a.params.get("from_step", self.status.last_step)) - (load or 0))
        self._ranks = new
        await self.generations.launch(load_step=load, skip_batches=0, lr_scale=self.status.lr_scale,
                                      reason=f"reshard {old} -> {new} ranks (action {a.id})", ranks=new)
        return {"ranks_from": old, "ranks_to": new, "load_step": load, "checkpoint_now": saved,
                "generation": self.generations.id, "lost_steps": lost}

    async def grow(self, a) -> dict:
        """Grow the run back onto returned nodes. `supervisor/grow.py` planned it only once a
        checkpoint newer than the nodes' readiness was saved, so this stops the generation at once and
        starts the next on every live, non-excluded node (the launcher's choice) from the newest valid
        checkpoint: DP back up, accumulation back down, same global batch and data position. Safe to
        repeat: a resumed action that finds a generation running on the wanted nodes is done; one that
        finds none running starts it."""
        p = a.params
        want, returned = sorted(p.get("nodes_to") or []), list(p.get("returned") or [])
        gen = self.generations.current
        if self.generations.alive() and sorted(getattr(gen, "nodes", ()) or ()) == want:
            return {"nodes_from": p.get("nodes_from"), "nodes_to": want, "returned": returned,
                    "generation": self.generations.id, "note": f"generation {self.generations.id} already runs on {want}"}
        self.status.set("recovering")
        await self.generations.stop(f"grow back onto {', '.join(returned)} (action {a.id})")
        load = self.ledger.load_target()
        lost = self._count_lost(self.status.last_step - (load or 0))
        await self.generations.launch(load_step=load, skip_batches=0, lr_scale=self.status.lr_scale,
                                      reason=f"grow back: {p.get('reason', '')} (action {a.id})"[:500])
        got = sorted(getattr(self.generations.current, "nodes", ()) or ())
        if got != want:
            self._log.warning("grew back onto fewer nodes than planned (a node was lost again while starting)",
                              planned=want, got=got, action_id=a.id)
        return {"nodes_from": p.get("nodes_from"), "nodes_to": got, "returned": [n for n in returned if n in got],
                "load_step": load, "generation": self.generations.id, "lost_steps": lost}

    def _send(self, a, **fields):
        d = self.directives.send(a.id, **fields)
        a.directive_id = d.id
        a.params = dict(a.params, directive_id=d.id)
        return d
