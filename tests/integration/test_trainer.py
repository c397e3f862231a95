"""The trainer side on real torchtitan: 2 CPU ranks under torchrun, gloo, tiny model.

The directives come from `ScriptedPeer`, a real HTTP server speaking the daemon's protocol,
so the trainer is tested on its own; the daemon drills drive the same code with the real daemon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_harness import ROOT, ScriptedPeer, losses_by_step, read_jsonl, run_trainer, spool, trainer_env
from training.schedule import WSDSchedule

pytestmark = pytest.mark.integration

STEPS = 40
BASE_LR = 8e-4  # training.presets.tiny


def _tiny_schedule() -> WSDSchedule:
    # tiny: warmup 10, decay_ratio 0.2 (linear to 0.1) over STEPS
    return WSDSchedule(warmup_steps=10, total_steps=STEPS, decay_steps=round(STEPS * 0.2), min_lr_factor=0.1)


def _copy_checkpoint(src_dump, dst_dump, step):
    (dst_dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(src_dump / "checkpoint" / f"step-{step}", dst_dump / "checkpoint" / f"step-{step}")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """One 2-rank run that receives every kind of light directive, a NaN and a hot rollback."""
    dump = tmp_path_factory.mktemp("scripted")
    script = [
        (7, {"id": "lr1", "kind": "set_lr_scale", "scale": 0.5, "ramp_steps": 0}),
        (12, {"id": "skip1", "kind": "skip_updates", "n": 1}),
        (14, {"id": "bad1", "kind": "explode", "step": "../etc"}),
        (31, {"id": "rb1", "kind": "rollback", "step": 20, "skip_batches": 3}),
        (33, {"id": "rb1", "kind": "rollback", "step": 20, "skip_batches": 3}),  # a resend: must not roll back twice
    ]
    with ScriptedPeer(script) as peer:
        proc = run_trainer(dump, 2, ["--training.steps", str(STEPS), "--supervision.url", peer.url,
                                     "--supervision.trace", "--supervision.faults", "nan@5",
                                     "--supervision.heartbeat_s", "0.2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, events = spool(dump)
    acks = {}
    for e in events:
        if e["kind"] == "directive_applied":
            acks.setdefault(e["directive_id"], []).append(e)
    traces = [read_jsonl(dump / "telemetry" / f"rank-{r}.jsonl") for r in (0, 1)]
    return dict(dump=dump, records=records, events=events, acks=acks, traces=traces, peer=peer)


def _first_segment(trace):
    """Trace lines before the hot rollback (steps strictly increase until then)."""
    out, last = [], 0
    for t in trace:
        if t["step"] <= last:
            break
        out.append(t)
        last = t["step"]
    return out


def test_lr_scale_changes_lr_on_both_ranks_at_the_same_step(scripted):
    applied_at = scripted["acks"]["lr1"][0]["step"]
    assert scripted["acks"]["lr1"][0]["ok"]
    sched = _tiny_schedule()
    seg0, seg1 = (_first_segment(t) for t in scripted["traces"])
    assert [t["lr"] for t in seg0] == [t["lr"] for t in seg1]  # ranks never disagree
    for t in seg0:
        scale = 0.5 if t["step"] > applied_at else 1.0
        assert t["lr"] == pytest.approx(BASE_LR * sched.factor(t["step"]) * scale, rel=1e-9), t


def test_skipped_update_leaves_params_and_adam_step_untouched(scripted):
    applied_at = scripted["acks"]["skip1"][0]["step"]
    skipped = applied_at + 1
    for trace in scripted["traces"]:
        by_step = {t["step"]: t for t in _first_segment(trace)}
        assert by_step[skipped]["update_skipped"]
        assert by_step[skipped]["param_checksum"] == by_step[skipped - 1]["param_checksum"]
        assert by_step[skipped]["adam_step"] == by_step[skipped - 1]["adam_step"]
        # and the step after it updates again
        assert by_step[skipped + 1]["param_checksum"] != by_step[skipped]["param_checksum"]
        assert by_step[skipped + 1]["adam_step"] == by_step[skipped]["adam_step"] + 1
    rec = next(r for r in scripted["records"] if r["step"] == skipped)
    assert rec["update_skipped"] and rec["skip_reason"] == "directive"


def test_nan_gradient_skips_the_update_and_training_goes_on(scripted):
    rec5 = next(r for r in scripted["records"] if r["step"] == 5)
    assert rec5["update_skipped"] and rec5["skip_reason"] == "non_finite_grad_norm"
    assert rec5["grad_norm"] != rec5["grad_norm"]  # NaN
    for trace in scripted["traces"]:
        by_step = {t["step"]: t for t in _first_segment(trace)}
        assert by_step[5]["param_checksum"] == by_step[4]["param_checksum"]
        assert by_step[5]["adam_step"] == by_step[4]["adam_step"] == 4
    assert max(r["step"] for r in scripted["records"]) == STEPS
    assert scripted["events"][-1]["kind"] == "finished"


def test_malformed_directive_is_refused_with_a_clear_error_and_changes_nothing(scripted):
    ack = scripted["acks"]["bad1"][0]
    assert not ack["ok"]
    assert "malformed directive" in ack["detail"] and "explode" in ack["detail"]
    step = ack["step"]
    seg = {t["step"]: t for t in _first_segment(scripted["traces"][0])}
    assert not seg[step + 1]["update_skipped"]  # nothing else happened because of it


def test_hot_rollback_is_in_process_and_resent_directive_applies_once(scripted):
    acks = scripted["acks"]["rb1"]
    assert acks[0]["ok"] and "rolled back to step 20" in acks[0]["detail"]
    assert all(a["detail"] == "already applied" for a in acks[1:]) and len(acks) >= 2
    steps = [r["step"] for r in scripted["records"]]
    back = steps.index(21, steps.index(acks[0]["step"]))  # the replay starts at 21 right after the ack
    assert steps[back - 1] == acks[0]["step"]
    assert steps.count(21) == 2  # rolled back exactly once
    for trace in scripted["traces"]:
        assert len({t["pid"] for t in trace}) == 1  # no process restart
    hb_pids = {(h["rank"], h["pid"]) for h in scripted["peer"].heartbeats}
    assert len(hb_pids) == 2
    # nothing deleted: the step-30 saved before the rollback was moved aside, not overwritten
    moved = list((scripted["dump"] / "quarantine").glob("step-30.superseded-*"))
    assert len(moved) == 1 and (moved[0] / ".metadata").is_file()


def test_hot_rollback_equals_cold_restart_with_same_skip(scripted, tmp_path):
    cold = tmp_path / "cold"
    _copy_checkpoint(scripted["dump"], cold, 20)
    proc = run_trainer(cold, 2, ["--training.steps", str(STEPS), "--checkpoint.load_step", "20",
                                 "--supervision.skip_batches", "3", "--supervision.lr_scale", "0.5"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    cold_losses = losses_by_step(spool(cold)[0])
    hot = scripted["records"]
    replay_start = max(i for i, r in enumerate(hot) if r["step"] == 21)
    hot_losses = {r["step"]: r["loss"] for r in hot[replay_start:]}
    assert sorted(cold_losses) == list(range(21, STEPS + 1))
    assert hot_losses == cold_losses  # bit-identical, step C+1 onwards
    # and the skip mattered: it is not what the un-rolled-back run saw at step 21
    first_21 = next(r["loss"] for r in hot if r["step"] == 21)
    assert first_21 != hot_losses[21]


def test_resume_with_load_step_reproduces_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    proc = run_trainer(full, 2, ["--training.steps", "30"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = tmp_path / "resumed"
    _copy_checkpoint(full, resumed, 10)
    proc = run_trainer(resumed, 2, ["--training.steps", "30", "--checkpoint.load_step", "10"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = losses_by_step(spool(full)[0])
    b = losses_by_step(spool(resumed)[0])
    assert sorted(b) == list(range(11, 31))
    assert {s: a[s] for s in b} == b
    ga = {r["step"]: r["grad_norm"] for r in spool(full)[0]}
    gb = {r["step"]: r["grad_norm"] for r in spool(resumed)[0]}
    assert {s: ga[s] for s in gb} == gb


BAD_STARTS = [
    (["--preset", "no-such-model"], "unknown preset 'no-such-model'"),
    (["--checkpoint.load_step", "7"], "no complete checkpoint step-7"),
    (["--supervision.skip_batches", "-3"], "skip_batches must be >= 0"),
    (["--supervision.faults", "meltdown@3"], "unknown kind 'meltdown'"),
    (["--supervision.lr_scale", "0"], "lr_scale must be a positive number"),
    (["--checkpoint.async_mode", "async_with_pinned_mem"], "needs a GPU"),  # this machine has none
]
# every bad start through the trainer's own main(), one interpreter for all (each `python -m
# training.run` pays ~8 s of torch/torchtitan imports before it can refuse); the real CLI's exit
# status is checked once below
_BAD_START_DRIVER = """
import json, os, sys, tempfile
from training.run import main
out = []
for dump, args in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:  # the case's stderr, at the fd (faulthandler needs one)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(["--dump_folder", dump, *args])
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        out.append([code, err.read().decode(errors="replace")])
print(json.dumps(out))
"""


def test_bad_start_input_is_a_clear_error_and_writes_nothing(tmp_path):
    cases = [(str(tmp_path / f"dump{i}"), args) for i, (args, _) in enumerate(BAD_STARTS)]
    proc = subprocess.run([sys.executable, "-c", _BAD_START_DRIVER, json.dumps(cases)],
                          env=trainer_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (dump, args), (_, needle), (code, err) in zip(cases, BAD_STARTS, results):
        assert code == 2 and needle in err, (args, code, err[-2000:])
        assert not Path(dump).exists(), args
    # the command line itself: exit status 2, the message on stderr, nothing written
    dump = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "training.run", "--dump_folder", str(dump), *BAD_STARTS[0][0]],
                          env=trainer_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and BAD_STARTS[0][1] in proc.stderr
    assert not dump.exists()


def test_extend_and_decay_now_change_the_schedule_without_a_restart(tmp_path):
    """WSD control: extend a 30-step run, then start the decay now for 10 more steps."""
    script = [
        (8, {"id": "ext", "kind": "extend", "steps": 60}),
        (33, {"id": "dec", "kind": "decay_now", "steps": 10}),
    ]
    dump = tmp_path / "wsd"
    with ScriptedPeer(script) as peer:
        proc = run_trainer(dump, 2, ["--training.steps", "30", "--supervision.url", peer.url,
                                     "--supervision.trace"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, events = spool(dump)
    acks = {e["directive_id"]: e for e in events if e["kind"] == "directive_applied"}
    assert acks["ext"]["ok"] and acks["dec"]["ok"], acks
    decay_from = acks["dec"]["step"]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, decay_from + 10 + 1))  # past the original 30, ended by the decay
    lr = {r["step"]: r["lr"] for r in records}
    assert lr[decay_from] == pytest.approx(BASE_LR)  # stable phase until the decay starts
    tail = [lr[s] for s in range(decay_from + 1, decay_from + 11)]
    assert all(a > b for a, b in zip(tail, tail[1:]))  # then it decays every step
    assert tail[-1] == pytest.approx(BASE_LR * 0.1)  # to the preset's min_lr_factor
    for trace in (read_jsonl(dump / "telemetry" / f"rank-{r}.jsonl") for r in (0, 1)):
        assert len({t["pid"] for t in trace}) == 1
        assert [t["lr"] for t in trace] == [lr[s] for s in steps]  # both ranks, same LR, same steps


def _truncate_a_shard(step_dir):
    """Cut a real shard short of what its .metadata needs; returns (shard name, its new size)."""
    shard = sorted(step_dir.glob("__*_0.distcp"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(100)
    return shard.name, 100


def test_load_step_of_a_checkpoint_with_a_truncated_shard_is_refused(scripted, tmp_path):
    """Before supervisor/dcp.py the trainer only looked for .metadata and loaded it anyway."""
    dump = tmp_path / "dump"
    _copy_checkpoint(scripted["dump"], dump, 20)
    shard, size = _truncate_a_shard(dump / "checkpoint" / "step-20")
    for load_step, needle in (("20", f"step-20 in {dump / 'checkpoint'} is invalid: shard {shard} is {size} bytes"),
                              ("-1", f"no valid checkpoint to resume from in {dump / 'checkpoint'}: step-20: shard {shard}")):
        proc = subprocess.run([sys.executable, "-m", "training.run", "--dump_folder", str(dump),
                               "--checkpoint.load_step", load_step],
                              env=trainer_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert needle in proc.stderr
    assert sorted(p.name for p in dump.iterdir()) == ["checkpoint"]  # nothing written


def test_rollback_to_an_invalid_checkpoint_is_refused_and_upstream_profiler_works(scripted, tmp_path):
    """A rollback directive to a checkpoint with a short shard is acked ok=false naming the shard
    and training goes on; the run also uses torchtitan's own profiler (upstream's loop runs)."""
    dump = tmp_path / "dump"
    _copy_checkpoint(scripted["dump"], dump, 20)
    shutil.copytree(dump / "checkpoint" / "step-20", dump / "checkpoint" / "step-15")
    shard, size = _truncate_a_shard(dump / "checkpoint" / "step-15")
    script = [(22, {"id": "rb-bad", "kind": "rollback", "step": 15, "skip_batches": 0})]
    with ScriptedPeer(script) as peer:
        proc = run_trainer(dump, 2, ["--training.steps", str(STEPS), "--checkpoint.load_step", "20",
                                     "--supervision.url", peer.url, "--profiler.enable_profiling",
                                     "--profiler.profile_freq", "5", "--profiler.save_traces_folder", "traces"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, events = spool(dump)
    [ack] = [e for e in events if e["kind"] == "directive_applied"]
    assert not ack["ok"] and ack["directive_id"] == "rb-bad"
    assert f"shard {shard} is {size} bytes, metadata needs" in ack["detail"]
    steps = [r["step"] for r in records]  # the run's length comes from the checkpoint's WSD state
    assert steps == list(range(21, steps[-1] + 1)) and steps[-1] > ack["step"]  # no rollback happened
    traces = list((dump / "traces").rglob("*"))
    assert any(p.is_file() for p in traces), "torchtitan's profiler wrote no trace"


def test_async_snapshot_saves_resume_like_an_unbroken_run(tmp_path):
    """`--checkpoint.async_mode async` saves through `training.snapshot` (twins refilled on the
    step, the DCP save on a writer thread), and each save loads through the normal load path
    (`checkpointer.load`, what a cold start runs too) into the run it came from: a hot rollback
    to step 8 (a save that refilled the twins built at step 4) replays the first pass's losses
    bit for bit; so does a second one to step 16, saved after the first load had replaced the
    optimizer's state tensors (the twins re-paired, not left reading the old ones)."""
    dump = tmp_path / "dump"
    script = [(11, {"id": "rb1", "kind": "rollback", "step": 8, "skip_batches": 0}),
              (19, {"id": "rb2", "kind": "rollback", "step": 16, "skip_batches": 0})]
    with ScriptedPeer(script) as peer:
        proc = run_trainer(dump, 2, ["--training.steps", "22", "--checkpoint.interval", "4",
                                     "--checkpoint.async_mode", "async", "--supervision.url", peer.url])
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "async snapshot saves off" not in log
    # each rank builds its twins at its first save and at the first save after each load
    assert log.count("async snapshot: CPU twins built") == 6, log[-4000:]
    records, events = spool(dump)
    acks = {e["directive_id"]: e for e in events if e["kind"] == "directive_applied"}
    assert acks["rb1"]["ok"] and acks["rb2"]["ok"], acks
    passes, cur = [], {}
    for r in records:  # split at each rollback (the step goes back)
        if cur and r["step"] <= max(cur):
            passes.append(cur)
            cur = {}
        cur[r["step"]] = r["loss"]
    passes.append(cur)
    assert len(passes) == 3 and min(passes[1]) == 9 and min(passes[2]) == 17, [sorted(p) for p in passes]
    for before, after in zip(passes, passes[1:]):
        replayed = [s for s in after if s in before]
        assert len(replayed) >= 3 and all(before[s] == after[s] for s in replayed)
    assert max(passes[2]) == 22
