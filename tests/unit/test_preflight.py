"""Preflight rules: optimizer lint, layout divisibility, memory estimate, fallback order, TOML input."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace

import pytest

from supervisor.model_table import ALL_SHAPES, LLMJP3, ModelShape
from supervisor.preflight import (
    GIB,
    Issue,
    Layout,
    OptimizerPlan,
    Preflight,
    TrainingPlan,
    check_layout,
    check_optimizer,
    estimate_memory,
    exit_code,
    format_report,
    next_safer_layout,
    plan_from_dict,
    preflight,
    reference_lr,
)

LAB_ADAMW = dict(eps=1e-8, beta1=0.9, beta2=0.95, weight_decay=0.1, warmup_steps=2000)
FSDP8 = Layout(dp=8, micro_batch=1, activation_checkpointing="selective", name="fsdp8")
SHARDED_172B = Layout(dp=8, tp=8, pp=8, micro_batch=1, activation_checkpointing="selective", name="tp8-pp8")


def lab_plan(model: str = "llmjp3-1.8b", lr: float = 3e-4, layouts: list[Layout] | None = None,
             world_size: int = 8, **kw) -> TrainingPlan:
    fields = dict(model=ALL_SHAPES[model], optimizer=OptimizerPlan(lr=lr, **LAB_ADAMW),
                  layouts=layouts if layouts is not None else [FSDP8], world_size=world_size,
                  global_batch=1024, seq_len=4096, device="H100")
    fields.update(kw)
    return TrainingPlan(**fields)


def not_info(issues: list[Issue]) -> list[Issue]:
    """"Clean" means no errors and no warnings; info lines (e.g. "no fallback layout") may remain."""
    return [i for i in issues if i.level != "info"]


def errors(issues: list[Issue], field_part: str = "") -> list[Issue]:
    return [i for i in issues if i.level == "error" and field_part in i.field]


def warnings(issues: list[Issue], field_part: str = "") -> list[Issue]:
    return [i for i in issues if i.level == "warning" and field_part in i.field]


# --- the lab's known-good settings pass clean -----------------------------------------------


@pytest.mark.parametrize("model", sorted(LLMJP3))
def test_llmjp3_presets_with_lab_settings_pass_clean(model):
    if model == "llmjp3-172b":
        plan = lab_plan(model, lr=1e-4, layouts=[SHARDED_172B], world_size=512)
    else:
        plan = lab_plan(model, lr=3e-4)
    report = preflight(plan)
    assert not_info(report.all_issues()) == [], format_report(report)
    assert report.chosen_layout_index == 0
    assert exit_code(report) == 0
    assert report.memory[0] is not None and report.memory[0].fits


def test_lab_learning_rates_are_size_appropriate():
    for params, lr in ((8e9, 3e-4), (32e9, 2e-4)):
        shape = ModelShape("x", 32, 4096, 11008, 32, 32, 1000, nominal_params=params)
        plan = replace(lab_plan(), model=shape, optimizer=OptimizerPlan(lr=lr, **LAB_ADAMW))
        assert check_optimizer(plan) == []
    # the reference curve goes down with size, through the documented anchors
    assert reference_lr(1.25e8) == pytest.approx(6e-4)
    assert reference_lr(8e9) == pytest.approx(3e-4)
    assert reference_lr(32e9) == pytest.approx(2e-4)
    assert reference_lr(1e6) == reference_lr(1.25e8)  # flat outside the anchors
    sizes = [1e8, 1e9, 1e10, 1e11, 1e12]
    assert all(reference_lr(a) >= reference_lr(b) for a, b in zip(sizes, sizes[1:]))


# --- optimizer rules -----------------------------------------------------------------------


def test_eps_1e5_is_an_error_that_explains_the_trap():
    plan = lab_plan(optimizer=OptimizerPlan(lr=3e-4, **{**LAB_ADAMW, "eps": 1e-5}))
    (issue,) = errors(check_optimizer(plan), "optimizer.eps")
    assert issue.value == "1e-05"
    for needle in ("1e-5", "√v", "SGD", "3×", "LLM-jp"):
        assert needle in issue.why
    assert "1e-8" in issue.fix
    report = preflight(plan)
    assert report.chosen_layout_index == 0  # the layout is fine ...
    assert exit_code(report) == 1  # ... but launching with this ε is not
    assert "optimizer.eps" in format_report(report)


@pytest.mark.parametrize("eps", [1e-8, 1e-7, 1e-6])
def test_small_eps_passes(eps):
    plan = lab_plan(optimizer=OptimizerPlan(lr=3e-4, **{**LAB_ADAMW, "eps": eps}))
    assert check_optimizer(plan) == []


@pytest.mark.parametrize("field,value,level", [
    ("beta2", 0.8, "warning"), ("beta2", 0.9999, "warning"), ("beta2", 1.0, "error"),
    ("beta1", 1.0, "error"), ("weight_decay", 0.5, "warning"), ("weight_decay", -0.1, "error"),
    ("warmup_steps", 0, "warning"), ("warmup_steps", -5, "error"), ("eps", -1e-8, "error"),
    ("eps", 0.0, "warning"),
])
def test_optimizer_rules(field, value, level):
    plan = lab_plan(optimizer=OptimizerPlan(lr=3e-4, **{**LAB_ADAMW, field: value}))
    issues = check_optimizer(plan)
    assert [(i.level, i.field) for i in issues] == [(level, f"optimizer.{field}")]
    assert issues[0].why and issues[0].fix


@pytest.mark.parametrize("model,lr,side", [
    ("llmjp3-172b", 1e-3, "high"),  # ref ~1e-4 at 172B: 10× too high
    ("llmjp3-150m", 3e-5, "low"),  # ref ~6e-4 at 150M: 20× too low
    ("llmjp3-7.2b", 1e-2, "high"),
])
def test_learning_rate_far_from_size_appropriate_warns(model, lr, side):
    issues = check_optimizer(lab_plan(model, lr=lr))
    (w,) = warnings(issues, "optimizer.lr")
    assert f"far {side}" in w.why


def test_learning_rate_within_band_is_quiet():
    ref = reference_lr(1.8e9)
    for lr in (ref * 2.9, ref * 0.11):
        assert check_optimizer(lab_plan(lr=lr)) == []
    assert warnings(check_optimizer(lab_plan(lr=ref * 3.1)), "lr")
    assert warnings(check_optimizer(lab_plan(lr=ref * 0.09)), "lr")


# --- layout rules --------------------------------------------------------------------------


def test_tp_must_divide_heads():
    plan = lab_plan(world_size=24)  # llmjp3-1.8b: 16 heads, 16 KV heads
    issues = check_layout(plan, Layout(dp=8, tp=3, micro_batch=1))
    tp_errors = errors(issues, ".tp")
    assert len(tp_errors) == 2  # query heads and KV heads
    assert "16 attention heads" in tp_errors[0].why and "KV" in tp_errors[1].why
    assert tp_errors[0].value == "3"


def test_tp_must_divide_kv_heads_under_gqa():
    plan = lab_plan("llmjp3-172b", lr=1e-4, world_size=512)  # 96 heads, 16 KV heads
    (e,) = errors(check_layout(plan, Layout(dp=16, tp=32, micro_batch=1)), ".tp")
    assert "16 KV heads" in e.why


def test_world_size_must_equal_product_of_degrees():
    (e,) = errors(check_layout(lab_plan(), Layout(dp=4, tp=1, micro_batch=1)))
    assert e.field == "layout.dp*tp*pp*cp" and "world size is 8" in e.why


def test_pp_must_divide_layers():
    plan = lab_plan(world_size=40)  # 24 layers
    (e,) = errors(check_layout(plan, Layout(dp=8, pp=5, micro_batch=1)))
    assert e.field == "layout.pp" and "24 layers" in e.why


def test_cp_needs_seq_len_divisible_by_two_cp():
    plan = lab_plan(world_size=24, seq_len=4096)
    (e,) = errors(check_layout(plan, Layout(dp=8, cp=3, micro_batch=1)))
    assert e.field == "layout.cp"
    assert errors(check_layout(lab_plan(world_size=16), Layout(dp=8, cp=2, micro_batch=1))) == []


def test_dp_cannot_exceed_what_the_global_batch_allows():
    plan = lab_plan(world_size=16, global_batch=32)
    (e,) = errors(check_layout(plan, Layout(dp=16, micro_batch=4)))
    assert e.field == "layout.dp" and "at most 8" in e.why


def test_global_batch_must_divide_by_dp_times_micro_batch():
    plan = lab_plan(global_batch=1000)
    (e,) = errors(check_layout(plan, Layout(dp=8, micro_batch=3)))
    assert e.field == "layout.micro_batch"


def test_dp_shard_must_divide_dp():
    (e,) = errors(check_layout(lab_plan(), Layout(dp=8, dp_shard=3, micro_batch=1)))
    assert e.field == "layout.dp_shard"
    assert errors(check_layout(lab_plan(), Layout(dp=8, dp_shard=4, micro_batch=1))) == []  # HSDP


def test_too_few_microbatches_for_the_pipeline_warns():
    plan = lab_plan("llmjp3-172b", lr=1e-4, world_size=512, global_batch=32)
    issues = check_layout(plan, Layout(dp=8, tp=8, pp=8, micro_batch=1))  # 4 micro-batches, 8 stages
    assert [i.field for i in warnings(issues)] == ["layout.pp"]


# --- memory --------------------------------------------------------------------------------


def test_172b_on_8_h100_without_sharding_is_an_oom_error():
    plan = lab_plan("llmjp3-172b", lr=1e-4, world_size=8)
    layout = Layout(dp=8, dp_shard=1, tp=1, pp=1, micro_batch=1)
    (e,) = errors(check_layout(plan, layout))
    assert e.field == "layout.memory"
    assert "OOM" in e.why and "params" in e.why and "adam" in e.why and "usable 72.0 of 80 GiB" in e.why
    est = estimate_memory(plan, layout)
    # 172.4e9 params × 16 bytes (bf16 w + bf16 g + fp32 master + fp32 m, v), unsharded
    state = est.params_gib + est.grads_gib + est.master_gib + est.optimizer_gib
    assert state == pytest.approx(ALL_SHAPES["llmjp3-172b"].param_count() * 16 / GIB, rel=1e-9)
    assert est.total_gib > 2500 and not est.fits


def test_sharded_172b_over_512_h100_fits():
    plan = lab_plan("llmjp3-172b", lr=1e-4, world_size=512)
    est = estimate_memory(plan, SHARDED_172B)
    P = ALL_SHAPES["llmjp3-172b"].param_count()
    assert est.params_gib == pytest.approx(P / 512 * 2 / GIB, rel=1e-9)  # tp·pp = 64, FSDP over dp = 8
    assert est.optimizer_gib == pytest.approx(P / 512 * 8 / GIB, rel=1e-9)
    assert est.stage == "first"  # 8 micro-batches in flight on pipeline stage 0
    assert est.fits and est.total_gib < 0.9 * 80
    assert check_layout(plan, SHARDED_172B) == []


def test_activation_checkpointing_and_sharding_reduce_the_estimate():
    plan = lab_plan("llmjp3-172b", lr=1e-4, world_size=512)
    by_ac = {ac: estimate_memory(plan, replace(SHARDED_172B, activation_checkpointing=ac))
             for ac in ("none", "selective", "full")}
    assert by_ac["full"].activations_gib < by_ac["selective"].activations_gib < by_ac["none"].activations_gib
    assert not by_ac["none"].fits  # the attention-score term dominates without checkpointing
    assert errors(check_layout(plan, replace(SHARDED_172B, activation_checkpointing="none")), "memory")
    ddp = estimate_memory(plan, replace(SHARDED_172B, dp_shard=1))
    fsdp = estimate_memory(plan, SHARDED_172B)
    assert ddp.optimizer_gib == pytest.approx(fsdp.optimizer_gib * 8)


def test_memory_estimate_matches_hand_computation_on_the_tiny_cpu_model():
    tiny = ALL_SHAPES["tiny"]  # 2 layers, hidden 64, 4 heads, vocab 512
    plan = TrainingPlan(model=tiny, optimizer=OptimizerPlan(lr=8e-4, warmup_steps=10),
                        layouts=[Layout(dp=1, micro_batch=2)], world_size=1, global_batch=8, seq_len=256,
                        device="cpu", device_memory_gib=4.0, dtype="fp32")
    est = estimate_memory(plan, plan.layouts[0])
    P = tiny.param_count()
    state = 16 * P  # fp32 w + g + m + v, no master, nothing sharded
    acts = 2 * (256 * 2 * 64 * 34) * 2  # layers × s·b·h·34 bytes, ×2 for fp32 activations
    logits = 256 * 2 * 512 * 6
    assert est.master_gib == 0.0 and est.fsdp_gather_gib == 0.0
    assert est.total_gib * GIB == pytest.approx((state + acts + logits) * 1.1, rel=1e-9)
    assert est.usable_gib == pytest.approx(3.6)
    assert not_info(preflight(plan).all_issues()) == []


def test_cpu_needs_device_memory():
    plan = replace(lab_plan("tiny", lr=8e-4), device="cpu", world_size=1, layouts=[Layout(dp=1, micro_batch=8)])
    report = preflight(plan)
    assert errors(report.issues, "device_memory_gib")
    assert report.chosen_layout_index is None and exit_code(report) == 1


# --- the ordered list as a whole -----------------------------------------------------------


def fallback_plan() -> TrainingPlan:
    return lab_plan("llmjp3-172b", lr=1e-4, world_size=512, layouts=[
        Layout(dp=8, tp=8, pp=8, micro_batch=1, activation_checkpointing="none", name="fast-oom"),
        Layout(dp=1, tp=64, pp=8, micro_batch=1, name="bad-tp"),  # 96 heads % 64
        Layout(dp=8, tp=8, pp=8, micro_batch=1, activation_checkpointing="selective", name="selective"),
        Layout(dp=8, tp=8, pp=8, micro_batch=1, activation_checkpointing="full", name="full"),
    ])


def test_ordered_list_picks_the_first_valid_layout():
    plan = fallback_plan()
    report = preflight(plan)
    assert report.chosen_layout_index == 2
    assert errors(report.layout_issues[0], "layouts[0].memory")
    assert errors(report.layout_issues[1], "layouts[1].tp")
    assert report.layout_issues[2] == report.layout_issues[3] == []
    assert any(i.level == "warning" and "starting with layouts[2]" in i.why for i in report.issues)
    assert exit_code(report) == 0  # a valid layout exists and the optimizer is fine


def test_next_safer_layout_walks_the_valid_fallbacks():
    plan = fallback_plan()
    assert next_safer_layout(plan, 0) == 2  # skips the layout with a TP error
    assert next_safer_layout(plan, 2) == 3
    assert next_safer_layout(plan, 3) is None


def test_no_valid_layout_fails():
    plan = lab_plan(world_size=8, layouts=[Layout(dp=4, micro_batch=1), Layout(dp=8, tp=3, micro_batch=1)])
    report = preflight(plan)
    assert report.chosen_layout_index is None
    assert errors(report.issues, "layouts")
    assert exit_code(report) == 1


def test_list_level_warnings_duplicates_and_missing_fallback():
    plan = lab_plan(layouts=[FSDP8, replace(FSDP8, name="again")])
    report = preflight(plan)
    assert any(i.field == "layouts[1]" and "same layout" in i.why for i in warnings(report.issues))
    single = preflight(lab_plan())
    # a single layout is not itself a problem, but the missing fallback is pointed out
    assert [(i.level, i.field) for i in single.issues] == [("info", "layouts")]
    assert "no valid fallback" in single.issues[0].why
    plan = fallback_plan()
    growing = replace(plan, layouts=[plan.layouts[3], plan.layouts[2]])  # full AC, then selective
    infos = [i for i in preflight(growing).issues if i.level == "info"]
    assert any("more memory" in i.why for i in infos)


def test_empty_layout_list_is_an_error():
    report = preflight(lab_plan(layouts=[]))
    assert errors(report.issues, "layouts") and exit_code(report) == 1


# --- output --------------------------------------------------------------------------------


def test_format_report_has_one_line_per_finding_and_json_round_trips():
    plan = replace(fallback_plan(), optimizer=OptimizerPlan(lr=1e-4, **{**LAB_ADAMW, "eps": 1e-5}))
    report = preflight(plan)
    text = format_report(report)
    lines = text.splitlines()
    findings = report.all_issues()
    assert len(lines) == len(findings) + len(plan.layouts) + 1
    for issue, line in zip(findings, lines):
        assert line.startswith(issue.level.upper()) and issue.field in line and issue.value in line
        assert issue.fix in line
    assert "<- chosen" in lines[len(findings) + 2]
    assert lines[-1].startswith("FAIL")
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["chosen_layout_index"] == 2
    assert data["issues"][0]["field"] == "optimizer.eps"
    assert [lay["valid"] for lay in data["layouts"]] == [False, False, True, True]
    assert data["layouts"][2]["memory_gib"]["total_gib"] < 72


def test_preflight_thresholds_are_configurable():
    plan = lab_plan(optimizer=OptimizerPlan(lr=3e-4, **{**LAB_ADAMW, "eps": 1e-7}))
    strict = Preflight(Preflight.Config(eps_max=1e-8))
    assert errors(strict.check_optimizer(plan), "eps")
    assert not errors(check_optimizer(plan), "eps")


# --- plan_from_dict ------------------------------------------------------------------------

TOML = """
[training]
model = "llmjp3-172b"
world_size = 512
global_batch = 1024
seq_len = 4096
device = "H100"

