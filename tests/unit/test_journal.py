"""Journal: schema and migrations, WAL, action intent/outcome across a crash, idempotency,
concurrent readers, step downsampling, and that nothing is ever deleted."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from supervisor.journal import (
    SCHEMA_VERSION,
    IdempotencyConflict,
    InvalidTransition,
    Journal,
    JournalError,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite"


@pytest.fixture
def j(jpath: Path):
    with Journal.open(jpath) as journal:
        yield journal


def run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# --- schema -------------------------------------------------------------------------------


def test_schema_wal_and_version(j, jpath):
    assert j.journal_mode == "wal"
    assert j.schema_version == SCHEMA_VERSION >= 1
    raw = sqlite3.connect(jpath)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "runs", "generations", "incidents", "findings", "decisions", "actions",
            "commands", "checkpoints", "steps", "steps_recent"} <= tables
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent on the file
    raw.close()


def test_synchronous_full_by_default(j):
    assert j._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopen_keeps_data_and_does_not_remigrate(jpath):
    with Journal.open(jpath) as a:
        a.set_meta("run", {"id": "r1"})
    with Journal.open(jpath) as b:
        assert b.get_meta("run") == {"id": "r1"}
        assert b.schema_version == SCHEMA_VERSION


def test_newer_schema_is_refused(jpath):
    Journal.open(jpath).close()
    raw = sqlite3.connect(jpath)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(JournalError, match="newer"):
        Journal.open(jpath)


def test_readonly_cannot_write(jpath):
    Journal.open(jpath).close()
    with Journal.open(jpath, readonly=True) as ro:
        with pytest.raises(JournalError, match="read-only"):
            ro.open_incident("hang")


# --- generations, incidents -----------------------------------------------------------------


def test_generation_lifecycle(j):
    assert j.last_generation() is None
    g1 = j.record_generation_start(load_step=0, layout={"dp": 8}, pids=[11, 12], at=100.0)
    g2 = j.record_generation_start(load_step=1200, skip_batches=300, lr_scale=0.5, at=200.0)
    assert (g1, g2) == (1, 2)
    j.record_generation_end(g1, exit_code=1, reason="rank 3 died", state="crashed", at=150.0)
    last = j.last_generation()
    assert last["id"] == 2 and last["load_step"] == 1200 and last["skip_batches"] == 300
    assert last["lr_scale"] == 0.5 and last["state"] == "running" and last["ended_at"] is None
    first = j.generation(1)
    assert first["pids"] == [11, 12] and first["layout"] == {"dp": 8}
    assert (first["exit_code"], first["state"], first["ended_at"]) == (1, "crashed", 150.0)
    with pytest.raises(ValueError):
        j.record_generation_start(generation=2)


def test_incident_detail_links_findings_decisions_actions(j):
    inc = j.open_incident("loss_spike", onset_step=1500, at=10.0)
    f = j.add_finding("loss_spike", 1500, "warn", {"z": 7.5}, incident_id=inc, rank=0,
                      wall_time=9.0)
    d = j.add_decision("rollback", {"step": 1200, "skip_batches": 300}, "spike did not recover",
                       incident_id=inc, finding_id=f)
    a = j.action_intent("rollback", {"step": 1200}, decision_id=d).id
    other = j.open_incident("hang")
    j.add_finding("hang", 7, "crit", incident_id=other)
    detail = j.incident_detail(inc)
    assert detail["kind"] == "loss_spike" and detail["onset_step"] == 1500
    assert [x["id"] for x in detail["findings"]] == [f]
    assert detail["findings"][0]["evidence"] == {"z": 7.5}
    assert [x["id"] for x in detail["decisions"]] == [d]
    assert detail["decisions"][0]["params"] == {"step": 1200, "skip_batches": 300}
    assert detail["decisions"][0]["advisory"] is False
    assert [x["id"] for x in detail["actions"]] == [a]
    assert j.incident_detail(9999) is None


def test_incident_states(j):
    a = j.open_incident("oom")
    b = j.open_incident("hang")
    assert j.ack_incident(a, "alice") is True
    assert j.ack_incident(a, "bob") is False
    assert j.incident(a)["state"] == "acked" and j.incident(a)["acked_by"] == "alice"
    assert j.close_incident(a, "fixed") is True and j.close_incident(a) is False
    assert j.incident(a)["state"] == "closed"
    assert [i["id"] for i in j.incidents(state="unresolved")] == [b]
    assert [i["id"] for i in j.incidents(kind="oom")] == [a]
    with pytest.raises(KeyError):
        j.close_incident(999)


# --- actions ------------------------------------------------------------------------------


def test_action_intent_outcome_lifecycle(j):
    aid, created = j.action_intent("restart", {"load_step": 1200}, actor="policy", at=1.0)
    assert created and j.action(aid)["state"] == "intent"
    assert [a["id"] for a in j.unfinished_actions()] == [aid]
    j.action_running(aid, at=2.0)
    assert j.unfinished_actions()[0]["state"] == "running"
    j.action_done(aid, {"generation": 4}, at=3.0)
    a = j.action(aid)
    assert (a["state"], a["outcome"], a["created_at"], a["updated_at"]) == (
        "done", {"generation": 4}, 1.0, 3.0)
    assert j.unfinished_actions() == []
    assert j.action_done(aid) is False  # repeat of the same outcome: no-op
    with pytest.raises(InvalidTransition):
        j.action_failed(aid, {"error": "late"})
    with pytest.raises(InvalidTransition):
        j.action_running(aid)


def test_failed_and_abandoned(j):
    a = j.action_intent("checkpoint_now").id
    b = j.action_intent("stop").id
    j.action_failed(a, {"error": "timeout"})
    j.action_abandoned(b, "daemon restarted; generation gone")
    assert j.action(a)["state"] == "failed" and j.action(a)["outcome"] == {"error": "timeout"}
    assert j.action(b)["outcome"] == {"reason": "daemon restarted; generation gone"}
    assert j.unfinished_actions() == []


def test_unfinished_actions_survive_a_killed_daemon(jpath):
    """A process writes intents then dies by SIGKILL mid-action; a new one finds them."""
    Journal.open(jpath).close()
    res = run_py(f"""
        import os, signal
        from supervisor.journal import Journal
        j = Journal.open({str(jpath)!r})
        done = j.action_intent("skip_updates", {{"n": 1}}).id
        j.action_done(done, {{"ok": True}})
        a = j.action_intent("restart", {{"load_step": 1200}}, request_id="op-7", actor="alice").id
        b = j.action_intent("rollback", {{"step": 1200}}).id
        j.action_running(b)
        print(a, b, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert res.returncode == -9, res.stderr
    a, b = map(int, res.stdout.split())
    with Journal.open(jpath) as j:
        un = j.unfinished_actions()
        assert [(x["id"], x["kind"], x["state"]) for x in un] == [
            (a, "restart", "intent"), (b, "rollback", "running")]
        assert un[0]["actor"] == "alice" and un[0]["params"] == {"load_step": 1200}
        # the restarted daemon can resolve them
        j.action_done(a, {"generation": 2})
        j.action_abandoned(b, "superseded")
        assert j.unfinished_actions() == []


def test_request_id_idempotency(j):
    first = j.action_intent("rollback", {"step": 1200}, request_id="req-1", actor="bob")
    again = j.action_intent("rollback", {"step": 1200}, request_id="req-1", actor="bob")
    assert first.created and not again.created and again.id == first.id
    assert len(j.actions()) == 1
    with pytest.raises(IdempotencyConflict, match="req-1"):
        j.action_intent("rollback", {"step": 900}, request_id="req-1", actor="bob")
    n1 = j.action_intent("rollback", {"step": 1200}).id  # no request id: always new
    n2 = j.action_intent("rollback", {"step": 1200}).id
    assert len({first.id, n1, n2}) == 3
    assert j.action_by_request("req-1")["id"] == first.id


def test_request_id_idempotency_across_threads(j):
    ids, errors = [], []

    def worker():
        try:
            ids.append(j.action_intent("pause", {}, request_id="same", actor="ops").id)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and len(j.actions()) == 1


# --- commands, checkpoints, history -------------------------------------------------------


def test_commands_audit(j):
    j.record_command(actor="alice", role="operator", command="rollback", args={"step": 1200},
                     reason="spike", request_id="r1", accepted=True, result="action 3", at=5.0)
    j.record_command(actor="mallory", role="viewer", command="rollback", args={"step": "../x"},
                     accepted=False, result="checkpoint name '../x' looks like a path", at=6.0)
    newest, oldest = j.commands()
    assert newest["actor"] == "mallory" and newest["accepted"] is False
    assert "looks like a path" in newest["result"] and newest["args"] == {"step": "../x"}
    assert (oldest["actor"], oldest["role"], oldest["reason"], oldest["accepted"]) == (
        "alice", "operator", "spike", True)
    assert len(j.commands(limit=1)) == 1


def test_checkpoint_rows_upsert_and_keep_history(j):
    j.record_checkpoint(1200, save_seconds=42.0, at=1.0)  # saved event before the scan sees it
    j.record_checkpoint(1200, path="/ck/step-1200", state="valid", size=1000, at=2.0)
    j.record_checkpoint(1500, path="/ck/step-1500", state="valid", save_seconds=40.0, at=3.0)
    j.record_checkpoint(1200, pinned=True)
    j.record_checkpoint(1500, state="quarantined", path="/q/step-1500.gen2")
    j.record_checkpoint(1500, path="/ck/step-1500", state="valid", at=9.0)  # re-saved later
    cur = {r["step"]: r for r in j.checkpoints()}
    assert cur[1200]["state"] == "valid" and cur[1200]["pinned"] is True
    assert cur[1200]["save_seconds"] == 42.0 and cur[1200]["size"] == 1000
    assert cur[1500]["state"] == "valid" and cur[1500]["seen_at"] == 9.0
    hist = [r["state"] for r in j.checkpoints(include_history=True) if r["step"] == 1500]
    assert hist == ["quarantined", "valid"]
    assert j.pinned_checkpoints() == [1200]
    with pytest.raises(ValueError):
        j.record_checkpoint(1, state="gone")


def test_failure_history(j):
    j.record_generation_start(at=1000.0)
    for kind, t in [("crash", 2000.0), ("loss_spike", 2500.0), ("hang", 3000.0),
                    ("oom", 4000.0)]:
        j.open_incident(kind, at=t)
    j.record_checkpoint(100, state="valid", save_seconds=30.0, at=1.0)
    j.record_checkpoint(200, state="valid", save_seconds=34.0, at=2.0)
    h = j.failure_history()
    assert h.failure_times == [2000.0, 3000.0, 4000.0]  # the spike is not a failure
    assert h.observed_since == 1000.0
    assert h.save_seconds == [30.0, 34.0]
    assert j.failure_history(kinds=["hang"], since=2500).failure_times == [3000.0]


# --- steps --------------------------------------------------------------------------------


def rec(step: int, gen: int = 1, loss: float = 2.0, **kw) -> dict:
    return {"generation": gen, "step": step, "loss": loss, "grad_norm": 1.0, "lr": 3e-4,
            "lr_scale": 1.0, "tokens_per_s": 1e5, "step_seconds": 0.5,
            "update_skipped": False, "wall_time": 1000.0 + step, **kw}


def test_steps_ring_and_downsampling(jpath):
    with Journal.open(jpath, Journal.Config(recent_steps=50, keep_every=10)) as j:
        assert j.add_steps(rec(s) for s in range(1, 201)) == 200
        recent = j.recent_steps(limit=1000)
        assert [r["step"] for r in recent] == list(range(151, 201))  # bounded: last 50 only
        assert [r["step"] for r in j.step_history()] == list(range(10, 201, 10))  # forever
        assert j.counts()["steps_recent"] == 50
        assert recent[-1]["lr"] == 3e-4 and recent[-1]["update_skipped"] is False


def test_steps_resend_is_ignored_and_rollback_keeps_both_generations(j):
    j.add_steps([rec(s) for s in range(1, 11)])
    assert j.add_steps([rec(s) for s in range(5, 11)]) == 0  # a replayed spool
    j.add_steps([rec(s, gen=2, loss=1.5) for s in range(6, 9)])  # after rollback to 5
    recent = j.recent_steps(limit=100)
    assert [(r["generation"], r["step"]) for r in recent][-4:] == [(1, 10), (2, 6), (2, 7), (2, 8)]
    assert [r["step"] for r in j.recent_steps(limit=100, generation=2)] == [6, 7, 8]


def test_non_finite_losses_round_trip(j):
    j.add_step(rec(1, loss=float("nan"), grad_norm=float("inf")))
    [r] = j.recent_steps()
    assert math.isnan(r["loss"]) and r["grad_norm"] == math.inf


def test_step_objects_with_attributes(j):
    from supervisor.protocol import StepRecord
    r = StepRecord(run_id="r", generation=3, step=7, loss=2.5, grad_norm=0.9, lr=1e-4,
                   lr_scale=0.5, tokens_per_s=1.0, step_seconds=1.0, wall_time=5.0,
                   update_skipped=True)
    j.add_step(r)
    [row] = j.recent_steps()
    assert (row["generation"], row["step"], row["lr_scale"], row["update_skipped"]) == (
        3, 7, 0.5, True)


# --- concurrency and durability -----------------------------------------------------------


def test_second_process_reads_while_first_writes(j, jpath):
    """WAL: a reader in another process sees committed rows and is not blocked by an open
    write transaction (with no busy wait: timeout 0)."""
    j.open_incident("crash")
    with j._tx() as c:  # hold a write transaction open, with an uncommitted row
        c.execute("INSERT INTO incidents(opened_at, kind, state) VALUES (1, 'hang', 'open')")
        res = run_py(f"""
            import sqlite3
            c = sqlite3.connect("file:{jpath}?mode=ro", uri=True, timeout=0)
            print(c.execute("SELECT COUNT(*) FROM incidents").fetchone()[0])
            from supervisor.journal import Journal
            ro = Journal.open({str(jpath)!r}, readonly=True)
            print(len(ro.incidents()))
        """)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["1", "1"]  # committed only, and no "database is locked"
    assert len(j.incidents()) == 2


def test_nothing_is_deleted(j):
    """Every audit table only grows; the module has no DELETE statement."""
    src = (REPO / "supervisor" / "journal.py").read_text().upper()
    assert "DELETE FROM" not in src and "DROP TABLE" not in src
    inc = j.open_incident("crash")
    j.close_incident(inc)
    a = j.action_intent("restart").id
    j.action_done(a)
    j.record_command(actor="x", command="pause", accepted=False)
    j.record_checkpoint(5, state="valid")
    j.record_checkpoint(5, state="deleted_by_retention")
    j.record_generation_start()
    counts = j.counts()
    assert counts["incidents"] == 1 and counts["actions"] == 1 and counts["commands"] == 1
    assert counts["checkpoints"] == 1 and counts["generations"] == 1
    assert j.incident(inc)["state"] == "closed"  # closed, still there
    assert j.checkpoints()[0]["state"] == "deleted_by_retention"
