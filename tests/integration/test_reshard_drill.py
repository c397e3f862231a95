"""Reshard drill: DP 2 → DP 1 → DP 2 from the same DCP checkpoints keeps the exact data position.

Real torchtitan on CPU (gloo), tiny model, real torchrun with 2 and then 1 rank(s); nothing mocked.
The run asks for a fixed global batch (``--training.global_batch_size 8`` with local batch 4), so
at DP 1 torchtitan accumulates 2 microbatches per step and every step still trains on 8 samples.

The proof is the run's own numbers: the per-rank sample logs (global sample index + token
digest of every row trained on, `training.data`) from step S on equal an unbroken 2-rank run's,
and the losses match it within float32 reduction-order noise (see `LOSS_RTOL`).

CI cost (both tests, one shared unbroken run): six torchrun launches of the tiny model and one
daemon; 4 min 8 s wall on this 2-core machine at load average ~12, 2 min 8 s of CPU.
"""

from __future__ import annotations

import shutil

import pytest

from tests.data_position import LOSS_RTOL, dp_of, samples_by_step
from tests.trainer_harness import losses_by_step, run_trainer, spool

pytestmark = [pytest.mark.integration, pytest.mark.drill]

STEPS, SHRINK_AT, GROW_AT = 20, 4, 8
# What the daemon drill's config renders too ([training] seed 42, global_batch_size 8; interval 4).
COMMON = ["--training.global_batch_size", "8", "--debug.seed", "42", "--checkpoint.interval", "4",
          "--training.steps", str(STEPS)]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """One unbroken 2-rank run, the reference of both drills."""
    dump = tmp_path_factory.mktemp("unbroken")
    proc = run_trainer(dump, 2, COMMON)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dump


def test_reshard_2_to_1_to_2_keeps_the_exact_data_position(tmp_path, unbroken):
    resharded = tmp_path / "resharded"
    (resharded / "checkpoint").mkdir(parents=True)
    shutil.copytree(unbroken / "checkpoint" / f"step-{SHRINK_AT}", resharded / "checkpoint" / f"step-{SHRINK_AT}")
    # Node lost: continue on 1 rank from step S; checkpoint at GROW_AT, then the node returns.
    proc = run_trainer(resharded, 1, [*COMMON, "--checkpoint.load_step", str(SHRINK_AT),
                                      "--supervision.generation", "1", "--training.steps", str(GROW_AT)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (resharded / "checkpoint" / f"step-{GROW_AT}" / ".metadata").is_file()
    proc = run_trainer(resharded, 2, [*COMMON, "--checkpoint.load_step", str(GROW_AT),
                                      "--supervision.generation", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]

    assert dp_of(resharded, 1) == {1} and dp_of(resharded, 2) == {2}
    want = samples_by_step(unbroken)
    got = samples_by_step(resharded)
    assert sorted(got) == list(range(SHRINK_AT + 1, STEPS + 1))
    assert all(len(ids) == 8 for ids in got.values()), "the global batch is kept: 8 samples per step"
    assert {s: want[s] for s in got} == got, "the resharded run trained on other samples than the unbroken one"

    _, events = spool(resharded)
    started = [e for e in events if e["kind"] == "started"]
    assert [(e["dp_degree"], e["batches_per_step"], e["samples_consumed"]) for e in started] == \
        [(1, 2, SHRINK_AT * 8), (2, 1, GROW_AT * 8)]

    a, b = losses_by_step(spool(unbroken)[0]), losses_by_step(spool(resharded)[0])
    assert sorted(b) == list(range(SHRINK_AT + 1, STEPS + 1))
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in b)
    assert worst <= LOSS_RTOL, f"loss differs from the unbroken run by {worst:.2e} relative"
    print(f"reshard drill: worst relative loss difference {worst:.2e} over steps {SHRINK_AT + 1}..{STEPS}")


def test_daemon_reshard_command_shrinks_and_grows_back_with_the_exact_data_position(tmp_path, unbroken):
    """The same guarantee through the real daemon (a subprocess, local launcher = torchrun):
    `titan-supervisor reshard --ranks 1`, then `--ranks 2`, each checkpointing the running trainer
    and restarting from that checkpoint; the run then finishes by itself."""
    from supervisor.auth import add_token
    from tests.daemon_harness import Daemon, drill_config, free_port
    from tests.integration.test_control_plane import Api, cli, wait_status

    steps = STEPS

    tf = tmp_path / "tokens.jsonl"
    token = add_token(tf, "alice", "operator")
    # Every step of every generation takes >= 0.3 s, so the commands land mid-run (a sleep changes no
    # number); a slow fault fires at its exact step, so one per step lets a restarted generation slow too.
    slow = ",".join(f"slow@{s}:rank=0:seconds=0.3:gen=*" for s in range(1, steps + 1))
    cfg = drill_config(tmp_path / "run", free_port(), steps=steps, checkpoint_interval=4, faults=slow)
    cfg["training"]["global_batch_size"] = 8
    cfg["server"]["token_file"] = str(tf)
    cfg["launch"] = {"directive_timeout_s": 60.0}
    d = Daemon(tmp_path, cfg)
    api = Api(d.url, token)
    try:
        d.start()
        wait_status(api, lambda s: s["step"] >= 3, 240, "step 3", d)
        out = cli(d, token, "reshard", "--ranks", "1", "--reason", "node lost", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_status(api, lambda s: s["generation"] == 1 and s["step"] >= 10, 240, "step 10 on 1 rank", d)
        out = cli(d, token, "reshard", "--ranks", "2", "--reason", "node back", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        assert d.wait_exit(240) == 0, d.log_tail()
    finally:
        d.cleanup()

    j = d.journal()
    try:
        acts = [a for a in reversed(j.actions()) if a["kind"] == "reshard"]
        gens = list(reversed(j.generations()))
    finally:
        j.close()
    assert [(a["state"], a["outcome"]["ranks_from"], a["outcome"]["ranks_to"]) for a in acts] == \
        [("done", 2, 1), ("done", 1, 2)]
    assert [g["layout"]["nproc_per_node"] if isinstance(g["layout"], dict) else json_layout(g) for g in gens] == [2, 1, 2]
    run = tmp_path / "run"
    assert dp_of(run, 0) == {2} and dp_of(run, 1) == {1} and dp_of(run, 2) == {2}
    want, got = samples_by_step(unbroken), samples_by_step(run)
    assert sorted(got) == list(range(1, steps + 1)) and got == want
    a, b = losses_by_step(spool(unbroken)[0]), losses_by_step(spool(run)[0])
    assert sorted(b) == list(range(1, steps + 1))
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in b)
    assert worst <= LOSS_RTOL, f"loss differs from the unbroken run by {worst:.2e} relative"
    print(f"daemon reshard drill: reshards at {[a['outcome']['load_step'] for a in acts]}, "
          f"worst relative loss difference {worst:.2e}")


def json_layout(g) -> int:
    import json

    return json.loads(g["layout"])["nproc_per_node"]
