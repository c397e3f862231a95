"""The on-call control plane on a live run: the real daemon (`titan-supervisor run`) supervising
real torchtitan on 2 CPU ranks, driven through its API and the real `titan-supervisor` CLI
(subprocesses), with bearer tokens configured.

One supervised run carries the whole story, in order: refused commands change nothing; no token
is 401 and a viewer token on a command is 403, both journaled; two rollbacks sent at once start
exactly one, and resending it with the same request id starts nothing; the CLI rolls back to a
step with a data skip; the CLI pauses (checkpoint + stop) and resumes; the run finishes. Then the
run's own numbers are checked: every loss from the CLI rollback to the end, across the pause,
equals a cold trainer run from the same checkpoint with the same skip, and no step was lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from supervisor.auth import add_token
from tests.daemon_harness import Daemon, drill_config, free_port
from tests.trainer_harness import ROOT, run_trainer, spool, trainer_env

pytestmark = [pytest.mark.integration]

STEPS = 120
SLOW = "slow@1:rank=0:seconds=0.12"  # generation 0 only: leaves time for the CLI between steps


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        self.http = httpx.Client(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})

    def get(self, path):
        return self.http.get(path)

    def post(self, path, body):
        return self.http.post(path, json=body)


def cli(d: Daemon, token: str, *argv, timeout=300) -> subprocess.CompletedProcess:
    env = trainer_env({"TITAN_SUPERVISOR_URL": d.url, "TITAN_SUPERVISOR_TOKEN": token, "COLUMNS": "200"})
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def wait_status(api: Api, pred, timeout: float, what: str, d: Daemon) -> dict:
    deadline = time.time() + timeout
    st = None
    while time.time() < deadline:
        try:
            r = api.get("/v1/status")
            st = r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            st = None
        if st is not None and pred(st):
            return st
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited waiting for {what}:\n{d.log_tail()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; status={st}\n{d.log_tail()}")


def wait_action(api: Api, aid: int, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        a = api.get(f"/v1/actions/{aid}").json()
        if a["state"] in ("done", "failed", "abandoned"):
            return a
        time.sleep(0.1)
    raise AssertionError(f"action {aid} not finished: {a}")


def checkpoint_dirs(d: Daemon) -> tuple[set[str], set[str]]:
    return ({p.name for p in (d.workdir / "checkpoint").glob("step-*")},
            {p.name for p in (d.workdir / "quarantine").glob("step-*")})


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    tf = tmp / "tokens.jsonl"
    tokens = {r: add_token(tf, n, r) for n, r in (("root", "admin"), ("alice", "operator"), ("vic", "viewer"))}
    cfg = drill_config(tmp / "run", free_port(), steps=STEPS, faults=SLOW)
    cfg["server"]["token_file"] = str(tf)
    cfg["launch"] = {"directive_timeout_s": 60.0}
    d = Daemon(tmp, cfg)
    out: dict = {"daemon": d, "tokens": tokens}
    op, viewer, anon = Api(d.url, tokens["operator"]), Api(d.url, tokens["viewer"]), Api(d.url, None)
    try:
        d.start()
        wait_status(viewer, lambda s: s["step"] >= 24 and s["newest_checkpoint"] == 20, 240, "step 24", d)

        # --- refusals change nothing ----------------------------------------------------
        j = d.journal()
        actions_before, gens_before = j.counts()["actions"], j.counts()["generations"]
        j.close()
        ck_before, q_before = checkpoint_dirs(d)
        refusals = {
            "no_ckpt": op.post("/v1/commands/rollback", {"to_step": 15, "reason": "r"}),
            "path": op.post("/v1/commands/rollback", {"to_step": "../etc", "reason": "r"}),
            "neg_skip": op.post("/v1/commands/rollback", {"to_step": 20, "skip_batches": -4, "reason": "r"}),
            "unknown": op.post("/v1/commands/explode", {"reason": "r"}),
            "no_token": anon.post("/v1/commands/rollback", {"to_step": 20, "reason": "r"}),
            "viewer": viewer.post("/v1/commands/rollback", {"to_step": 20, "reason": "r"}),
        }
        out["refusals"] = {k: (r.status_code, r.json()) for k, r in refusals.items()}
        out["cli_refusals"] = [cli(d, tokens["operator"], "rollback", "--to-step", "15", "--reason", "r", "--yes"),
                               cli(d, tokens["viewer"], "pause", "--reason", "r", "--yes")]
        j = d.journal()
        out["after_refusals"] = (j.counts()["actions"], j.counts()["generations"])
        j.close()
        out["before_refusals"] = (actions_before, gens_before)
        ck_after, q_after = checkpoint_dirs(d)
        out["checkpoints_kept"] = ck_before <= ck_after and q_before == q_after

        # --- two rollbacks at once: exactly one; the same request id again: no second ------
        results: dict = {}
        clients = {n: Api(d.url, tokens["operator"]) for n in ("a", "b")}
        barrier = threading.Barrier(2)

        def send(name, step):
            barrier.wait()
            results[name] = clients[name].post(
                "/v1/commands/rollback", {"to_step": step, "reason": f"race {name}", "request_id": f"race-{name}"})

        threads = [threading.Thread(target=send, args=(n, s)) for n, s in (("a", 20), ("b", 10))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["race"] = {k: (r.status_code, r.json()) for k, r in results.items()}
        winner = next(k for k, r in results.items() if r.status_code == 200)
        win_body = results[winner].json()
        again = op.post("/v1/commands/rollback", {"to_step": 20 if winner == "a" else 10,
                                                  "reason": f"race {winner}", "request_id": f"race-{winner}"})
        out["again"] = (again.status_code, again.json())
        out["race_action"] = wait_action(op, win_body["action_id"])
        again2 = op.post("/v1/commands/rollback", {"to_step": 20 if winner == "a" else 10,
                                                   "reason": f"race {winner}", "request_id": f"race-{winner}"})
        out["again_after"] = (again2.status_code, again2.json())

        # --- the CLI rolls back to a step with a data skip --------------------------------
        target, skip = 30, 3
        wait_status(viewer, lambda s: s["newest_checkpoint"] == target and s["step"] >= target + 4
                    and s["action"] is None, 240, f"a checkpoint at {target}", d)
        p = cli(d, tokens["operator"], "rollback", "--to-step", str(target), "--skip-batches", str(skip),
                "--reason", "operator drill: bad batches after 30", "--yes", "--json")
        out["cli_rollback"] = p
        out["cli_rollback_body"] = json.loads(p.stdout) if p.stdout.strip().startswith("{") else None
        out["target"], out["skip"] = target, skip

        # --- pause, then resume -------------------------------------------------------------
        wait_status(viewer, lambda s: s["step"] >= target + 8, 240, "steps after the rollback", d)
        p = cli(d, tokens["operator"], "pause", "--reason", "operator drill: maintenance", "--yes", "--json")
        out["cli_pause"] = p
        st = wait_status(viewer, lambda s: s["state"] == "paused", 120, "paused", d)
        out["paused_status"] = st
        time.sleep(2.0)  # paused means paused: no steps while paused
        out["paused_status_later"] = viewer.get("/v1/status").json()
        out["audit_cli"] = cli(d, tokens["viewer"], "audit", "--limit", "100")
        p = cli(d, tokens["operator"], "resume", "--reason", "operator drill: maintenance done", "--yes", "--json")
        out["cli_resume"] = p
        out["exit"] = d.wait_exit(400)
        j = d.journal()
        out["commands"] = j.commands(limit=1000)
        out["actions"] = j.actions(limit=1000)
        out["generations"] = j.generations()
        j.close()
        return out
    finally:
        d.cleanup()


def test_refused_commands_name_why_and_change_nothing(story):
    r = story["refusals"]
    assert r["no_ckpt"][0] == 400 and "no checkpoint step-15 in the catalog" in r["no_ckpt"][1]["error"]
    assert r["path"][0] == 400 and "looks like a path" in r["path"][1]["error"]
    assert r["neg_skip"][0] == 400 and "skip_batches" in r["neg_skip"][1]["error"]
    assert r["unknown"][0] == 400 and "unknown command 'explode'" in r["unknown"][1]["error"]
    assert story["after_refusals"] == story["before_refusals"]  # no action, no generation
    assert story["checkpoints_kept"]  # nothing quarantined or removed
    bad, weak = story["cli_refusals"]
    assert bad.returncode == 2 and "no checkpoint step-15" in bad.stderr
    assert weak.returncode == 4 and "needs operator" in weak.stderr


def test_401_and_403_are_journaled_and_tokens_never_logged(story):
    r = story["refusals"]
    assert r["no_token"][0] == 401 and r["viewer"][0] == 403
    refused = [(c["actor"], c["result"][:3]) for c in story["commands"] if not c["accepted"]]
    assert ("anonymous", "401") in refused and ("vic", "403") in refused
    d = story["daemon"]
    texts = [p.read_bytes() for p in d.tmp.glob("daemon-*.log")]
    texts += [p.read_bytes() for p in (d.workdir / "logs").rglob("*") if p.is_file()]
    texts += [p.read_bytes() for p in (d.workdir / "supervisor").glob("journal.sqlite*")]
    assert texts
    for token in story["tokens"].values():
        assert not any(token.encode() in t for t in texts)


def test_two_rollbacks_at_once_exactly_one_and_a_retry_is_the_same_action(story):
    codes = sorted(c for c, _ in story["race"].values())
    assert codes == [200, 409]
    loser = next(b for c, b in story["race"].values() if c == 409)
    assert "is in progress; nothing was done" in loser["error"]
    win = next(b for c, b in story["race"].values() if c == 200)
    for code, body in (story["again"], story["again_after"]):
        assert code == 200 and body["replayed"] and body["action_id"] == win["action_id"]
    assert story["race_action"]["state"] == "done"
    race_rollbacks = [a for a in story["actions"] if a["kind"] == "rollback" and a["request_id"].startswith("race-")]
    assert len(race_rollbacks) == 1
    target = race_rollbacks[0]["params"]["target_step"]
    steps = [r["step"] for r in spool(story["daemon"].workdir)[0]]
    assert steps.count(target + 1) >= 2  # rewound (once by the race winner, maybe later by the CLI rollback)


def test_cli_rollback_equals_a_cold_restart_and_pause_resume_loses_no_step(story, tmp_path):
    import shutil

    d, target, skip = story["daemon"], story["target"], story["skip"]
    p = story["cli_rollback"]
    assert p.returncode == 0, p.stderr
    body = story["cli_rollback_body"]
    assert body["action"]["state"] == "done" and body["action"]["outcome"]["target_step"] == target
    assert body["action"]["outcome"]["mode"] == "hot"
    assert story["cli_pause"].returncode == 0, story["cli_pause"].stderr
    assert story["cli_resume"].returncode == 0, story["cli_resume"].stderr
    assert story["exit"] == 0

    paused = story["paused_status"]
    pause_step = paused["step"]
    assert paused["trainer_pids"] == {} and story["paused_status_later"]["step"] == pause_step
    assert (d.workdir / "checkpoint" / f"step-{pause_step}" / ".metadata").is_file()  # checkpointed at the pause
    gens = sorted(story["generations"], key=lambda g: g["id"])
    assert gens[-1]["load_step"] == pause_step  # resumed from the pause step

    records, events = spool(d.workdir)
    # the segment after the CLI rollback: steps target+1 .. end, each once, none lost across the pause
    rb_action = next(a for a in story["actions"] if a["kind"] == "rollback" and a["actor"] == "alice"
                     and not a["request_id"].startswith("race-"))
    ack = next(e for e in events if e["kind"] == "directive_applied"
               and e["directive_id"] == f"a{rb_action['id']}" and e["ok"])
    seq = [r for r in records]
    idx = next(i for i, r in enumerate(seq) if r["step"] == target + 1 and r["wall_time"] >= ack["wall_time"])
    tail = seq[idx:]
    assert [r["step"] for r in tail] == list(range(target + 1, STEPS + 1))
    assert {r["generation"] for r in tail if r["step"] > pause_step} == {gens[-1]["id"]}

    # a cold trainer run from the same checkpoint with the same skip: the same losses, bit for bit
    cold = tmp_path / "cold"
    (cold / "checkpoint").mkdir(parents=True)
    shutil.copytree(d.workdir / "checkpoint" / f"step-{target}", cold / "checkpoint" / f"step-{target}")
    proc = run_trainer(cold, 2, ["--training.steps", str(STEPS), "--checkpoint.load_step", str(target),
                                 "--supervision.skip_batches", str(skip), "--checkpoint.interval", "10"],
                       timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cold_losses = {r["step"]: r["loss"] for r in spool(cold)[0]}
    live_losses = {r["step"]: r["loss"] for r in tail}
    assert sorted(cold_losses) == sorted(live_losses)
    assert live_losses == cold_losses


def test_audit_log_shows_each_command_and_its_result(story):
    accepted = {c["command"]: c for c in story["commands"] if c["accepted"] and c["actor"] == "alice"
                and c["reason"] and c["reason"].startswith("operator drill")}
    assert set(accepted) == {"rollback", "pause", "resume"}
    acts = {a["request_id"]: a for a in story["actions"]}
    p = story["audit_cli"]  # `titan-supervisor audit` (run while paused) shows them with their result
    assert p.returncode == 0, p.stderr
    assert "operator drill: bad batches after 30" in p.stdout and "alice" in p.stdout and "done" in p.stdout
    for name in ("rollback", "pause", "resume"):
        c = accepted[name]
        assert c["result"].startswith("200 action")
        assert acts[c["request_id"]]["state"] == "done" and acts[c["request_id"]]["actor"] == "alice"
