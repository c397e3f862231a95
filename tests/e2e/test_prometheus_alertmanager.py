"""End to end with the real binaries: a real Prometheus scrapes the real daemon while it supervises
real torchtitan on 2 CPU ranks with an unrecovered LR spike and a SIGKILLed rank.

What it proves, by the stack's own outputs:
- the alerts of alerts/rules/titan.yml fire in Prometheus (`TitanLossSpikeUnresolved` while the
  spike's incident is open, `TitanRankHeartbeatStale` while the killed generation is silent) and
  resolve after the supervisor recovers: Alertmanager delivers both the firing and the resolved
  notification to a local webhook receiver through the example's routes;
- a hardware alert (`TitanGpuXidError` over the DCGM exporter's series) reaches the daemon's
  `/v1/alerts` through Alertmanager with an operator token, becomes a `hardware` finding in the
  journal naming the node, and pages;
- the loss Prometheus stored equals the trainer's spool, exactly, at every scrape after the first
  step (the run is then paused with the on-call CLI: the trainer's spool is flushed at exit);
- with `[grafana]` pointed at a Grafana that never answers, none of this is delayed.

Test-only deviations (tests/e2e/obs_stack.py says why): a copy of the rules with `for: 0s`, a
0.5 s evaluation interval and a 2 s heartbeat threshold; the Alertmanager example with 0 s/1 s
group timings. Stand-ins: the DCGM exporter (no GPU here) and the dead Grafana (no Grafana server
can run here). Skipped, saying which, only where the prometheus/alertmanager binaries are missing
(`make obs-tools` installs them from apt). Everything runs on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_harness import AuthedDaemon, drill_config, free_port
from tests.e2e.obs_stack import (DcgmExporter, Receiver, Stack, alertmanager_copy, missing_binaries,
                                 rules_copy)
from tests.fake_grafana import BlackHole
from tests.trainer_harness import ROOT, spool, trainer_env

pytestmark = [pytest.mark.e2e, pytest.mark.integration,
              pytest.mark.skipif(bool(missing_binaries()), reason=f"missing {missing_binaries()}: "
                                 "make obs-tools (apt-get install prometheus prometheus-alertmanager)")]

RUN_ID = "e2e"
NODE = "gpu-node-7"
STEPS = 400  # longer than the test: it stops the run once everything is proven
# gen 0: rank 0 slowed so the spike's incident spans several scrapes; LR x1000 at 35 (not
# recovering: hot rollback); rank 1 SIGKILLed at 60 (cold restart as generation 1).
FAULTS = "slow@1:rank=0:seconds=0.12:gen=*,spike@35:lr=1000:steps=3,crash@60:rank=1"
DEADLINE_S = 235


def _token(tokens: Path, name: str, role: str) -> str:
    out = subprocess.run([sys.executable, "-m", "supervisor.cli", "token", "add", name, "--role", role,
                          "--file", str(tokens)], env=trainer_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.split() if line.startswith("tsv_"))


def _until(pred, deadline: float, what: str, *, on_tick=None):
    while time.time() < deadline:
        if on_tick is not None:
            on_tick()
        got = pred()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def stack(tmp_path):
    parts: dict = {}
    yield parts
    for key in ("stack", "daemon", "receiver", "dcgm", "grafana"):
        obj = parts.get(key)
        if obj is not None:
            obj.cleanup() if key == "daemon" else obj.close()


def test_alerts_fire_resolve_and_deliver_during_a_supervised_cpu_run(tmp_path, stack):
    deadline = time.time() + DEADLINE_S
    tokens = tmp_path / "tokens.jsonl"
    viewer = _token(tokens, "e2e-viewer", "viewer")
    am_token_file = tmp_path / "alertmanager-operator.token"
    am_token_file.write_text(_token(tokens, "alertmanager", "operator") + "\n")
    operator = _token(tokens, "e2e-operator", "operator")
    stack["receiver"] = receiver = Receiver()
    stack["dcgm"] = dcgm = DcgmExporter(NODE)
    stack["grafana"] = dead_grafana = BlackHole()

    cfg = drill_config(tmp_path / "run", free_port(), steps=STEPS, faults=FAULTS, run_id=RUN_ID)
    cfg["server"]["token_file"] = str(tokens)
    cfg["grafana"] = {"url": dead_grafana.url, "timeout_s": 3.0, "attempts": 3}
    stack["daemon"] = d = AuthedDaemon(tmp_path, cfg)
    d.token = viewer
    d.start()
    d.wait_for(lambda st: st.get("state") in ("starting", "running"), 60, "the daemon to answer")

    rules = rules_copy(tmp_path / "rules.yml")
    am_cfg = alertmanager_copy(tmp_path / "alertmanager.yml", receiver_url=receiver.url, daemon_url=d.url,
                               token_file=am_token_file)
    stack["stack"] = s = Stack(tmp_path, daemon_target=f"127.0.0.1:{d.port}", run_id=RUN_ID,
                               dcgm_target=dcgm.target, rules=rules, alertmanager_config=am_cfg,
                               ports=(free_port(), free_port()))
    ever: set[str] = set()
    watch = lambda: ever.update(s.firing())  # noqa: E731 - alerts seen firing in Prometheus

    # 1. the unrecovered spike: its incident's alert fires, then resolves after the hot rollback
    _until(lambda: ("TitanLossSpikeUnresolved", "firing") in receiver.notifications("/page"), deadline,
           "the loss-spike page", on_tick=watch)
    _until(lambda: ("TitanLossSpikeUnresolved", "resolved") in receiver.notifications("/page"), deadline,
           "the loss-spike page to resolve", on_tick=watch)
    # 2. the killed rank: the dead generation's heartbeats age past the threshold, then the
    #    restarted generation's heartbeats replace them
    _until(lambda: ("TitanRankHeartbeatStale", "resolved") in receiver.notifications("/ticket"), deadline,
           "the heartbeat alert to fire and resolve", on_tick=watch)
    assert ("TitanRankHeartbeatStale", "firing") in receiver.notifications("/ticket")
    st = d.wait_for(lambda st: st if st.get("generation") == 1 and st.get("state") == "running" else None,
                    max(1.0, deadline - time.time()), "generation 1")
    # 3. a GPU reports XID 79: Prometheus -> Alertmanager -> /v1/alerts -> a hardware finding
    dcgm.xid = 79

    def hardware_finding():
        j = d.journal()
        try:
            return [f for f in j.findings(limit=1000) if f["kind"] == "hardware"]
        finally:
            j.close()

    found = _until(hardware_finding, deadline, "the XID alert to become a finding", on_tick=watch)
    assert found[0]["evidence"]["host"] == NODE and "TitanGpuXidError" in json.dumps(found[0]["evidence"])
    _until(lambda: ("TitanGpuXidError", "firing") in receiver.notifications("/page") and "TitanGpuXidError" in ever,
           deadline, "the XID page", on_tick=watch)
    assert {"TitanLossSpikeUnresolved", "TitanRankHeartbeatStale", "TitanGpuXidError"} <= ever, ever
    assert "TitanTrainingStalled" not in ever and "TitanHumanNeeded" not in ever

    # 4. the loss Prometheus stored is the spool's, scrape by scrape. The trainer writes its spool
    #    through a buffer closed at exit, so an operator pauses the run first (the on-call CLI).
    d.wait_for(lambda st: st.get("generation") == 1 and st.get("step", 0) > 75, max(1.0, deadline - time.time()),
               "generation 1 past the crash point")
    out = subprocess.run([sys.executable, "-m", "supervisor.cli", "pause", "--reason", "e2e: compare the spool",
                          "--yes", "--wait-timeout", str(max(1, int(deadline - time.time())))],
                         env=trainer_env({"TITAN_SUPERVISOR_URL": d.url, "TITAN_SUPERVISOR_TOKEN": operator}),
                         cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, deadline - time.time()))
    assert out.returncode == 0, out.stdout + out.stderr
    d.wait_for(lambda st: st.get("state") == "paused" and not st.get("trainer_pids"),
               max(1.0, deadline - time.time()), "the pause")
    # Each scrape names its record by wall time (titan_last_step_timestamp_seconds). Generation 0's
    # spool buffer died with its SIGKILLed group, so the spool holds generation 1's records: every
    # scrape from the spool's first record on must be a spool record, with its step and loss.
    records = {r["wall_time"]: r for r in spool(d.workdir)[0]}
    assert records, "empty spool"
    first = min(records)
    sel = f'{{run_id="{RUN_ID}"}}'
    loss, step, wall = (s.raw(f"titan_{m}{sel}") for m in ("loss", "step", "last_step_timestamp_seconds"))
    scrapes = [(wall[t], step[t], loss[t]) for t in sorted(loss) if t in step and t in wall and wall[t] >= first]
    assert len(scrapes) >= 15, f"only {len(scrapes)} scrapes since the spool's first record"
    wrong = [(w, n, v, records.get(w)) for w, n, v in scrapes
             if w not in records or records[w]["step"] != n or records[w]["loss"] != v]
    assert wrong == [], f"Prometheus and the spool disagree: {wrong[:3]}"
    assert len({n for _, n, _ in scrapes}) >= 10  # many steps, not one value repeated
    assert max(n for _, n, _ in scrapes) == max(r["step"] for r in records.values())  # up to the last one

    # 5. a Grafana that never answers delayed nothing: the rollback and the restart were done
    j = d.journal()
    try:
        kinds = {a["kind"]: a["state"] for a in j.actions(limit=100)}
        assert kinds.get("rollback") == "done" and kinds.get("restart") == "done", kinds
    finally:
        j.close()
    assert any(e.get("event") == "grafana annotation failed" for e in d.events())
