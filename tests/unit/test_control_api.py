"""The on-call control plane (/v1 reads and commands) with a real Supervisor, a real journal, a
real checkpoint catalog holding real DCP checkpoints (tests/fixtures/dcp), and the real FastAPI
app. No trainer is launched: a generation is a stand-in process object whose acks arrive
through the real telemetry endpoint, exactly as rank 0 sends them."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.settings import Settings
from tests.control_fixtures import client, make_checkpoint, sup, tokens  # noqa: F401 (client, sup, tokens: fixtures)


def hdr(tokens, role):
    return {"Authorization": f"Bearer {tokens[role]}"}


def ack_event(directive_id, ok=True, step=33, detail="ok", directive="x"):
    return {"kind": "directive_applied", "directive_id": directive_id, "directive": directive, "step": step,
            "ok": ok, "detail": detail, "wall_time": time.time()}


def send_events(client, sup, *events):
    r = client.post("/v1/telemetry", json={"run_id": "t", "generation": sup.generation, "events": list(events)},
                    headers={"Authorization": f"Bearer {sup.trainer_token}"})  # as the daemon's own ranks
    assert r.status_code == 200, r.text


def wait(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def snapshot(sup):
    c = sup.journal.counts()
    return ({k: v for k, v in c.items() if k != "commands"},
            sorted(p.name for p in (sup.workdir / "checkpoint").iterdir()),
            sorted(p.name for p in (sup.workdir / "quarantine").iterdir()))


# --- auth and audit -------------------------------------------------------------------------

def test_no_token_is_401_and_journaled_as_anonymous(sup, client):
    before = snapshot(sup)
    r = client.post("/v1/commands/rollback", json={"to_step": 20, "reason": "test"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in r.json()["error"]
    row = sup.journal.commands()[0]
    assert (row["actor"], row["command"], row["accepted"], row["reason"]) == ("anonymous", "rollback", False, "test")
    assert row["result"].startswith("401")
    assert snapshot(sup) == before


def test_viewer_token_on_a_command_is_403_and_journaled_with_its_name(sup, client, tokens):
    r = client.post("/v1/commands/pause", json={"reason": "x"}, headers=hdr(tokens, "viewer"))
    assert r.status_code == 403 and "role viewer; this needs operator" in r.json()["error"]
    row = sup.journal.commands()[0]
    assert (row["actor"], row["role"], row["accepted"]) == ("vic", "viewer", False)
    assert sup.action is None and sup.pending == {}


def test_operator_cannot_change_the_policy_admin_can(sup, client, tokens):
    r = client.post("/v1/policy", json={"mode": "advise", "reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 403 and sup.mode == "auto"
    r = client.post("/v1/policy", json={"mode": "advise", "reason": "night shift"}, headers=hdr(tokens, "admin"))
    assert r.status_code == 200 and sup.mode == "advise"
    assert sup.journal.get_meta("mode") == "advise"  # survives a daemon restart


def test_unknown_token_is_401_and_no_token_value_is_stored(sup, client, tokens, tmp_path):
    r = client.get("/v1/status", headers={"Authorization": "Bearer tsv_nope"})
    assert r.status_code == 401
    r = client.post("/v1/commands/lr", json={"scale": 0.5, "reason": "r", "wait_s": 0}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200
    raw = (sup.journal.path).read_bytes() + b"".join(p.read_bytes() for p in sup.journal.path.parent.glob("*-wal"))
    for t in (tokens["operator"], tokens["admin"], tokens["viewer"], "tsv_nope"):
        assert t.encode() not in raw


def test_reads_need_a_token_once_tokens_exist(client, tokens):
    assert client.get("/v1/status").status_code == 401
    r = client.get("/v1/status", headers=hdr(tokens, "viewer"))
    assert r.status_code == 200 and r.json()["step"] == 33


def test_without_tokens_reads_are_open_and_commands_refused(tmp_path):
    s = Settings.load(run={"workdir": str(tmp_path / "w"), "run_id": "t"}, server={"port": 0})
    sup = Supervisor(s)
    try:
        c = TestClient(build_app(sup), base_url="http://127.0.0.1")
        assert c.get("/v1/status").status_code == 200
        r = c.post("/v1/commands/pause", json={"reason": "x"})
        assert r.status_code == 401 and "no tokens are configured" in r.json()["error"]
        s2 = Settings.load(run={"workdir": str(tmp_path / "w"), "run_id": "t"},
                           server={"port": 0, "allow_unauthenticated_loopback": True})
        sup.settings = s2
        r = TestClient(build_app(sup), base_url="http://127.0.0.1").post("/v1/policy", json={"mode": "off", "reason": "x"})
        assert r.status_code == 200 and sup.journal.commands()[0]["actor"] == "local"
    finally:
        sup.journal.close()


# --- reads ----------------------------------------------------------------------------------

def test_status_document_has_the_documented_keys(client, tokens, sup):
    sup.journal.open_incident("loss_spike", 31, summary="loss_spike", generation=0)
    st = client.get("/v1/status", headers=hdr(tokens, "viewer")).json()
    assert set(st) == {"schema", "run_id", "state", "mode", "generation", "step", "total_steps", "loss", "grad_norm",
                       "tokens_per_s", "lr", "lr_scale", "last_known_good", "newest_checkpoint", "open_incidents",
                       "action", "policy_now", "proposals", "pending_directives", "trainer_pids", "layout", "updated_at",
                       "checkpoint_interval", "recommended_checkpoint_interval", "nodes"}
    assert st["schema"] == 1 and st["newest_checkpoint"] == 30 and st["action"] is None
    assert st["open_incidents"][0]["kind"] == "loss_spike" and st["open_incidents"][0]["onset_step"] == 31
    assert st["policy_now"].startswith("watching incident")


def test_checkpoints_list_validity_and_quarantine(client, tokens):
    body = client.get("/v1/checkpoints", headers=hdr(tokens, "viewer")).json()
    by = {c["step"]: c for c in body["checkpoints"]}
    assert [s for s in by if by[s]["valid"]] == [10, 20, 30]
    assert by[25]["state"] == "corrupt" and "shard __1_0.distcp" in by[25]["reason"]
    assert [(q["step"], q["reason"]) for q in body["quarantined"]] == [(35, "corrupt: torn")]


def test_incident_show_and_ack(sup, client, tokens):
    iid = sup.journal.open_incident("hang", 12, summary="hang", generation=0)
    fid = sup.journal.add_finding("hang", 12, "critical", {"rank": 1}, incident_id=iid)
    sup.journal.add_decision("kill_restart_hang", {"action": "kill_restart_hang"}, "hung", incident_id=iid,
                             finding_id=fid)
    inc = client.get(f"/v1/incidents/{iid}", headers=hdr(tokens, "viewer")).json()
    assert [f["kind"] for f in inc["findings"]] == ["hang"] and inc["decisions"][0]["action"] == "kill_restart_hang"
    assert client.get("/v1/incidents/999", headers=hdr(tokens, "viewer")).status_code == 404
    r = client.post(f"/v1/incidents/{iid}/ack", json={"reason": "on it"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200 and sup.journal.incident(iid)["acked_by"] == "alice"
    r = client.post(f"/v1/incidents/{iid}/ack", json={"reason": "again"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200 and "already acknowledged by alice" in r.json()["message"]
    r = client.post("/v1/incidents/999/ack", json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 404 and sup.journal.commands()[0]["accepted"] is False
    # found by the schemathesis run: an id SQLite cannot hold was a 500; more than 18 digits is no id
    r = client.post(f"/v1/incidents/{2**70}/ack", json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 400 and "incident_id" in r.json()["error"]
    r = client.post(f"/v1/proposals/{2**70}/confirm", json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 400 and "decision_id" in r.json()["error"]
    r = client.post(f"/v1/proposals/{10**17}/confirm", json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 409


# --- rollback validation --------------------------------------------------------------------

@pytest.mark.parametrize("body, status, needle", [
    ({"to_step": 15}, 400, "no checkpoint step-15 in the catalog; valid checkpoints: [10, 20, 30]"),
    ({"to_step": 25}, 400, "step-25 is not valid (corrupt): shard __1_0.distcp"),
    ({"to_step": 35}, 400, "step-35 is in quarantine (corrupt: torn)"),
    ({"to_step": "../etc"}, 400, "looks like a path"),
    ({"to_step": -3}, 400, "must be >= 0"),
    ({"to_step": 20, "skip_batches": -1}, 400, "skip_batches: Input should be greater than or equal to 0"),
    ({"to_step": 20, "lr_scale": 0}, 400, "lr_scale"),
    ({"to_step": 20, "surprise": 1}, 400, "surprise"),
    ({"to_step": 20, "skip_batches": "5"}, 400, "skip_batches"),
    ({"to_step": 20, "reason": ""}, 400, "reason"),
    ({"to_step": 20, "reason": " \t\n "}, 400, "only whitespace"),
    ({"to_step": 20, "request_id": "a b"}, 400, "request_id"),
])
def test_bad_rollbacks_are_refused_naming_why_and_change_nothing(sup, client, tokens, body, status, needle):
    before = snapshot(sup)
    r = client.post("/v1/commands/rollback", json={"reason": "test"} | body, headers=hdr(tokens, "operator"))
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.json()
    assert snapshot(sup) == before and sup.action is None and sup.pending == {}
    row = sup.journal.commands()[0]
    assert row["command"] == "rollback" and row["accepted"] is False and row["actor"] == "alice"


def test_rollback_ahead_of_the_run_is_refused(sup, client, tokens):
    sup.last_step = 22
    r = client.post("/v1/commands/rollback", json={"to_step": 30, "reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 400 and "ahead of the run (at step 22)" in r.json()["error"]


@pytest.mark.parametrize("raw, needle", [(b"{nope", "not JSON"), (b'{"to_step": NaN, "reason": "x"}', "NaN"),
                                         (b"[1]", "JSON object"), (b"", "JSON body is required")])
def test_malformed_bodies_are_400(sup, client, tokens, raw, needle):
    r = client.post("/v1/commands/rollback", content=raw, headers=hdr(tokens, "operator") |
                    {"Content-Type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"]


def test_unknown_command_is_refused_and_journaled(sup, client, tokens):
    before = snapshot(sup)
    r = client.post("/v1/commands/explode", json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 400 and "unknown command 'explode'; known: rollback, pause" in r.json()["error"]
    assert snapshot(sup) == before
    assert sup.journal.commands()[0]["command"] == "explode"


def test_dry_run_shows_the_plan_and_does_nothing(sup, client, tokens):
    before = snapshot(sup)
    r = client.post("/v1/commands/rollback", json={"to_step": "step-20", "skip_batches": 7, "lr_scale": 0.5,
                                                   "ramp_steps": 4, "reason": "spike", "dry_run": True},
                    headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["target_step"] == 20 and plan["from_step"] == 33 and plan["steps_to_redo"] == 13
    assert plan["skip_batches"] == 7 and plan["lr_scale"] == 0.5 and plan["ramp_steps"] == 4
    assert plan["quarantine"] == [25, 30] and plan["mode"].startswith("hot")
    assert snapshot(sup) == before and sup.action is None and sup.pending == {}
    assert sup.journal.commands()[0]["result"].startswith("200 dry run: would roll back from step 33 to step 20")


# --- rollback execution, one action at a time, idempotency ----------------------------------

def test_operator_rollback_runs_hot_and_is_audited(sup, client, tokens):
    r = client.post("/v1/commands/rollback", json={"to_step": 20, "skip_batches": 3, "reason": "bad data",
                                                   "request_id": "rb-1"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    aid = r.json()["action_id"]
    wait(lambda: "a%d" % aid in sup.pending)
    d = sup.pending["a%d" % aid]
    assert (d.kind, d.step, d.skip_batches) == ("rollback", 20, 3)
    send_events(client, sup, ack_event(d.id, detail="rolled back to step 20"))
    wait(lambda: sup.action is None)
    a = sup.journal.action(aid)
    assert a["state"] == "done" and a["actor"] == "alice" and a["outcome"]["mode"] == "hot"
    assert 30 in a["outcome"]["quarantined"] and sup.last_step == 20
    assert sorted(p.name for p in (sup.workdir / "checkpoint").iterdir()) == ["step-10", "step-20"]
    kept = sorted(p.name.split(".")[0] for p in (sup.workdir / "quarantine").glob("step-*") if p.is_dir())
    assert kept == ["step-25", "step-30", "step-35"]  # moved aside, nothing deleted
    audit = client.get("/v1/audit", headers=hdr(tokens, "viewer")).json()["commands"][0]
    assert audit["command"] == "rollback" and audit["reason"] == "bad data" and audit["accepted"]
    assert audit["action"]["state"] == "done" and audit["action"]["id"] == aid


def test_same_request_id_twice_is_one_action(sup, client, tokens):
    body = {"to_step": 20, "reason": "retry me", "request_id": "same-1"}
    r1 = client.post("/v1/commands/rollback", json=body, headers=hdr(tokens, "operator"))
    r2 = client.post("/v1/commands/rollback", json=body, headers=hdr(tokens, "operator"))
    assert r1.status_code == r2.status_code == 200
    assert r2.json()["replayed"] and r2.json()["action_id"] == r1.json()["action_id"]
    assert [a["kind"] for a in sup.journal.actions()] == ["rollback"]
    r3 = client.post("/v1/commands/rollback", json=body | {"to_step": 10}, headers=hdr(tokens, "operator"))
    assert r3.status_code == 409 and "already used for action" in r3.json()["error"]
    assert len(sup.journal.actions()) == 1


def test_two_concurrent_rollbacks_exactly_one_starts(sup, tokens):
    app = build_app(sup)

    async def both():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/commands/rollback", headers=hdr(tokens, "operator"),
                                                 json={"to_step": s, "reason": "race"}) for s in (20, 10)))

    rs = asyncio.run(both())
    assert sorted(r.status_code for r in rs) == [200, 409]
    loser = next(r for r in rs if r.status_code == 409).json()
    assert "is in progress; nothing was done" in loser["error"]
    assert [a["kind"] for a in sup.journal.actions()] == ["rollback"]
    assert [c["accepted"] for c in sup.journal.commands()].count(True) == 1


def test_a_command_while_the_policy_acts_is_refused_naming_the_action(sup, client, tokens):
    from supervisor.policy import Decision

    async def policy_acts():
        sup.runner.begin(Decision(action="rollback", reason="policy", rung=3, target_step=20), None, None)

    client.portal.call(policy_acts)
    for path, body in [("rollback", {"to_step": 10}), ("lr", {"scale": 0.5}), ("pause", {})]:
        r = client.post(f"/v1/commands/{path}", json={"reason": "x"} | body, headers=hdr(tokens, "operator"))
        assert r.status_code == 409, path
        assert "(rollback, by policy) is in progress" in r.json()["error"]
    assert len(sup.journal.actions()) == 1


# --- light commands -------------------------------------------------------------------------

def test_lr_is_a_directive_acknowledged_by_the_trainer(sup, client, tokens):
    r = client.post("/v1/commands/lr", json={"scale": 0.5, "ramp_steps": 10, "reason": "cool", "wait_s": 0},
                    headers=hdr(tokens, "operator"))
    body = r.json()
    assert r.status_code == 200 and body["applied"] is None
    d = sup.pending[body["directive"]]
    assert (d.kind, d.scale, d.ramp_steps) == ("set_lr_scale", 0.5, 10)
    a = sup.journal.action(body["action_id"])
    assert (a["kind"], a["actor"], a["state"]) == ("lr", "alice", "running")  # queued, not yet applied
    send_events(client, sup, ack_event(d.id, detail="lr scale -> 0.5 over 10 steps"))
    wait(lambda: sup.lr_scale == 0.5)  # a later cold restart keeps the operator's scale
    wait(lambda: sup.journal.action(body["action_id"])["state"] == "done")
    outcome = sup.journal.action(body["action_id"])["outcome"]
    assert outcome["ok"] and outcome["detail"] == "lr scale -> 0.5 over 10 steps"


def test_light_command_refused_by_the_trainer_is_a_failed_action(sup, client, tokens):
    r = client.post("/v1/commands/extend", json={"steps": 500, "reason": "more", "wait_s": 0},
                    headers=hdr(tokens, "operator"))
    d = sup.pending[r.json()["directive"]]
    send_events(client, sup, ack_event(d.id, ok=False, detail="the decay has already started"))
    wait(lambda: sup.journal.action(r.json()["action_id"])["state"] == "failed")
    assert "already started" in sup.journal.action(r.json()["action_id"])["outcome"]["detail"]


def test_light_command_waits_for_the_ack(sup, client, tokens):
    import threading

    def acker():
        wait(lambda: any(d.kind == "skip_updates" for d in sup.pending.values()))
        d = next(d for d in sup.pending.values() if d.kind == "skip_updates")
        send_events(client, sup, ack_event(d.id, detail="skipping the next 4 updates"))

    t = threading.Thread(target=acker)
    t.start()
    r = client.post("/v1/commands/skip-data", json={"batches": 4, "reason": "bad shard", "wait_s": 10},
                    headers=hdr(tokens, "operator"))
    t.join()
    assert r.status_code == 200 and r.json()["applied"] is True
    assert "skipping the next 4 updates" in r.json()["message"]


@pytest.mark.parametrize("path, body, needle", [
    ("lr", {"scale": 0}, "scale"), ("lr", {"scale": 2000}, "scale"), ("skip-data", {"batches": 0}, "batches"),
    ("extend", {"steps": 10}, "already at step 33"), ("decay-now", {"steps": -1}, "steps"),
])
def test_light_command_validation(sup, client, tokens, path, body, needle):
    r = client.post(f"/v1/commands/{path}", json={"reason": "x"} | body, headers=hdr(tokens, "operator"))
    assert r.status_code == 400 and needle in r.json()["error"]
    assert sup.pending == {} and sup.journal.actions() == []


def test_light_commands_need_a_running_trainer(sup, client, tokens):
    sup.gen = None
    sup.state = "paused"
    for path, body in [("lr", {"scale": 0.5}), ("checkpoint-now", {}), ("decay-now", {}), ("extend", {"steps": 99})]:
        r = client.post(f"/v1/commands/{path}", json={"reason": "x"} | body, headers=hdr(tokens, "operator"))
        assert r.status_code == 409 and "needs a running trainer" in r.json()["error"]
    assert sup.journal.actions() == []


def test_extend_and_decay_now_update_the_total(sup, client, tokens):
    r = client.post("/v1/commands/extend", json={"steps": 500, "reason": "more data", "wait_s": 0},
                    headers=hdr(tokens, "operator"))
    d = sup.pending[r.json()["directive"]]
    assert (d.kind, d.steps) == ("extend", 500)
    send_events(client, sup, ack_event(d.id, detail="run extended to 500 steps"))
    wait(lambda: sup.total_steps == 500)
    r = client.post("/v1/commands/decay-now", json={"steps": 20, "reason": "end", "wait_s": 0},
                    headers=hdr(tokens, "operator"))
    d = sup.pending[r.json()["directive"]]
    send_events(client, sup, ack_event(d.id, detail="decay starts after step 33, run ends at 53"))
    wait(lambda: sup.total_steps == 53)


# --- pause / resume -------------------------------------------------------------------------

def test_pause_then_resume_from_the_pause_checkpoint(sup, client, tokens):
    gen = sup.gen
    r = client.post("/v1/commands/pause", json={"reason": "maintenance"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    aid = r.json()["action_id"]
    wait(lambda: any(d.kind == "stop" for d in sup.pending.values()))
    d = next(d for d in sup.pending.values() if d.kind == "stop")
    make_checkpoint(sup.workdir / "checkpoint", 33)  # what the trainer saves on `stop`
    send_events(client, sup, ack_event(d.id, detail="stopping at step 33"),
                {"kind": "finished", "step": 33, "reason": d.reason, "wall_time": time.time()})
    gen.exited = 0
    wait(lambda: sup.action is None)
    assert sup.state == "paused" and sup.gen is None
    out = sup.journal.action(aid)["outcome"]
    assert out["paused"] and out["step"] == 33 and out["newest_checkpoint"] == 33
    r = client.post("/v1/commands/pause", json={"reason": "again"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 409 and "only a running run can be paused" in r.json()["error"]
    r = client.post("/v1/commands/resume", json={"reason": "done", "dry_run": True}, headers=hdr(tokens, "operator"))
    assert r.json()["plan"]["load_step"] == 33 and sup.generations.launcher.specs == []
    r = client.post("/v1/commands/resume", json={"reason": "done"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    wait(lambda: sup.action is None)
    spec = sup.generations.launcher.specs[-1]
    assert spec.load_step == 33 and spec.generation == 1 and spec.skip_batches == 0
    assert sup.state == "starting"


def test_resume_of_a_running_run_is_409(client, tokens):
    r = client.post("/v1/commands/resume", json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 409 and "resume applies to a paused or stopped run" in r.json()["error"]


# --- advise mode: proposals a human confirms --------------------------------------------------

def test_advise_mode_proposal_is_confirmed_by_a_human(sup, client, tokens):
    from supervisor.detect.findings import Finding

    sup.mode = "advise"
    sup.on_finding(Finding(kind="divergence", step=33, severity="critical", wall_time=time.time(),
                            evidence={"onset_step": 32, "loss": 9.0}))
    props = client.get("/v1/proposals", headers=hdr(tokens, "viewer")).json()["proposals"]
    assert [(p["action"], p["params"]["target_step"]) for p in props] == [("rollback", 30)]
    assert sup.action is None and sup.journal.actions() == []  # advise: nothing done by itself
    assert client.get("/v1/status", headers=hdr(tokens, "viewer")).json()["policy_now"].startswith("advising: 1")
    did = props[0]["decision_id"]
    r = client.post(f"/v1/proposals/{did}/confirm", json={"reason": "agree"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    a = sup.journal.action(r.json()["action_id"])
    assert a["decision_id"] == did and a["actor"] == "alice"
    r = client.post(f"/v1/proposals/{did}/confirm", json={"reason": "again"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 409


# --- Alertmanager webhook -------------------------------------------------------------------

def am(*alerts):
    return {"version": "4", "status": "firing", "receiver": "titan", "groupKey": "{}", "alerts": list(alerts)}


def test_alert_for_a_node_becomes_a_hardware_finding(sup, client, tokens):
    r = client.post("/v1/alerts", headers=hdr(tokens, "operator"), json=am(
        {"status": "firing", "labels": {"alertname": "GPUXidError", "Hostname": "node7", "gpu": "3"},
         "annotations": {"summary": "Xid 79 on GPU 3"}, "startsAt": "2026-01-01T00:00:00Z"},
        {"status": "firing", "labels": {"alertname": "Watchdog"}},
        {"status": "resolved", "labels": {"alertname": "GPUXidError", "Hostname": "node8"}}))
    assert r.status_code == 202, r.text  # queued: findings are made off the request path
    body = r.json()
    assert body["queued"] == [{"alertname": "GPUXidError", "host": "node7"}]
    assert [i["why"].split(" ")[0] for i in body["ignored"]] == ["no", "resolved"]
    assert sup.journal.findings() == []
    while sup.alerts.pending:
        sup.alerts.process_one()
    f = sup.journal.findings()[0]
    assert f["kind"] == "hardware" and f["evidence"]["host"] == "node7" and "Xid 79" in f["evidence"]["detail"]


@pytest.mark.parametrize("payload", [{"alerts": []}, {"version": "4", "status": "firing", "alerts": "x"},
                                     {"version": "4", "status": "firing", "alerts": [{"labels": {}}]}, [1], "x"])
def test_bad_alert_payload_is_400_and_changes_nothing(sup, client, tokens, payload):
    before = snapshot(sup)
    r = client.post("/v1/alerts", json=payload, headers=hdr(tokens, "operator"))
    assert r.status_code == 400
    assert snapshot(sup) == before and sup.journal.findings() == []


def test_alerts_need_an_operator_token_once_tokens_exist(client, tokens):
    assert client.post("/v1/alerts", json=am()).status_code == 401
    assert client.post("/v1/alerts", json=am(), headers=hdr(tokens, "viewer")).status_code == 403


@pytest.mark.parametrize("raw", ["１", " 1", "+1", "1_0", "abc", "9" * 19])
def test_a_path_id_is_ascii_digits_checked_after_auth_and_audited(client, tokens, sup, raw):
    """`int()` read "１" as incident 1 and "1_0" as 10, and the parse ran before auth (a 400 to
    an anonymous caller) with no audit row. Now: 401 without a token, 400 naming the id for an
    operator, and one audit row for each attempt."""
    from urllib.parse import quote

    sup.journal.open_incident("loss_spike", 31, summary="loss_spike", generation=0)
    path = f"/v1/incidents/{quote(raw)}/ack"
    before = len(sup.journal.commands())
    assert client.post(path, json={"reason": "x"}).status_code == 401
    r = client.post(path, json={"reason": "x"}, headers=hdr(tokens, "operator"))
    assert r.status_code == 400 and "incident_id" in r.json()["error"], r.text
    rows = sup.journal.commands()[before:]
    assert len(rows) == 2 and not any(row["accepted"] for row in rows)
    assert sup.journal.incidents()[0]["state"] == "open"
