"""The `reshard` command and the trainer-reported batches per step, on the daemon side.

A real Supervisor, journal, catalog of real DCP checkpoints and FastAPI app (tests/control_fixtures);
the generation is a stand-in process object (no trainer here; the trainer side of a reshard is
tests/integration/test_reshard_drill.py), its acknowledgements arrive through the real telemetry route.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.detect.findings import Finding
from tests.control_fixtures import client, make_checkpoint, sup, tokens  # noqa: F401 (client, sup, tokens: fixtures)
from tests.unit.test_control_api import ack_event, hdr, send_events, snapshot, wait


def test_dry_run_shows_the_plan_and_changes_nothing(sup, client, tokens):
    before = snapshot(sup)
    r = client.post("/v1/commands/reshard", json={"reason": "node lost", "ranks": 1, "dry_run": True},
                    headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert (plan["ranks_from"], plan["ranks_to"], plan["generation"]) == (2, 1, 1)
    assert "next step boundary after 33" in plan["load_step"]
    assert snapshot(sup) == before and sup.generations.launcher.specs == [] and sup.pending == {}


@pytest.mark.parametrize("body, code, needle", [
    ({"ranks": 2}, 409, "already uses 2 ranks"),
    ({"ranks": 0}, 400, "ranks"),
    ({"ranks": "two"}, 400, "ranks"),
])
def test_bad_reshard_is_refused_and_changes_nothing(sup, client, tokens, body, code, needle):
    before = snapshot(sup)
    r = client.post("/v1/commands/reshard", json={"reason": "x", **body}, headers=hdr(tokens, "operator"))
    assert r.status_code == code and needle in r.json()["error"], r.text
    assert snapshot(sup) == before and sup.generations.launcher.specs == []


def test_a_reshard_that_cannot_keep_the_global_batch_is_refused(tmp_path, tokens):
    from supervisor.settings import Settings

    s = Settings.load(run={"workdir": str(tmp_path / "run2"), "run_id": "t", "nproc_per_node": 3},
                      server={"port": 0, "token_file": str(tokens["file"])},
                      training={"global_batch_size": 12})  # tiny: local batch 4; 12 = 3 x 4 = 1 x 4 x 3, not 2 x 4 x k
    sup = Supervisor(s)
    try:
        sup.status.state = "running"
        with TestClient(build_app(sup), base_url="http://127.0.0.1") as c:
            r = c.post("/v1/commands/reshard", json={"reason": "x", "ranks": 2, "dry_run": True},
                       headers=hdr(tokens, "operator"))
            assert r.status_code == 409 and "global_batch_size 12 is not a multiple of 2 ranks x local batch 4" \
                in r.json()["error"], r.text
            r = c.post("/v1/commands/reshard", json={"reason": "x", "ranks": 1, "dry_run": True},
                       headers=hdr(tokens, "operator"))
            assert r.status_code == 200 and r.json()["plan"]["global_batch"] == 12, r.text
    finally:
        sup.journal.close()


def test_viewer_cannot_reshard(sup, client, tokens):
    r = client.post("/v1/commands/reshard", json={"reason": "x", "ranks": 1}, headers=hdr(tokens, "viewer"))
    assert r.status_code == 403 and sup.generations.launcher.specs == []


def test_shrink_checkpoints_restarts_on_fewer_ranks_and_is_journaled_then_grows_back(sup, client, tokens, tmp_path):
    r = client.post("/v1/commands/reshard", json={"reason": "node lost", "ranks": 1}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    aid = r.json()["action_id"]
    wait(lambda: any(d.kind == "checkpoint_now" for d in sup.pending.values()))
    d = next(d for d in sup.pending.values() if d.kind == "checkpoint_now")
    make_checkpoint(sup.workdir / "checkpoint", 33)  # what the trainer saves on `checkpoint_now`
    send_events(client, sup, ack_event(d.id, detail="checkpoint at step 33", directive="checkpoint_now"))
    wait(lambda: sup.action is None)
    spec = sup.generations.launcher.specs[-1]
    assert (spec.nproc, spec.load_step, spec.generation, spec.skip_batches) == (1, 33, 1, 0)
    assert "--nproc-per-node=1" in spec.command()
    out = sup.journal.action(aid)["outcome"]
    assert (out["ranks_from"], out["ranks_to"], out["load_step"], out["lost_steps"]) == (2, 1, 33, 0)
    assert sup.ranks == 1

    # A daemon that crashed after the launch resumes the action: the new generation is left alone.
    n_specs = len(sup.generations.launcher.specs)
    resumed = asyncio.run(sup.remedies.reshard(SimpleNamespace(id=aid, params={"ranks": 1, "ranks_from": 2},
                                                               directive_id=None)))
    assert "already runs on 1 ranks" in resumed["note"] and resumed["ranks_from"] == 2
    assert len(sup.generations.launcher.specs) == n_specs and sup.gen.alive()

    # A restarted daemon keeps the reshard: the next generation is still on 1 rank.
    again = Supervisor(sup.settings)
    assert again.ranks == 1
    again.journal.close()

    # The node is back: grow to 2 from the next checkpoint.
    r = client.post("/v1/commands/reshard", json={"reason": "node back", "ranks": 2}, headers=hdr(tokens, "operator"))
    assert r.status_code == 200, r.text
    wait(lambda: any(d.kind == "checkpoint_now" for d in sup.pending.values()))
    d = next(d for d in sup.pending.values() if d.kind == "checkpoint_now")
    make_checkpoint(sup.workdir / "checkpoint", 40)
    send_events(client, sup, ack_event(d.id, detail="checkpoint at step 40", directive="checkpoint_now"))
    wait(lambda: sup.action is None)
    spec = sup.generations.launcher.specs[-1]
    assert (spec.nproc, spec.load_step, spec.generation) == (2, 40, 2)


def test_started_event_sets_batches_per_step_and_the_data_skip_scales(sup, client):
    sup.mode = "advise"

    def proposed_skip() -> int:
        sup.on_finding(Finding(kind="divergence", step=33, severity="critical", wall_time=time.time(),
                               evidence={"onset_step": 32, "loss": 9.0}))
        return sup.journal.decisions(limit=1)[0]["params"]["skip_batches"]  # the newest proposal's data skip

    base = proposed_skip()
    send_events(client, sup, {"kind": "started", "step": 30, "world_size": 1, "dp_degree": 1,
                              "batches_per_step": 2, "samples_consumed": 240, "wall_time": time.time()})
    assert sup.run_state().batches_per_step == 2
    assert proposed_skip() == 2 * base > 0
    assert Supervisor(sup.settings).batches_per_step == 2  # journaled: a restarted daemon keeps it
