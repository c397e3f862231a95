"""Grow-back planning (supervisor/grow.py): pure, fed times and steps; and the registry's live_since."""

from __future__ import annotations

from supervisor.grow import GrowBack, PastGrow
from supervisor.nodes import NodeRegistry
from supervisor.protocol import NodeReport

A, AB = ("node-a",), ("node-a", "node-b")


def tick(g: GrowBack, *, now, step, ckpt, live, have=A, past=(), expected=AB, final=100):
    return g.tick(now=now, step=step, newest_checkpoint=ckpt, in_generation=have, live_since=live,
                  expected=expected, past=list(past), final_step=final)


def test_a_returned_node_grows_back_at_the_first_checkpoint_after_it_settled():
    g = GrowBack(GrowBack.Config(settle_s=10.0))
    live = {"node-a": 0.0, "node-b": 100.0}
    # settling: no plan even though a checkpoint is newer than the step
    assert tick(g, now=105.0, step=30, ckpt=30, live=live) is None
    assert g.view()["node-b"].startswith("settling: live 5s of 10s")
    # settled at step 33: the newest checkpoint (30) predates readiness, so it waits
    assert tick(g, now=110.0, step=33, ckpt=30, live=live) is None
    assert "first checkpoint after step 33" in g.view()["node-b"]
    assert tick(g, now=115.0, step=39, ckpt=30, live=live) is None
    assert tick(g, now=116.0, step=40, ckpt=40, live=live, final=40) is None  # the run ends there anyway
    plan = tick(g, now=116.0, step=40, ckpt=40, live=live)
    assert plan is not None and plan.nodes_from == A and plan.nodes_to == AB and plan.returned == ("node-b",)
    assert plan.checkpoint == 40 and plan.ready_step == 33 and "node-b returned" in plan.reason
    g.started(plan)
    assert g.view() == {}


def test_a_node_lost_again_while_settling_settles_again():
    g = GrowBack(GrowBack.Config(settle_s=10.0))
    assert tick(g, now=115.0, step=33, ckpt=30, live={"node-a": 0.0, "node-b": 100.0}) is None  # ready at 33
    assert tick(g, now=116.0, step=34, ckpt=30, live={"node-a": 0.0}) is None  # gone again
    assert g.view() == {}
    # back once more: a fresh live_since, so it settles again before any plan
    assert tick(g, now=120.0, step=40, ckpt=40, live={"node-a": 0.0, "node-b": 118.0}) is None
    assert g.view()["node-b"].startswith("settling")


def test_a_flapping_node_is_not_grown_back_past_its_budget_until_the_window_passes():
    g = GrowBack(GrowBack.Config(settle_s=0.0, max_per_node=2, window_s=1000.0))
    live = {"node-a": 0.0, "node-b": 500.0}
    past = [PastGrow(100.0, ("node-b",)), PastGrow(300.0, ("node-b",)), PastGrow(350.0, ("node-c",))]
    assert tick(g, now=600.0, step=10, ckpt=20, live=live, past=past) is None
    assert "already 2 time(s)" in g.view()["node-b"] and "grow_max_per_node = 2" in g.view()["node-b"]
    # the first grow falls out of the window: one left in it, so the node may come back (ready at 21)
    assert tick(g, now=1101.0, step=21, ckpt=20, live=live, past=past) is None
    assert tick(g, now=1102.0, step=30, ckpt=30, live=live, past=past).returned == ("node-b",)


def test_nothing_to_grow_when_off_or_when_the_node_is_not_expected():
    off = GrowBack(GrowBack.Config(enabled=False, settle_s=0.0))
    assert tick(off, now=10.0, step=30, ckpt=40, live={"node-a": 0.0, "node-b": 1.0}) is None
    assert "grow-back is off" in off.view()["node-b"]
    g = GrowBack(GrowBack.Config(settle_s=0.0))
    # node-c is live but not one of launch.agents.nodes; node-b is in the generation already
    assert tick(g, now=10.0, step=30, ckpt=40, live={"node-a": 0.0, "node-b": 0.0, "node-c": 0.0}, have=AB) is None
    assert g.view() == {}
    # with no expected list, any live node counts
    assert tick(g, now=10.0, step=30, ckpt=30, live={"node-a": 0.0, "node-c": 0.0}, expected=()) is None
    assert tick(g, now=11.0, step=41, ckpt=41, live={"node-a": 0.0, "node-c": 0.0}, expected=()).nodes_to == \
        ("node-a", "node-c")


def _report(agent: str) -> NodeReport:
    return NodeReport(run_id="r", agent_id=agent, node=agent, wall_time=0.0)


def test_registry_live_since_restarts_when_an_agent_returns_after_being_lost():
    clock = [0.0]
    reg = NodeRegistry(NodeRegistry.Config(lost_after_s=3.0), clock=lambda: clock[0], wall=lambda: 1000 + clock[0])
    reg.ingest(_report("node-b"))
    assert reg.live_since() == {"node-b": 1000.0}
    clock[0] = 2.0
    reg.ingest(_report("node-b"))
    assert reg.live_since() == {"node-b": 1000.0}  # still live: unchanged
    clock[0] = 10.0
    assert reg.live_since() == {}  # lost
    reg.ingest(_report("node-b"))
    assert reg.live_since() == {"node-b": 1010.0}  # back: it settles from now
    reg.exclude("node-b")
    assert reg.live_since() == {}  # excluded nodes are never desired


def test_status_shows_why_a_returned_node_is_not_in_the_run_yet():
    import time

    from rich.console import Console

    from supervisor.oncall import render_status

    g = GrowBack(GrowBack.Config(settle_s=30.0))
    tick(g, now=110.0, step=33, ckpt=30, live={"node-a": 0.0, "node-b": 100.0})
    st = {"schema": 1, "run_id": "r", "state": "running", "mode": "auto", "generation": 2, "step": 33,
          "total_steps": 60, "loss": 2.0, "grad_norm": 0.9, "tokens_per_s": 1.0, "lr": 1e-4, "lr_scale": 1.0,
          "last_known_good": 30, "newest_checkpoint": 30, "action": None, "policy_now": "watching",
          "open_incidents": [], "proposals": 0, "pending_directives": [], "trainer_pids": {}, "updated_at": time.time(),
          "nodes": {"excluded": [], "live": ["node-a", "node-b"], "in_generation": ["node-a"], "returning": g.view()}}
    con = Console(width=100, record=True, color_system=None)
    con.print(render_status(st))
    assert "node-b: settling: live 10s of 30s" in con.export_text()
