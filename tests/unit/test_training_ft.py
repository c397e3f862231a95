"""`training.ft`'s start checks and data sharding (no training: the torchft path itself is proven by
tests/integration/test_torchft_drill.py)."""

from __future__ import annotations

import pytest
import torch
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

from training import ft


def test_off_by_default_and_unchecked_when_off(monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    ft.validate(ft.ReplicaConfig())  # off: nothing to check
    loader = HuggingFaceTextDataLoader.Config(dataset="c4_test")
    assert ft.sharded_dataloader_config(ft.ReplicaConfig(), loader) is loader


@pytest.mark.parametrize("kw,msg", [
    ({"group_size": 0}, "group_size must be >= 1"),
    ({"group_size": 2, "replica_id": 2}, r"replica_id must be in 0\.\.1"),
    ({"group_size": 2, "replica_id": -1}, r"replica_id must be in 0\.\.1"),
    ({"group_size": 2, "min_replica_size": 0}, "min_replica_size must be >= 1"),
    ({"group_size": 2, "process_group_timeout_ms": 0}, "timeouts must be positive"),
    ({"group_size": 2}, "needs a Lighthouse"),
])
def test_bad_replica_settings_are_refused_by_name(kw, msg, monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    with pytest.raises(ValueError, match=msg):
        ft.validate(ft.ReplicaConfig(enable=True, **kw))


def test_the_lighthouse_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:29510")
    ft.validate(ft.ReplicaConfig(enable=True, group_size=2, replica_id=1))


def test_each_group_reads_its_own_shard():
    loader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path="/data/x")
    cfg = ft.sharded_dataloader_config(ft.ReplicaConfig(enable=True, group_size=3, replica_id=2), loader)
    assert isinstance(cfg, ft.ShardedTextDataLoader.Config)
    assert (cfg.groups, cfg.group, cfg.dataset_path, cfg.dataset) == (3, 2, "/data/x", "c4_test")


@pytest.mark.parametrize("kind", sorted(ft.LEADING_DIRECTIVES))
def test_group_0_applies_a_leading_directive_and_leads_other_groups_refuse_it(kind):
    """Only replica group 0 hears the daemon: it applies a directive every group must share and then
    leads (the others heal from it at the next quorum, training/ft.py). A leading directive in any
    other group is refused before any trainer state is touched: a bare object is enough."""
    from types import SimpleNamespace

    from supervisor.protocol import Directive
    from training.trainer import SupervisedTrainer

    d = Directive(id="a1", kind=kind, scale=0.5, n=1, step=0, steps=10)
    other = SimpleNamespace(config=SimpleNamespace(fault_tolerance=ft.ReplicaConfig(enable=True, group_size=2,
                                                                                     replica_id=1)))
    with pytest.raises(ValueError, match="only group 0 takes directives"):
        SupervisedTrainer._execute(other, d)
    assert not hasattr(other, "_ft_lead_pending")
    g0 = SimpleNamespace(config=SimpleNamespace(fault_tolerance=ft.ReplicaConfig(enable=True, group_size=2)),
                         _ft_lead_pending=False, _execute_kind=lambda d: f"did {d.kind}")
    assert SupervisedTrainer._execute(g0, d) == f"did {kind}; the other replica groups heal from group 0 at the next step"
    assert g0._ft_lead_pending is True
    off = SimpleNamespace(config=SimpleNamespace(fault_tolerance=ft.ReplicaConfig(enable=False)),
                          _ft_lead_pending=False, _execute_kind=lambda d: "did")
    assert SupervisedTrainer._execute(off, d) == "did" and off._ft_lead_pending is False


def test_leading_makes_this_group_the_only_one_at_the_quorums_max_step():
    """`lead` puts this group's torchft step count one past a peer in step with it (the quorum then
    heals the peer from us), and keeps the committed-batch count."""
    from types import SimpleNamespace

    class Manager:
        def __init__(self):
            self.sd = {"step": 41, "batches_committed": 82}

        def current_step(self):
            return self.sd["step"]

        def batches_committed(self):
            return self.sd["batches_committed"]

        def load_state_dict(self, sd):
            self.sd = dict(sd)

    me = SimpleNamespace(manager=Manager(), leads=0)
    ft.ReplicaSync.lead(me)
    assert me.manager.sd == {"step": 42, "batches_committed": 82} and me.leads == 1


@pytest.mark.parametrize("groups,nproc", [(2, 1), (3, 2)])
def test_a_fault_rank_is_the_global_rank_across_replica_groups(groups, nproc):
    """In torchft mode every group's ranks are ranks 0..nproc-1 of their own torchrun; a fault spec's
    ``rank=`` is the global rank (group * nproc + local rank, the supervisor's numbering of rank exits
    and heartbeats), so ``crash@60:rank=1`` fires in exactly the group that holds global rank 1, and a
    job-wide fault (no rank=) in every rank of every group. Were the local rank used, rank=1 would
    never fire with one rank per group (the goodput bench's torchft row measured nothing)."""
    from training.faults import FaultPlan

    spec = "crash@60:rank=1,hang@210:rank=1:mode=stop,spike@110:lr=300:steps=3,nan@160:applied=1"
    fired = {}
    for g in range(groups):
        for local in range(nproc):
            cfg = ft.ReplicaConfig(enable=True, group_size=groups, replica_id=g)
            rank = ft.global_rank(cfg, local, nproc)
            assert rank == g * nproc + local
            fired[(g, local)] = sorted(f.label for f in FaultPlan(spec, rank, generation=1).faults)
    job_wide = ["nan@160", "spike@110"]
    owner = (1 // nproc, 1 % nproc)  # the (group, local rank) of global rank 1
    for where, labels in fired.items():
        assert labels == sorted(job_wide + (["crash@60", "hang@210"] if where == owner else [])), (where, labels)
    assert ft.global_rank(ft.ReplicaConfig(replica_id=1, group_size=2), 1, 2) == 1  # FT off: the rank itself


def test_only_global_rank_0_posts_step_records_every_rank_heartbeats(tmp_path):
    """Another replica group's local rank 0 (global rank 1 here) spools its own records and heartbeats
    the daemon with its global rank, but posts no step records or events: group 0's stream stays the
    run's. Real HTTP on loopback (a stand-in daemon that records what it is sent)."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from training.telemetry import TelemetryClient, TelemetryConfig

    seen: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            data = b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    clients = {r: TelemetryClient(TelemetryConfig(url=url, run_id="r", rank=r, heartbeat_s=0.1,
                                                  spool_path=str(tmp_path / f"g{r}" / "spool.jsonl")))
               for r in (0, 1)}
    try:
        for r, c in clients.items():
            c.last_step = 7
            c.record({"step": 7, "loss": 1.0 + r})
            c.event({"kind": "started", "step": 6})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                {b["rank"] for p, b in seen if p == "/v1/heartbeat"} >= {0, 1}
                and any(p == "/v1/telemetry" for p, _ in seen)):
            time.sleep(0.05)
    finally:
        for c in clients.values():
            c.close()
        server.shutdown()
    beats = {b["rank"]: b for p, b in seen if p == "/v1/heartbeat"}
    assert set(beats) == {0, 1} and beats[1]["step"] == 7
    posted = [rec for p, b in seen if p == "/v1/telemetry" for rec in b["records"]]
    assert posted and all(rec["loss"] == 1.0 for rec in posted), posted  # rank 0's only
    for r in (0, 1):  # both spools hold their own record and event
        lines = [json.loads(x) for x in (tmp_path / f"g{r}" / "spool.jsonl").read_text().splitlines()]
        assert [x.get("loss") for x in lines if "loss" in x] == [1.0 + r] and any(x.get("kind") == "started" for x in lines)


def test_a_resent_refused_directive_is_refused_again_not_acked_as_applied():
    """The daemon resends a directive until it hears back; a refusal (here: a directive reaching a
    torchft group other than 0) answered to a
    resend as "already applied, ok" told the goodput bench a hot rollback happened that never did."""
    from types import SimpleNamespace

    from training.trainer import SupervisedTrainer

    acks = []
    me = SimpleNamespace(config=SimpleNamespace(fault_tolerance=ft.ReplicaConfig(enable=True, group_size=2,
                                                                                  replica_id=1)),
                         _applied={}, _ack=lambda did, kind, ok, detail, seconds=None: acks.append((did, ok, detail)))
    me._execute = lambda d: SupervisedTrainer._execute(me, d)
    raw = {"id": "a2", "kind": "rollback", "step": 48, "skip_batches": 18}
    SupervisedTrainer._apply_one(me, raw)
    SupervisedTrainer._apply_one(me, raw)
    assert [(did, ok) for did, ok, _ in acks] == [("a2", False), ("a2", False)], acks
    assert acks[1][2].startswith("already refused: rollback reached replica group 1")


def test_a_heal_with_no_checkpoint_rewinds_the_group_s_data_to_its_start():
    """`SupervisedTrainer.rewind_data` when the group has no checkpoint at or before the leader's
    step: the dataloader goes back to the state captured before the first batch, so the heal's
    drain replays this group's shard from its first batch. A loader that ignored that state (a
    stateful loader restored from a pre-iteration snapshot) would drain from where it was and
    train every later step on other samples than an unbroken run. Real tokenizer and corpus; the
    trainer is a bare object (no model is needed for the data path)."""
    import copy
    from types import SimpleNamespace

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from training import assets
    from training.trainer import SupervisedTrainer

    a = assets.ensure_assets()
    tok = HuggingFaceTokenizer(tokenizer_path=str(a.tokenizer_dir))
    cfg = ft.sharded_dataloader_config(ft.ReplicaConfig(enable=True, group_size=2, replica_id=1),
                                       HuggingFaceTextDataLoader.Config(dataset="c4_test",
                                                                        dataset_path=str(a.corpus_dir)))

    def build():
        return ft.ShardedTextDataLoader(cfg, dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=64,
                                        local_batch_size=2)

    first = [x["input"].clone() for x, _ in zip((b[0] for b in build()), range(3))]
    dl = build()
    t = SimpleNamespace(checkpointer=SimpleNamespace(enable=False, folder="/nonexistent"), dataloader=dl,
                        _data_origin=copy.deepcopy(dl.state_dict()), batches_consumed=0)
    t._raw_batches = lambda: iter(dl)
    it = iter(dl)
    for _ in range(5):
        next(it)
    t.batches_consumed = 5
    assert SupervisedTrainer.rewind_data(t, loaded_step=4) == "the start of the data"
    assert t.batches_consumed == 0
    again = [x["input"] for x, _ in zip((b[0] for b in t.batches), range(3))]
    assert all(torch.equal(p, q) for p, q in zip(first, again)) and len(again) == 3
    assert not torch.equal(first[0], first[1])  # the comparison can tell batches apart
