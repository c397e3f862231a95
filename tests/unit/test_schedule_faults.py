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


def test_fault_spec_parsing_and_once_per_process():
    faults = parse_faults("spike@30:lr=100:steps=2,nan@5,crash@9:rank=1:gen=*")
    assert [(f.kind, f.step, f.rank, f.gen) for f in faults] == [("spike", 30, 0, "0"), ("nan", 5, 0, "0"), ("crash", 9, 1, "*")]
    plan = FaultPlan("nan@5,spike@3:lr=10:steps=2", rank=0, generation=0)
    assert plan.nan_now(5) and not plan.nan_now(5)
    plan.before_step(3)
    assert [plan.lr_factor(s) for s in (2, 3, 4, 5)] == [1.0, 10.0, 10.0, 1.0]
    assert not FaultPlan("nan@5", rank=1, generation=0).faults
    assert not FaultPlan("nan@5", rank=0, generation=1).faults


@pytest.mark.parametrize("spec, needle", [
    ("boom@3", "unknown kind 'boom'"), ("nan", "expected KIND@STEP"), ("nan@x", "not an integer"),
    ("nan@0", ">= 1"), ("nan@3:lr=2", "unknown parameter 'lr=2'"), ("hang@3:mode=nap", "sleep or stop"),
    ("slow@3:seconds=abc", "not a valid float"),
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
