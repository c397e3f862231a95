"""The daemon's HTTP ingest with a real Supervisor, journal and FastAPI app (no trainer is
launched: `Supervisor.start()` is not called, the generation is set by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.settings import Settings
from tests.trainer_harness import ROOT, trainer_env


def record(step, **kw):
    r = {"run_id": "t", "generation": 0, "step": step, "loss": 3.0, "grad_norm": 1.0, "lr": 1e-3,
         "lr_scale": 1.0, "tokens_per_s": 1000.0, "step_seconds": 0.1, "wall_time": time.time()}
    r.update(kw)
    return r


@pytest.fixture
def sup(tmp_path):
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t"}, server={"port": 0})
    sup = Supervisor(s)
    sup.generation = 0
    yield sup
    sup.journal.close()


@pytest.fixture
def client(sup):
    """A client holding the trainer token, as the ranks the daemon launches do."""
    return TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {sup.trainer_token}"})


def steps_in_journal(sup) -> int:
    return sup.journal.counts()["steps_recent"]


def test_valid_batch_is_recorded_and_answered(sup, client):
    r = client.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(1), record(2)]})
    assert r.status_code == 200 and r.json()["accepted"] == 2
    assert steps_in_journal(sup) == 2
    assert sup.last_step == 2
    text = client.get("/metrics").text
    assert "titan_step 2.0" in text


def test_nan_loss_is_data_not_an_error(sup, client):
    body = json.dumps({"run_id": "t", "generation": 0, "records": [record(1, loss=float("nan"))]})
    r = client.post("/v1/telemetry", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert [f["kind"] for f in sup.journal.findings()] == ["non_finite"]


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not JSON"),
    (json.dumps({"run_id": "t", "generation": 0, "records": [record(1, loss="high")]}).encode(), "records.0.loss"),
    (json.dumps({"run_id": "t", "generation": 0, "records": [record(0)]}).encode(), "records.0.step"),
    (json.dumps({"run_id": "t", "generation": -1, "records": []}).encode(), "generation"),
    (json.dumps({"run_id": "t", "generation": 0, "records": [record(1, surprise=1)]}).encode(), "surprise"),
    (json.dumps({"run_id": "t", "generation": 0, "records": [record(1), record(2, step_seconds=float("inf"))]}).encode(),
     "step_seconds"),
])
def test_malformed_telemetry_is_400_and_records_nothing(sup, client, body, needle):
    r = client.post("/v1/telemetry", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert needle in json.dumps(r.json())
    assert steps_in_journal(sup) == 0 and sup.journal.findings() == []
    assert sup.last_step == 0


def test_telemetry_from_an_old_generation_is_ignored(sup, client):
    sup.generation = 3
    r = client.post("/v1/telemetry", json={"run_id": "t", "generation": 2, "records": [record(5, generation=2)]})
    assert r.status_code == 200 and r.json()["accepted"] == 0
    assert steps_in_journal(sup) == 0


def test_bad_heartbeat_is_400(client):
    r = client.post("/v1/heartbeat", json={"run_id": "t", "generation": 0, "rank": -1, "step": 0, "pid": 1,
                                           "host": "h", "wall_time": 1.0})
    assert r.status_code == 400 and "rank" in r.text


@pytest.mark.parametrize("toml, needle", [
    ("[run]\nnproc_per_node = 0\n", "run.nproc_per_node"),
    ("[policy]\nmax_rollbacks_per_region = \"many\"\n", "policy.max_rollbacks_per_region"),
    ("[detect.loss_spike]\nz_threshold = true\n", "detect.loss_spike.z_threshold"),
    ("[server]\nhost = \"0.0.0.0\"\n", "server.host 0.0.0.0 is not loopback"),
    ("[run]\nfaults = \"boom\"\n", "run.faults"),
    ("[nonsense]\nx = 1\n", "nonsense"),
])
def test_invalid_config_exits_2_naming_the_field(tmp_path, toml, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[run]\nworkdir = \"{tmp_path / 'w'}\"\n" + toml if not toml.startswith("[run]") else
                   toml.replace("[run]\n", f"[run]\nworkdir = \"{tmp_path / 'w'}\"\n"))
    p = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", str(cfg)], env=trainer_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith("config error:") and needle in p.stderr
    assert not (tmp_path / "w").exists()  # nothing written


def test_daemon_imports_no_torch_and_starts_fast():
    code = ("import sys, time; t=time.perf_counter(); import supervisor.cli, supervisor.service, supervisor.daemon, "
            "supervisor.api; print(time.perf_counter()-t); assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], env=trainer_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr


def test_trainer_token_guards_telemetry_and_heartbeats_when_required(tmp_path):
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t"},
                      server={"port": 0, "trainer_token": True})
    sup = Supervisor(s)
    sup.generation = 0
    try:
        assert sup.trainer_token and len(sup.trainer_token) >= 32
        client = TestClient(build_app(sup), base_url="http://127.0.0.1")
        body = {"run_id": "t", "generation": 0, "records": [record(1)]}
        hb = {"run_id": "t", "generation": 0, "rank": 0, "step": 1, "pid": 1, "host": "h", "wall_time": time.time()}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert client.post("/v1/telemetry", json=body, headers=headers).status_code == 401
            assert client.post("/v1/heartbeat", json=hb, headers=headers).status_code == 401
        assert steps_in_journal(sup) == 0  # a refused batch records nothing
        ok = {"Authorization": f"Bearer {sup.trainer_token}"}
        assert client.post("/v1/telemetry", json=body, headers=ok).json()["accepted"] == 1
        # past the token check; pid 1 is no process of a generation, so the heartbeat is refused
        assert client.post("/v1/heartbeat", json=hb, headers=ok).status_code == 403
        # the ranks get it through their environment, never on the command line
        spec = sup._spec(1, load_step=None, skip_batches=0, lr_scale=1.0)
        assert spec.env["TITAN_SUPERVISOR_TRAINER_TOKEN"] == sup.trainer_token
        assert sup.trainer_token not in " ".join(spec.command())
    finally:
        sup.journal.close()


def test_loopback_default_requires_the_trainer_token(sup, client):
    assert sup.trainer_token is not None
    bare = TestClient(build_app(sup), base_url="http://127.0.0.1")
    assert bare.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(1)]}).status_code == 401
    assert client.post("/v1/telemetry", json={"run_id": "t", "generation": 0, "records": [record(1)]}).status_code == 200
