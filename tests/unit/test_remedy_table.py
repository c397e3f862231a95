"""Every action the policy can emit has a remedy, and the remedy does what the journal says.

Real parts: the Journal (SQLite on disk), the checkpoint Catalog/Ledger over real DCP folders,
the DirectiveChannel, Pager, RunStatus, DetectorSuite, Metrics and Generations, and the settings'
real preflight for the layout fallback. Stand-in: the launcher records the LaunchSpec it is
asked to start instead of running torchrun (starting real ranks is what the OOM drill in
tests/integration/test_decision_drills.py covers); its generations are "alive" until stopped.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from supervisor import log as slog
from supervisor.actions import ActiveAction, LIGHT_ACTIONS
from supervisor.checkpoints import Catalog
from supervisor.detect.findings import OOM, SLOW_RECOVERY, Finding
from supervisor.detect.suite import DetectorSuite
from supervisor.directives import DirectiveChannel
from supervisor.generations import Generations
from supervisor.journal import Journal
from supervisor.ledger import CheckpointLedger
from supervisor.metrics import Metrics
from supervisor.pager import Pager
from supervisor.policy import (ACTIONS, COOL_LR, EXCLUDE_NODE, NONE, RESTART, REWARM_LR, ROLLBACK, ROLLBACK_LR_DOWN,
                               Decision, History, Policy, RunState)
from supervisor.remedies import Remedies
from supervisor.run_plan import LayoutFallback, trainer_flags
from supervisor.run_state import RunStatus
from supervisor.settings import Settings

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dcp" / "step-10"


@dataclass
class RecordedGeneration:
    generation: int
    spec: dict
    pid: int = 4242
    rank_pids: dict = field(default_factory=dict)
    exited: int | None = None
    stopping: bool = False
    exit_expected: bool = False

    def alive(self) -> bool:
        return self.exited is None

    def poll(self) -> list:
        return []

    def note_rank_pid(self, rank, pid) -> None:
        self.rank_pids[rank] = pid

    def stop(self, grace_s) -> None:
        self.exited = -15

    def dump_stacks(self) -> str:
        return "stacks"


class RecordingLauncher:
    def __init__(self) -> None:
        self.specs: list[dict] = []

    def start(self, spec) -> RecordedGeneration:
        self.specs.append(spec)
        return RecordedGeneration(spec["generation"], spec)

    def adopt(self, spec, pid, rank_pids):
        return None


class Hooks:
    def before_launch(self) -> None: ...
    def on_launch(self, *a) -> None: ...
    def on_stop(self) -> None: ...


LAYOUTS = [
    {"dp": 2, "micro_batch": 4, "activation_checkpointing": "none", "name": "fast"},
    {"dp": 2, "tp": 3, "micro_batch": 4, "activation_checkpointing": "none", "name": "broken tp"},  # tp 3 ∤ world 2
    {"dp": 1, "tp": 2, "micro_batch": 4, "activation_checkpointing": "none", "name": "safer"},
]


def build(tmp_path: Path, layouts=LAYOUTS):
    settings = Settings.load(run={"workdir": str(tmp_path), "preset": "tiny", "nproc_per_node": 2},
                             preflight={"layouts": layouts, "device_memory_gib": 16})
    for step in (10, 20):
        shutil.copytree(FIXTURE, tmp_path / "checkpoint" / f"step-{step}")
    journal = Journal.open(tmp_path / "journal.sqlite")
    log, metrics = slog.get(), Metrics()
    launcher = RecordingLauncher()

    def spec(generation, *, load_step, skip_batches, lr_scale, ramp_steps=0, layout_index=None):
        return {"generation": generation, "load_step": load_step, "skip_batches": skip_batches, "lr_scale": lr_scale,
                "flags": trainer_flags(settings, layout_index), "nproc": 2}

    class Spec(dict):
        nproc = 2

        def command(self):
            return self["flags"]

    gens = Generations(launcher, journal, log, metrics, spec=lambda *a, **k: Spec(spec(*a, **k)),
                       stop_grace_s=0.1, run_id="t", hooks=Hooks())
    status = RunStatus(journal, metrics, log, total_steps=100)
    pager = Pager("", journal, metrics, log, context=lambda: {})
    ledger = CheckpointLedger(Catalog(tmp_path / "checkpoint", tmp_path / "quarantine"), journal, log)
    remedies = Remedies(generations=gens, ledger=ledger, directives=DirectiveChannel(journal, tmp_path / "spool.jsonl"),
                        pager=pager, journal=journal, status=status, suite=DetectorSuite(), metrics=metrics,
                        log=log, step_times=[0.1], ranks=2, directive_timeout_s=0.2, poll_s=0.01,
                        layouts=LayoutFallback(settings))
    asyncio.run(gens.launch(load_step=None, skip_batches=0, lr_scale=1.0, reason="first"))
    return remedies, launcher, journal


def action(kind: str, decision: Decision, finding: Finding | None = None, id: int = 1) -> ActiveAction:
    params = {k: v for k, v in decision.to_dict().items() if k != "reason"}
    return ActiveAction(id, kind, params, finding, decision)


def test_every_policy_action_has_a_remedy(tmp_path):
    remedies, _, _ = build(tmp_path)
    for kind in ACTIONS:
        if kind == NONE:
            continue  # "no rule": nothing to carry out, never journaled as an action
        assert kind in remedies.table or kind in remedies.light_table, f"no remedy for policy action {kind!r}"
        assert (kind in remedies.light_table) == (kind in LIGHT_ACTIONS), kind


def oom(step: int, t: float) -> Finding:
    return Finding(kind=OOM, step=step, severity="critical", wall_time=t, rank=1,
                   evidence={"exitcode": 1, "host": "node-a"})


def test_repeated_oom_restarts_on_the_next_preflight_valid_layout(tmp_path):
    remedies, launcher, journal = build(tmp_path)
    policy, history = Policy(), History()
    state = RunState(current_step=25, generation=0, valid_checkpoints=[10, 20])
    first = policy.decide(oom(25, 100.0), state, history)
    history.record(oom(25, 100.0), first)
    second = policy.decide(oom(27, 200.0), state, history)
    assert second.next_layout and "next safer layout" in second.reason
    out = asyncio.run(remedies.carry_out(action(RESTART, second)))
    # layouts[1] fails preflight (tp 3 does not divide 2 ranks): the fallback is layouts[2]
    assert out["layout"].startswith("layouts[2] safer")
    flags = launcher.specs[-1]["flags"]
    assert flags[flags.index("--parallelism.tensor_parallel_degree") + 1] == "2"
    assert flags[flags.index("--parallelism.data_parallel_shard_degree") + 1] == "1"
    row = journal.last_generation()
    assert row["layout"]["label"].startswith("layouts[2] safer")
    # the next restart stays on it (the layout is sticky) and a further fallback has none left
    out2 = asyncio.run(remedies.carry_out(action(RESTART, second, id=2)))
    assert out2["layout"].startswith("unchanged") and journal.get_meta("last_page")
    assert launcher.specs[-1]["flags"] == flags


def test_a_later_load_of_an_older_checkpoint_skips_the_bad_data_again(tmp_path):
    """A rollback's data skip is counted from its checkpoint's data position; loading that checkpoint
    (or an older one) again must repeat it, or the bad batch comes back (supervisor/data_lineage.py).
    The trainer's hot rollback does not answer here (no trainer), so every rollback goes cold."""
    remedies, launcher, journal = build(tmp_path)
    asyncio.run(remedies.carry_out(action(ROLLBACK, Decision(ROLLBACK, "spike", 3, target_step=20, skip_batches=30))))
    assert (launcher.specs[-1]["load_step"], launcher.specs[-1]["skip_batches"]) == (20, 30)
    out = asyncio.run(remedies.carry_out(action(RESTART, Decision(RESTART, "rank died", 3, target_step=20), id=2)))
    assert (launcher.specs[-1]["load_step"], launcher.specs[-1]["skip_batches"], out["carried_skip"]) == (20, 30, 30)
    out = asyncio.run(remedies.carry_out(
        action(ROLLBACK, Decision(ROLLBACK, "nan batch", 3, target_step=20, skip_batches=10), id=3)))
    assert (out["skip_batches"], out["skip_window"], out["carried_skip"]) == (40, 10, 30)
    assert launcher.specs[-1]["skip_batches"] == 40
    # a decided target of 15 loads checkpoint 10: the window grows by the 5 steps between them
    out = asyncio.run(remedies.carry_out(
        action(ROLLBACK, Decision(ROLLBACK, "again", 3, target_step=15, skip_batches=10), id=4)))
    assert (out["target_step"], out["skip_window"], out["carried_skip"], out["skip_batches"]) == (10, 15, 40, 55)
    assert [g["skip_batches"] for g in sorted(journal.generations(), key=lambda g: g["id"])] == [0, 30, 30, 40, 55]

    # a rollback resumed by a restarted daemon (its intent journaled, its first attempt's generation
    # launched) counts the same loads as the first attempt, not that generation's skip too
    d = Decision(ROLLBACK, "resumed", 3, target_step=10, skip_batches=4)
    aid = journal.action_intent(ROLLBACK, {k: v for k, v in d.to_dict().items() if k != "reason"}, actor="policy").id
    first = asyncio.run(remedies.carry_out(action(ROLLBACK, d, id=aid)))
    again = asyncio.run(remedies.carry_out(action(ROLLBACK, d, id=aid)))
    assert first["skip_batches"] == again["skip_batches"] == 4 + 55