[optimizer]
lr = 1e-4
eps = 1e-8
warmup_steps = 2000

[[layouts]]
name = "fast"
dp = 8
tp = 8
pp = 8
micro_batch = 1
activation_checkpointing = "none"

[[layouts]]
name = "safe"
dp = 8
tp = 8
pp = 8
micro_batch = 1
activation_checkpointing = "full"
"""


def base_dict() -> dict:
    return tomllib.loads(TOML)


def test_plan_from_toml():
    plan = plan_from_dict(base_dict())
    assert plan.model is ALL_SHAPES["llmjp3-172b"]
    assert plan.optimizer == OptimizerPlan(name="AdamW", lr=1e-4, eps=1e-8, beta1=0.9, beta2=0.95,
                                           weight_decay=0.1, warmup_steps=2000)
    assert plan.layouts[1] == Layout(name="safe", dp=8, tp=8, pp=8, cp=1, dp_shard=-1, micro_batch=1,
                                     activation_checkpointing="full")
    assert (plan.world_size, plan.global_batch, plan.seq_len, plan.device, plan.dtype) == (512, 1024, 4096, "H100", "bf16")
    report = preflight(plan)
    assert report.chosen_layout_index == 1 and exit_code(report) == 0


def test_plan_from_dict_reads_warmup_from_lr_scheduler():
    d = base_dict()
    del d["optimizer"]["warmup_steps"]
    d["lr_scheduler"] = {"warmup_steps": 500}
    assert plan_from_dict(d).optimizer.warmup_steps == 500


def test_plan_from_dict_keeps_a_bad_but_valid_eps_for_the_checks():
    d = base_dict()
    d["optimizer"]["eps"] = 1e-5
    assert exit_code(preflight(plan_from_dict(d))) == 1


def _set(d: dict, path: str, value) -> dict:
    section, key = path.split(".")
    target = d["layouts"][0] if section == "layouts" else d[section]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path,value,message", [
    ("training.model", "llmjp3-9000b", "training.model"),
    ("training.model", _DELETE, "training.model"),
    ("training.world_size", "8", "training.world_size"),
    ("training.world_size", 0, "training.world_size"),
    ("training.global_batch", True, "training.global_batch"),
    ("training.seq_len", _DELETE, "training.seq_len"),
    ("training.device", "TPU", "training.device"),
    ("training.dtype", "fp8", "training.dtype"),
    ("training.device_memory_gib", -1.0, "training.device_memory_gib"),
    ("training.steps", 100, "training.steps"),
    ("optimizer.lr", "3e-4", "optimizer.lr"),
    ("optimizer.lr", _DELETE, "optimizer.lr"),
    ("optimizer.lr", 0.0, "optimizer.lr"),
    ("optimizer.eps", float("nan"), "optimizer.eps"),
    ("optimizer.epsilon", 1e-8, "optimizer.epsilon"),
    ("optimizer.warmup_steps", _DELETE, "optimizer.warmup_steps"),
    ("optimizer.warmup_steps", 1.5, "optimizer.warmup_steps"),
    ("layouts.dp", _DELETE, "layouts[0].dp"),
    ("layouts.tp", 0, "layouts[0].tp"),
    ("layouts.dp_shard", 0, "layouts[0].dp_shard"),
    ("layouts.micro_batch", 1.0, "layouts[0].micro_batch"),
    ("layouts.activation_checkpointing", "some", "layouts[0].activation_checkpointing"),
    ("layouts.fsdp", True, "layouts[0].fsdp"),
])
def test_plan_from_dict_rejects_bad_fields_naming_them(path, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_from_dict(_set(base_dict(), path, value))


def test_plan_from_dict_rejects_bad_structure():
    for d, message in (({}, "training"), ({**base_dict(), "layouts": []}, "layouts"),
                       ({**base_dict(), "layouts": ["x"]}, r"layouts\[0\]"),
                       ({**base_dict(), "optimizer": 3}, "optimizer")):
        with pytest.raises(ValueError, match=message):
            plan_from_dict(d)
    cpu = base_dict()
    cpu["training"]["device"] = "cpu"
    with pytest.raises(ValueError, match="device_memory_gib"):
        plan_from_dict(cpu)
    cpu["training"]["device_memory_gib"] = 16
    assert plan_from_dict(cpu).device_memory_gib == 16.0
