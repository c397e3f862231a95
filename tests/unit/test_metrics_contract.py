"""The metrics contract: `docs/metrics.md` is the generator's output, every exposed family is in
the contract, and `promtool check metrics` (the real binary) finds nothing wrong with a scrape
of a real Supervisor's /metrics after telemetry, a heartbeat and a refused request went through
its FastAPI app. No trainer is launched (`Supervisor.start()` is not called)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from supervisor.api import build_app
from supervisor.daemon import Supervisor
from supervisor.launch.local import Generation, LaunchSpec
from supervisor.metrics import SERIES
from supervisor.metrics_doc import render
from supervisor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def record(step, **kw):
    r = {"run_id": "t", "generation": 0, "step": step, "loss": 3.0, "grad_norm": 1.0, "lr": 1e-3,
         "lr_scale": 1.0, "tokens_per_s": 1000.0, "step_seconds": 0.1, "wall_time": time.time(),
         "rank_step_seconds": [0.1, 0.12], "peak_mem_gib": 0.5}
    r.update(kw)
    return r


@pytest.fixture
def scrape(tmp_path):
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t"}, server={"port": 0})
    sup = Supervisor(s)
    sup.generation = 0
    # a heartbeat's pid must be a process of the generation: this test process stands in for
    # torchrun and a real child of it for rank 1 (the generation is never stopped here)
    rank1 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sup.gen = Generation(LaunchSpec(0, 2, "tiny", tmp_path, "http://127.0.0.1:1", "t"), os.getpid(),
                         tmp_path / "g.log", None)
    sup.journal.record_generation_start(generation=0, run_id="t")
    try:
        c = TestClient(build_app(sup), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {sup.trainer_token}"})
        assert c.post("/v1/heartbeat", json={"run_id": "t", "generation": 0, "rank": 1, "step": 1, "pid": rank1.pid,
                                             "host": "node-b", "wall_time": time.time()}).status_code == 200
        assert c.post("/v1/telemetry", json={"run_id": "t", "generation": 0,
                                             "records": [record(1), record(2)]}).status_code == 200
        assert c.post("/v1/telemetry", json={"run_id": "t"}).status_code == 400  # malformed: refused
        sup.metrics.set_checkpoint(2, save_seconds=0.3)
        yield c.get("/metrics").text
    finally:
        rank1.kill()
        rank1.wait()
        sup.journal.close()


def families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_committed_doc_is_the_generator_output():
    assert (ROOT / "docs" / "metrics.md").read_text() == render(), \
        "docs/metrics.md is stale: python -m supervisor.metrics_doc > docs/metrics.md"


def test_every_exposed_family_is_in_the_contract_and_back(scrape):
    contract = {f"titan_{s.name}".removesuffix("_total") + ("_info" if s.type == "info" else "") for s in SERIES}
    exposed = set(families(scrape))
    assert exposed <= contract, exposed - contract
    assert contract - exposed == set(), "contract series missing from a scrape after their events"


def test_labels_are_bounded_and_requests_are_counted_by_route(scrape):
    fams = families(scrape)
    req = {(s.labels["route"], s.labels["code"]): s.value for s in fams["titan_http_requests"]}
    assert req[("/v1/telemetry", "200")] == 1
    assert req[("/v1/telemetry", "400")] == 1
    assert req[("/v1/heartbeat", "200")] == 1
    rank = {(s.labels["rank"], s.labels["node"]): s.value for s in fams["titan_rank_step_seconds"]}
    assert rank == {("0", ""): 0.1, ("1", "node-b"): 0.12}
    for f in fams.values():
        for s in f.samples if hasattr(f, "samples") else f:
            assert "step" not in s.labels, s  # no step numbers in labels


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (apt-get install prometheus)")
def test_promtool_check_metrics_is_clean(scrape):
    r = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