def test_next_layout_without_layouts_says_unchanged_and_pages(tmp_path):
    remedies, launcher, journal = build(tmp_path, layouts=[])
    d = Decision(RESTART, "oom twice", 4, target_step=20, next_layout=True)
    out = asyncio.run(remedies.carry_out(action(RESTART, d)))
    assert out["layout"].startswith("unchanged") and "layout" in journal.get_meta("last_page")["reason"]
    assert "--parallelism.tensor_parallel_degree" not in launcher.specs[-1]["flags"]


def test_exclude_node_on_one_node_pages_naming_the_node_and_restarts(tmp_path):
    remedies, launcher, journal = build(tmp_path)
    d = Decision(EXCLUDE_NODE, "crash 2 on node-a", 4, target_step=20, node="node-a")
    out = asyncio.run(remedies.carry_out(action(EXCLUDE_NODE, d)))
    assert out["excluded"] is False and out["node"] == "node-a"
    assert journal.get_meta("last_page")["node"] == "node-a"
    assert len(launcher.specs) == 2 and launcher.specs[-1]["load_step"] == 20


def test_cool_and_rewarm_send_set_lr_scale_and_change_the_run_scale(tmp_path):
    remedies, _, _ = build(tmp_path)
    f = Finding(kind=SLOW_RECOVERY, step=50, severity="warning", wall_time=1.0,
                evidence={"onset_step": 45, "patience_steps": 5, "level": 4.0, "band": 3.3, "median": 3.0,
                          "worsening_tolerance": 0.05, "recovery_steps": 40})
    d = Policy().decide(f, RunState(current_step=50, generation=0), History())
    assert d.action == COOL_LR and d.lr_scale == 0.5
    out = remedies.light(action(COOL_LR, d, f))
    sent = remedies.directives.pending[out["directive"]]
    assert (sent.kind, sent.scale, sent.ramp_steps) == ("set_lr_scale", 0.5, 0)
    assert remedies.status.lr_scale == 0.5
    back = Decision(REWARM_LR, "recovered", 2, lr_scale=1.0, ramp_steps=50)
    out = remedies.light(action(REWARM_LR, back, f, id=2))
    sent = remedies.directives.pending[out["directive"]]
    assert (sent.scale, sent.ramp_steps) == (1.0, 50) and remedies.status.lr_scale == 1.0


