"""A heavy action a previous daemon journaled but did not finish is resumed by the next one, and
it still counts against its rung's budget: a restart resumed after a daemon crash is one of
`max_restarts` (it used to be dropped from the policy history, so the next restart read
"restart 1 of 5" again). Real SQLite journal, real Policy/DecisionLoop; the remedy is a stand-in
that returns an outcome (no trainer runs here)."""

from __future__ import annotations

import asyncio
import structlog

from supervisor.actions import ActionRunner, DecisionLoop
from supervisor.detect.findings import Finding
from supervisor.journal import Journal
from supervisor.metrics import Metrics
from supervisor.policy import History, Policy


class Remedies:
    def __init__(self) -> None:
        self.resumed = []

    async def resume(self, a):
        self.resumed.append(a.id)
        return {"load_step": a.params.get("target_step"), "generation": 1}


def journaled_restart(j: Journal, wall_time: float) -> dict:
    """What a daemon leaves behind when it dies between a restart's intent and its outcome."""
    f = Finding("dead_rank", 44, "critical", wall_time, {"exit_code": -9, "host": "node-a"}, rank=1)
    fid = j.add_finding(f.kind, f.step, f.severity, f.evidence, rank=f.rank, wall_time=f.wall_time)
    params = {"action": "restart", "target_step": 40, "skip_batches": 0, "backoff_seconds": 0.0, "rung": 3}
    did = j.add_decision("restart", params, "rank 1 died", finding_id=fid)
    j.action_intent("restart", params, decision_id=did)
    (row,) = j.unfinished_actions()
    return row


def runner(j: Journal, loop: DecisionLoop, remedies) -> ActionRunner:
    return ActionRunner(loop, remedies, j, Metrics(), structlog.get_logger(), spawn=asyncio.ensure_future,
                        context=lambda: {}, on_done=lambda a: None)


def test_a_resumed_restart_counts_against_the_restart_budget(tmp_path):
    j = Journal.open(tmp_path / "journal.sqlite")
    try:
        row = journaled_restart(j, wall_time=1_000.0)
        loop = DecisionLoop(Policy(), History())  # the new daemon: the history the old one never saved
        remedies = Remedies()
        asyncio.run(runner(j, loop, remedies).resume(row))
        assert remedies.resumed == [row["id"]]
        assert j.unfinished_actions() == []
        (entry,) = loop.history.restarts
        assert (entry.kind, entry.step, entry.wall_time, entry.host) == ("dead_rank", 44, 1_000.0, "node-a")
        assert loop.history.restarts_since(0.0) == [entry]
    finally:
        j.close()


def test_a_resumed_operator_action_without_a_finding_records_nothing(tmp_path):
    j = Journal.open(tmp_path / "journal.sqlite")
    try:
        params = {"action": "restart", "target_step": 40, "rung": 3}
        j.action_intent("restart", params, actor="alice")  # no decision, no finding
        (row,) = j.unfinished_actions()
        loop = DecisionLoop(Policy(), History())
        asyncio.run(runner(j, loop, Remedies()).resume(row))
        assert loop.history.restarts == []
    finally:
        j.close()
