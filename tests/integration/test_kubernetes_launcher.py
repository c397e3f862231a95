"""Daemon drills through the Kubernetes launcher: the real daemon (`titan-supervisor run`, with
`launch.backend = "kubernetes"`) talks to tests/k8s_fake.py, a fake API server standing in for a
Kubernetes cluster, which cannot run here (real HTTP on loopback, real watch streams; its kubelet
runs each pod's command as a real local process, so real torchtitan trains on 2 CPU ranks).
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.daemon_harness import Daemon, drill_config, free_port
from tests.k8s_fake import FakeKubernetes
from tests.trainer_harness import ROOT, spool, trainer_env

pytestmark = [pytest.mark.integration, pytest.mark.drill]
TOKEN = "drill-api-token"


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "k8s-token").write_text(TOKEN)
    with FakeKubernetes(tmp_path / "kubelet", token=TOKEN, env=trainer_env(), cwd=str(ROOT)) as k8s:
        made: list[Daemon] = []

        def make(extra: dict | None = None, **run) -> Daemon:
            cfg = drill_config(tmp_path / "run", free_port(), **run)
            cfg["launch"] = {"backend": "kubernetes", "stop_grace_s": 3.0, "kubernetes": {
                "namespace": "titan", "image": "titan-supervisor:cpu", "api_server": k8s.url,
                "token_file": str(tmp_path / "k8s-token"), "python": sys.executable, "watch_timeout_s": 30}}
            for section, body in (extra or {}).items():
                cfg.setdefault(section, {}).update(body)
            made.append(Daemon(tmp_path, cfg))
            return made[-1]

        yield k8s, make
        for d in made:
            d.cleanup()


def _first(rows, **match):
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def _finding_and_action(d: Daemon, kind: str, action: str) -> tuple[dict, dict]:
    j = d.journal()
    try:
        finding = _first(j.findings(limit=1000), kind=kind)
        act = _first(j.actions(), kind=action)
        return finding, act
    finally:
        j.close()


def test_dead_rank_in_a_pod_restarts_as_a_new_jobset(cluster):
    k8s, make = cluster
    d = make(steps=80, faults="crash@35:rank=1").start()
    assert d.wait_exit(240) == 0, d.log_tail()
    finding, act = _finding_and_action(d, "dead_rank", "restart")
    assert finding["rank"] == 1 and finding["evidence"]["signal_name"] == "SIGKILL"  # torchrun's root cause
    assert finding["evidence"]["host"] == "node-a"  # the pod's node
    assert act["state"] == "done" and act["outcome"]["generation"] == 1
    posts = [p for m, p in k8s.requests if m == "POST"]
    assert posts == ["/apis/jobset.x-k8s.io/v1alpha2/namespaces/titan/jobsets"] * 2
    assert [j["metadata"]["name"] for j in k8s.list("JobSet", "titan")] == ["titan-trainer-g1"]  # g0 deleted
    [pod] = k8s.pods()
    assert pod["metadata"]["annotations"]["titan-supervisor/load-step"] == str(act["outcome"]["load_step"])
    assert pod["status"]["phase"] == "Succeeded"
    assert max(r["step"] for r in spool(d.workdir)[0]) == 80


def test_hung_rank_in_a_pod_is_killed_and_restarted(cluster):
    k8s, make = cluster
    d = make(steps=80).start()
    st = d.wait_step(30)
    victim = int(st["trainer_pids"]["1"])  # the fake kubelet runs pods here, so the pid is real
    os.kill(victim, signal.SIGSTOP)
    try:
        assert d.wait_exit(240) == 0, d.log_tail()
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finding, act = _finding_and_action(d, "hang", "kill_restart_hang")
    assert finding["rank"] == 1
    assert act["state"] == "done" and act["outcome"]["generation"] == 1
    assert "no stack dump: exec into trainer pods is not granted" in act["outcome"]["stacks"]
    assert "titan-trainer-g0" in act["outcome"]["stacks"] and "phase Running" in act["outcome"]["stacks"]
    deletes = [p for m, p in k8s.requests if m == "DELETE" and "/pods/" in p]
    assert deletes and all("titan-trainer-g0" in p for p in deletes)
    assert max(r["step"] for r in spool(d.workdir)[0]) == 80


def test_exclude_node_cordons_the_node_and_the_next_generation_runs_elsewhere(cluster):
    k8s, make = cluster
    d = make({"policy": {"exclude_node_after": 1}}, steps=60, faults="crash@25:rank=1").start()
    assert d.wait_exit(240) == 0, d.log_tail()
    finding, act = _finding_and_action(d, "dead_rank", "exclude_node")
    assert finding["evidence"]["host"] == "node-a"
    assert act["state"] == "done" and act["outcome"]["excluded"] is True and act["outcome"]["node"] == "node-a"
    assert k8s.node("node-a")["spec"]["unschedulable"] is True
    assert not k8s.node("node-b")["spec"].get("unschedulable")
    assert ("PATCH", "/api/v1/nodes/node-a") in k8s.requests
    j = d.journal()
    try:
        assert j.get_meta("excluded_nodes") == ["node-a"]
    finally:
        j.close()
    [pod] = k8s.pods()
    assert pod["metadata"]["labels"]["titan-supervisor/generation"] == "1" and pod["spec"]["nodeName"] == "node-b"
    assert max(r["step"] for r in spool(d.workdir)[0]) == 60
