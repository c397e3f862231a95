import pytest

from training.faults import FaultPlan, parse_faults
from training.schedule import LrScale, WSDSchedule


def test_wsd_warmup_stable_decay_shape():
    s = WSDSchedule(warmup_steps=10, total_steps=100, decay_steps=20, min_lr_factor=0.1)
    assert s.factor(5) == pytest.approx(5 / 11)
    assert s.factor(11) == s.factor(80) == 1.0
    assert s.factor(90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(100) == pytest.approx(0.1)


def test_wsd_decay_can_start_at_any_step_and_extend_moves_the_end():
    s = WSDSchedule(warmup_steps=10, total_steps=100, decay_steps=20)
    s.extend(200, current_step=50)
    assert s.total_steps == 200 and s.factor(150) == 1.0 and s.factor(190) < 1.0
    s.decay_now(60, decay_steps=10)
    assert s.factor(60) == 1.0 and s.factor(65) == pytest.approx(0.5) and s.total_steps == 70
    with pytest.raises(ValueError, match="already started"):
        s.extend(300, current_step=65)
    restored = WSDSchedule(warmup_steps=10, total_steps=100, decay_steps=20)
    restored.load_state_dict(s.state_dict())
    assert [restored.factor(i) for i in range(1, 71)] == [s.factor(i) for i in range(1, 71)]


def test_lr_scale_ramps_linearly_and_rejects_bad_values():
    sc = LrScale()
    sc.set(0.5, ramp_steps=4, at_step=10)
    assert [sc.value(i) for i in (10, 12, 14, 20)] == [1.0, 0.75, 0.5, 0.5]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            sc.set(bad, 0, 0)


def test_fault_spec_defaults_job_wide_data_and_events():
    faults = parse_faults("spike@30:lr=100:steps=2,nan@5,badbatch@7,crash@9:rank=1:gen=*,hang@4")
    assert [(f.kind, f.step, f.rank, f.gen) for f in faults] == [
        ("spike", 30, "*", "once"), ("nan", 5, "*", "*"), ("badbatch", 7, "*", "*"),
        ("crash", 9, "1", "*"), ("hang", 4, "0", "once")]
    # job-wide kinds reach every rank in every generation; explicit selectors still narrow them
    assert FaultPlan("nan@5,spike@3", rank=3, generation=2).active
    assert not FaultPlan("nan@5:rank=0", rank=1, generation=0).faults
    assert not FaultPlan("nan@5:gen=0", rank=0, generation=1).faults
    assert not FaultPlan("crash@5", rank=1, generation=0).faults  # process faults: rank 0


def test_an_lr_spike_changes_every_ranks_lr_once_per_process_without_state():
    plans = [FaultPlan("spike@3:lr=10:steps=2", rank=r, generation=0) for r in (0, 1)]
    for plan in plans:
        plan.before_step(3)
        assert [plan.lr_factor(s) for s in (2, 3, 4, 5)] == [1.0, 10.0, 10.0, 1.0]
        plan.clear_transient()  # a rollback to step 2 replays step 3: no second spike
        plan.before_step(3)
        assert plan.lr_factor(3) == 1.0


def test_event_faults_fire_once_per_job_across_processes(tmp_path):
    """gen=once: a restart that replays the step (new process, new generation) does not fire
    it again; gen=* does; each rank keeps its own marker. A job-wide event (rank=*) fires in every
    rank of the generation that first reached its step and in no later one: a rank that was down
    then (torchft mode: a replica group being relaunched, all groups sharing the marker folder)
    must not get a spike of its own when it passes the step after a rollback (its LR alone would
    change and the groups' parameters would split)."""
    first = FaultPlan("spike@3:lr=10,slow@3:seconds=0.0:rank=*:gen=*", rank=0, generation=0, state_dir=tmp_path)
    first.before_step(3)
    assert first.lr_factor(3) == 10.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-spike@3-rank0.fired"]
    again = FaultPlan("spike@3:lr=10", rank=0, generation=1, state_dir=tmp_path)
    again.before_step(3)
    assert again.lr_factor(3) == 1.0
    same_generation = FaultPlan("spike@3:lr=10", rank=1, generation=0, state_dir=tmp_path)
    same_generation.before_step(3)
    assert same_generation.lr_factor(3) == 10.0  # rank 1 beside rank 0 in generation 0: both spike
    late = FaultPlan("spike@3:lr=10", rank=2, generation=1, state_dir=tmp_path)
    late.before_step(3)
    assert late.lr_factor(3) == 1.0  # down in generation 0; the job already had its spike
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-spike@3-rank0.fired", "0-spike@3-rank1.fired"]
    own = FaultPlan("slow@3:rank=2:seconds=0.0", rank=2, generation=1, state_dir=tmp_path)
    own.before_step(3)  # a rank's own process fault keeps its own history
    assert (tmp_path / "0-slow@3-rank2.fired").exists()
    # a fault that applies to one rank only comes first: the spike is fault 1 in every rank
    spec = "crash@9:rank=1,spike@5:lr=10"
    FaultPlan(spec, rank=0, generation=0, state_dir=tmp_path / "b").before_step(5)
    late1 = FaultPlan(spec, rank=1, generation=1, state_dir=tmp_path / "b")
    late1.before_step(5)
    assert late1.lr_factor(5) == 1.0 and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["1-spike@5-rank0.fired"]
    assert FaultPlan("spike@3:lr=10:gen=*", rank=0, generation=1, state_dir=tmp_path).faults[0].gen == "*"


def test_data_faults_recur_with_their_batches_until_a_rollback_skips_them():
    """nan@5 / badbatch@7:steps=2 name the batches an unbroken run trains on at those steps
    (2 batches per step here): any process that trains on them again gets the fault again."""
    plan = FaultPlan("nan@5:applied=1,badbatch@7:steps=2:frac=0.5", rank=1, generation=4, batches_per_step=2)
    assert [b for b in range(1, 21) if plan.nan_now(b)] == [10]  # step 5's last batch
    assert plan.nan_now(10) and plan.nan_update_applied() and not plan.nan_update_applied()
    assert [b for b in range(1, 21) if plan.badbatch_now(b)] == [13, 14, 15, 16]
    assert plan.badbatch_fraction(13) == 0.5
    # after a rollback that replays the window the same batches are bad again; one that
    # skipped past them (batches 13..16 drained) never trains on them
    assert plan.badbatch_now(14) and not plan.badbatch_now(17)


@pytest.mark.parametrize("spec, needle", [
    ("boom@3", "unknown kind 'boom'"), ("nan", "expected KIND@STEP"), ("nan@x", "not an integer"),
    ("nan@0", ">= 1"), ("nan@3:lr=2", "unknown parameter 'lr=2'"), ("hang@3:mode=nap", "sleep or stop"),
    ("slow@3:seconds=abc", "not a valid number"), ("nan@3:rank=x", "rank must be a rank number or \\*"),
    ("crash@3:gen=soon", "gen must be a generation number, \\* or once"), ("badbatch@3:gen=once", "data fault recurs"),
    # found by an adversarial review: each parsed, then crashed the rank when it fired
    ("slow@1:seconds=-1", "out of range"), ("slow@1:seconds=1e400", "not a valid number"),
    ("slow@1:seconds=nan", "not a valid number"), ("spike@3:lr=inf", "not a valid number"),
    ("badbatch@3:frac=nan", "not a valid number"), ("badbatch@3:frac=2", "out of range"),
    ("spike@3:steps=99999999999999999999", "not a valid integer"),
    ("spike@\u0663\u0660", "not an integer"), ("nan@3:rank=\u0663", "rank must be a rank number"),
])
def test_bad_fault_spec_names_the_problem(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_faults(spec)


def test_oom_fault_fails_like_an_allocator_oom_and_restores_the_limit():
    """The memory blow-up fault on CPU: the allocation fails with torch.OutOfMemoryError (what
    the dead-rank detector's OOM patterns match), not the kernel OOM killer. Run in a
    subprocess: it lowers the address-space limit of its own process."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from training.faults import FaultPlan\n"
        "before = resource.getrlimit(resource.RLIMIT_AS)\n"
        "plan = FaultPlan('oom@3:gib=64', rank=0, generation=0)\n"
        "try:\n"
        "    plan.before_step(3)\n"
        "except torch.OutOfMemoryError as e:\n"
        "    print('OOM:', str(e)[:80])\n"
        "assert resource.getrlimit(resource.RLIMIT_AS) == before\n"
        "x = torch.ones(1 << 20)  # allocation works again\n"
        "print('ok', float(x.sum()))\n"
    )
    from tests.trainer_harness import ROOT, trainer_env

    p = subprocess.run([sys.executable, "-c", code], env=trainer_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "OOM: CPU out of memory (injected)" in p.stdout and "ok 1048576.0" in p.stdout