def test_unknown_action_is_refused_with_its_name(tmp_path):
    remedies, _, _ = build(tmp_path)
    with pytest.raises(ValueError, match="no remedy for action 'teleport'"):
        asyncio.run(remedies.carry_out(ActiveAction(9, "teleport", {})))


def test_grow_restarts_on_the_returned_nodes_from_the_newest_checkpoint_and_a_resumed_one_is_done_once(tmp_path):
    remedies, launcher, journal = build(tmp_path)
    remedies.generations.current.nodes = ("node-a",)  # the run shrank to node-a; node-b returned
    remedies.status.last_step = 23
    start = launcher.start

    def start_on_the_live_nodes(spec):  # what AgentLauncher does: every live, non-excluded node
        g = start(spec)
        g.nodes = ("node-a", "node-b")
        return g

    launcher.start = start_on_the_live_nodes
    plan = {"nodes_from": ["node-a"], "nodes_to": ["node-a", "node-b"], "returned": ["node-b"], "checkpoint": 20,
            "reason": "node-b returned"}
    first = remedies.generations.current
    out = asyncio.run(remedies.carry_out(ActiveAction(1, "grow", dict(plan))))
    assert first.exited is not None, "the shrunk generation was not stopped"
    assert (out["nodes_to"], out["returned"], out["load_step"], out["lost_steps"]) == \
        (["node-a", "node-b"], ["node-b"], 20, 3)
    assert len(launcher.specs) == 2 and launcher.specs[-1]["load_step"] == 20
    assert journal.last_generation()["layout"]["nodes"] == ["node-a", "node-b"]
    # resumed after a daemon crash that came after the launch: nothing is stopped or started again
    again = asyncio.run(remedies.carry_out(ActiveAction(1, "grow", dict(plan))))
    assert "already runs on ['node-a', 'node-b']" in again["note"] and len(launcher.specs) == 2


