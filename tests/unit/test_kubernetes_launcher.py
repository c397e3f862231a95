"""The Kubernetes launcher against tests/k8s_fake.py, a fake API server (real HTTP on loopback, real
watch streams, real container processes) standing in for a Kubernetes API server, which cannot run
here. The "trainer" is a small shell script in place of the image's python, so each test takes
about a second; the daemon drills (tests/integration/test_kubernetes_launcher.py) run real torchtitan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from supervisor.detect.dead_rank import DeadRankDetector
from supervisor.detect.findings import DEAD_RANK, OOM
from supervisor.launch.kubernetes import GENERATION_LABEL, RUN_LABEL, KubernetesLauncher
from supervisor.launch.local import LaunchSpec
from tests.k8s_fake import FakeKubernetes

ROOT = Path(__file__).resolve().parents[2]
REPORT = """Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_03:56:17
  host      : trainer-0
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)  (SIGKILL)
"""
# Stands in for `python -m torch.distributed.run ...`: records its arguments and pid, then
# sleeps, or prints torchrun's failure report and exits 1 (MODE=crash).
SCRIPT = f"""#!/bin/sh
echo "$$ $*" > "$OUT/$TITAN_GEN.args"
if [ "$MODE" = crash ]; then printf '%s' '{REPORT}'; exit 1; fi
if [ "$MODE" = done ]; then exit 0; fi
exec sleep 600
"""


def wait(pred, timeout=10.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def k8s(tmp_path):
    token = "s3cret-token"
    (tmp_path / "token").write_text(token)
    with FakeKubernetes(tmp_path / "kubelet", token=token) as fake:
        yield fake


@pytest.fixture
def launcher(k8s, tmp_path):
    script = tmp_path / "python"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    cfg = KubernetesLauncher.Config(namespace="titan", image="titan-supervisor:cpu", api_server=k8s.url,
                                    token_file=str(tmp_path / "token"), python=str(script),
                                    supervisor_url="http://titan-supervisor:8642", watch_timeout_s=2)
    return lambda: KubernetesLauncher(cfg, stop_grace_s=2)


def spec(tmp_path, generation=0, mode="sleep", **kw):
    return LaunchSpec(generation=generation, nproc=2, preset="tiny", workdir=tmp_path / "run",
                      supervisor_url="http://127.0.0.1:1", run_id="r1", load_step=kw.pop("load_step", 40),
                      skip_batches=kw.pop("skip_batches", 7), lr_scale=kw.pop("lr_scale", 0.5),
                      env={"MODE": mode, "OUT": str(tmp_path), "TITAN_GEN": str(generation)}, **kw)


def test_start_creates_the_generations_jobset_and_runs_the_trainer_command(launcher, k8s, tmp_path):
    gen = launcher().start(spec(tmp_path))
    args = wait(lambda: (tmp_path / "0.args").exists() and (tmp_path / "0.args").read_text(), what="container start")
    pid, argv = args.split(" ", 1)
    assert "--checkpoint.load_step 40" in argv and "--supervision.skip_batches 7" in argv
    assert "--supervision.lr_scale 0.5" in argv and "--supervision.generation 0" in argv
    assert "--supervision.url http://titan-supervisor:8642" in argv  # the Service, not the daemon's loopback
    [js] = k8s.list("JobSet", "titan")
    assert js["metadata"]["name"] == "titan-trainer-g0"
    assert js["metadata"]["labels"][RUN_LABEL] == "r1" and js["metadata"]["labels"][GENERATION_LABEL] == "0"
    assert js["metadata"]["annotations"]["titan-supervisor/skip-batches"] == "7"
    wait(lambda: "phase Running" in gen.dump_stacks(), what="the watch to see the running pod")
    assert gen.poll() == [] and gen.alive()
    assert "no stack dump: exec into trainer pods is not granted" in gen.dump_stacks()
    assert os.path.exists(f"/proc/{pid}")
    gen.stop(0)


def test_a_rank_killed_inside_the_pod_is_one_rank_exit_with_torchruns_root_cause(launcher, tmp_path):
    gen = launcher().start(spec(tmp_path, mode="crash"))
    exits = wait(gen.poll, what="the rank exit")
    assert [(e.rank, e.exitcode, e.host) for e in exits] == [(1, -9, "node-a")]
    assert any("exit code 1" in line for line in exits[0].log_tail)
    assert gen.exited == 1 and not gen.alive()
    assert gen.poll() == []  # reported once
    # the generation ended: its watch thread (and its connection to the API server) is gone
    wait(lambda: not any(t.name == f"k8s-watch-{gen.name}" for t in threading.enumerate()), 5, "the watch to end")
    f = DeadRankDetector().observe_exit(exits[0].rank, exits[0].exitcode, 0.0, 5, host=exits[0].host)
    assert f[0].kind == DEAD_RANK and f[0].evidence["signal_name"] == "SIGKILL" and f[0].evidence["host"] == "node-a"


def test_oomkilled_container_is_an_oom_rank_exit(launcher, k8s, tmp_path):
    gen = launcher().start(spec(tmp_path))
    [pod] = wait(lambda: [p for p in k8s.pods() if p["status"]["phase"] == "Running"], what="running pod")
    k8s.oom_kill(pod["metadata"]["name"])
    [ex] = wait(gen.poll, what="the OOM exit")
    assert (ex.rank, ex.exitcode, ex.oom_killed, ex.host) == (0, 137, True, "node-a")
    f = DeadRankDetector().observe_exit(ex.rank, ex.exitcode, 0.0, 5, oom_killed=ex.oom_killed, log_lines=ex.log_tail)
    assert f[0].kind == OOM


@pytest.mark.parametrize("how", ["evict", "lose_node"])
def test_evicted_or_node_lost_pod_is_a_killed_rank(launcher, k8s, tmp_path, how):
    gen = launcher().start(spec(tmp_path))
    [pod] = wait(lambda: [p for p in k8s.pods() if p["status"]["phase"] == "Running"], what="running pod")
    wait(lambda: "phase Running" in gen.dump_stacks(), what="the watch to see the running pod")
    if how == "evict":
        k8s.evict(pod["metadata"]["name"])
    else:
        k8s.lose_node("node-a")
    [ex] = wait(gen.poll, what="the exit")
    assert ex.exitcode == 137 and ex.host == "node-a" and not ex.oom_killed
    assert any(("Evicted" if how == "evict" else "DeletionByTaintManager") in line for line in ex.log_tail), ex.log_tail
    assert gen.exited == 137


def test_stop_deletes_pods_with_grace_then_the_jobset_and_kills_a_stopped_process(launcher, k8s, tmp_path):
    gen = launcher().start(spec(tmp_path))
    pid = int(wait(lambda: (tmp_path / "0.args").exists() and (tmp_path / "0.args").read_text(), what="start").split()[0])
    os.kill(pid, signal.SIGSTOP)  # a hung rank: SIGTERM would not reach it
    t = time.time()
    gen.stop(0)
    assert time.time() - t < 5
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert k8s.list("JobSet", "titan") == [] and k8s.pods() == []
    assert gen.exited == 137 and not gen.alive()
    assert ("DELETE", "/apis/jobset.x-k8s.io/v1alpha2/namespaces/titan/jobsets/titan-trainer-g0") in k8s.requests
    gen.stop(0)  # idempotent: 404s ignored


def test_a_new_launcher_adopts_the_running_generation_by_labels(launcher, k8s, tmp_path):
    first = launcher().start(spec(tmp_path, generation=3))
    wait(lambda: k8s.pods(), what="pod")
    again = launcher()
    assert again.adopt(spec(tmp_path, generation=2), 0, {}) is None  # no JobSet for that generation
    other = spec(tmp_path, generation=3)
    other.run_id = "another-run"
    assert again.adopt(other, 0, {}) is None  # same name, another run: not ours
    gen = again.adopt(spec(tmp_path, generation=3), 0, {0: 11, 1: 12})
    assert gen is not None and gen.rank_pids == {0: 11, 1: 12}
    wait(lambda: gen.alive() and "phase Running" in gen.dump_stacks(), what="adopted watch")
    gen.stop(0)
    first.close()
    assert again.adopt(spec(tmp_path, generation=3), 0, {}) is None  # stopped: nothing to adopt


def test_exclude_node_cordons_it_and_the_next_generation_lands_elsewhere(launcher, k8s, tmp_path):
    la = launcher()
    assert la.exclude_node("node-a") == {"node": "node-a", "cordoned": True, "already_cordoned": False}
    assert k8s.node("node-a")["spec"]["unschedulable"] is True
    assert la.exclude_node("node-a")["already_cordoned"] is True  # idempotent
    gen = la.start(spec(tmp_path))
    [pod] = wait(lambda: k8s.pods(), what="pod")
    assert pod["spec"]["nodeName"] == "node-b"
    with pytest.raises(LookupError, match="node 'node-z' is not in the cluster"):
        la.exclude_node("node-z")
    gen.stop(0)


def test_the_jobset_keeps_the_deploy_manifests_labels_security_and_failure_policy(launcher, tmp_path):
    base = yaml.safe_load((ROOT / "deploy/kubernetes/base/trainer-jobset.yaml").read_text())
    ours = launcher().jobset(spec(tmp_path))
    assert ours["apiVersion"] == base["apiVersion"] and ours["spec"]["failurePolicy"] == base["spec"]["failurePolicy"]
    job, base_job = ours["spec"]["replicatedJobs"][0]["template"]["spec"], base["spec"]["replicatedJobs"][0]["template"]["spec"]
    for key in ("backoffLimit", "completionMode"):
        assert job[key] == base_job[key]
    pod, base_pod = job["template"], base_job["template"]
    assert base_pod["metadata"]["labels"].items() <= pod["metadata"]["labels"].items()
    for key in ("serviceAccountName", "restartPolicy", "securityContext", "affinity"):
        assert pod["spec"][key] == base_pod["spec"][key], key
    assert pod["spec"]["containers"][0]["securityContext"] == base_pod["spec"]["containers"][0]["securityContext"]
    assert pod["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_settings_select_the_backend_and_refuse_bad_kubernetes_settings(tmp_path):
    from supervisor.settings import ConfigError, Settings

    cfg = tmp_path / "s.toml"
    cfg.write_text('[launch]\nbackend = "kubernetes"\n[launch.kubernetes]\nimage = "titan-supervisor:cuda"\n')
    assert Settings.load(cfg).launch.backend == "kubernetes"
    cfg.write_text('[launch]\nbackend = "kubernetes"\n[launch.kubernetes]\nimage = " "\n')
    with pytest.raises(ConfigError, match="launch.kubernetes: image: empty"):
        Settings.load(cfg)
    cfg.write_text('[launch]\nbackend = "k8s"\n')
    with pytest.raises(ConfigError, match="launch.backend"):
        Settings.load(cfg)
    cfg.write_text('[launch]\nbackend = "kubernetes"\n[launch.kubernetes]\nimage = "x"\nnamespace = "Bad_NS"\n')
    with pytest.raises(ConfigError, match="launch.kubernetes: namespace 'Bad_NS' is not a Kubernetes name"):
        Settings.load(cfg)
    cfg.write_text('[launch.kubernetes]\ntoken_file = "/nonexistent/token"\n')
    with pytest.raises(ConfigError, match="token_file /nonexistent/token does not exist"):
        Settings.load(cfg)


def test_the_daemon_imports_no_kubernetes_client_unless_the_backend_is_kubernetes(tmp_path):
    code = ("import sys; from supervisor.settings import Settings; from supervisor.daemon import Supervisor; "
            f"s = Settings.load(None, run={{'workdir': {str(tmp_path / 'run')!r}}}); Supervisor(s); "
            "print(sorted(m for m in sys.modules if m.startswith('lightkube')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