class ReplicaGroupsStandIn:
    """torchft mode's generation, as far as the group restart needs it (supervisor/launch/torchft.py's
    ReplicaGroups relaunches real torchruns: tests/integration/test_torchft_drill.py)."""

    def __init__(self) -> None:
        self.groups, self.nproc, self.restarted = [object(), object()], 1, []
        self.reconfigure_s = 5.0  # Lighthouse heartbeat timeout 3 s + join timeout 2 s

    def group_of(self, rank):
        return rank // self.nproc

    def ranks_of(self, group):
        return [group]

    def group_alive(self, group):
        return True

    def restart_group(self, group, reason):
        self.restarted.append(group)
        return {"replica_group": group, "restarts": len(self.restarted), "pid": 99, "recent_failures": 1,
                "reason": reason}


def test_a_group_restart_gives_the_survivors_torchft_s_reconfiguration_time(tmp_path):
    """CI failure (2026-12-02, test_daemon_relaunches_only_the_dead_replica_group): the survivors stall
    until the Lighthouse drops the dead group (its heartbeat timeout), but their step clock had run
    since their last step, so 3.0 s after it - 0.2 s after the relaunch - the stall detector called it
    a hang and restarted the whole job. The group restart now announces that pause."""
    import time as _time

    from supervisor.detect.findings import DEAD_RANK, HANG
    from supervisor.protocol import StepRecord

    remedies, _, _ = build(tmp_path)
    suite = remedies._suite
    groups = ReplicaGroupsStandIn()
    remedies.generations.current = groups
    t0 = _time.time() - 3.0  # the survivors' last steps: 0.2 s apart, the last one 3 s ago
    suite.reset_generation(0, t0 - 10)
    for i in range(1, 21):
        suite.observe_record(StepRecord(run_id="t", generation=0, step=i, loss=2.0, grad_norm=1.0, lr=1e-3,
                                        lr_scale=1.0, tokens_per_s=1.0, step_seconds=0.2,
                                        wall_time=t0 - (20 - i) * 0.2))
    [dead] = suite.observe_exit(1, -9, t0 + 0.1, 20)
    assert dead.kind == DEAD_RANK
    out = asyncio.run(remedies.carry_out(action(RESTART, Decision(RESTART, "dead", 3), dead)))
    assert out["group_restart"] and groups.restarted == [1]
    now = _time.time()
    assert [f.kind for f in suite.tick(now + 4.0)] == []  # torchft reconfiguring: no hang
    assert HANG in [f.kind for f in suite.tick(now + groups.reconfigure_s + 3.5)]  # still stuck after it: a hang
