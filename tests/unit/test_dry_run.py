"""A dry run changes nothing: for every command, the checkpoint folder, the quarantine and the
journal (all but the one audit row the dry run itself writes) are byte-identical before and after.

The fixture's catalog holds a corrupt checkpoint (step-25, a truncated shard): a resume for real
sets it aside, so a dry-run resume that did the same would be caught here. Real Supervisor, real
journal, real FastAPI app; the generation is the fixtures' stand-in process (no trainer needed)."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from supervisor.api import build_app
from tests.control_fixtures import make_sup, make_tokens


def _files(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(sup) -> tuple[dict, list[str], int]:
    """(checkpoint + quarantine files by content, the journal without the audit table, audit rows)."""
    files = {"checkpoint": _files(sup.workdir / "checkpoint"), "quarantine": _files(sup.workdir / "quarantine")}
    con = sqlite3.connect(str(sup.settings.journal_path))
    try:
        dump = [line for line in con.iterdump() if 'INSERT INTO "commands"' not in line]
        audit = con.execute("SELECT COUNT(*) FROM commands").fetchone()[0]
    finally:
        con.close()
    return files, dump, audit


RUNNING = [
    ("commands/rollback", {"to_step": 20, "skip_batches": 3, "lr_scale": 0.5, "ramp_steps": 10}),
    ("commands/pause", {}),
    ("commands/reshard", {"ranks": 1}),
    ("commands/lr", {"scale": 0.5, "ramp_steps": 5}),
    ("commands/skip-data", {"batches": 4}),
    ("commands/checkpoint-now", {}),
    ("commands/decay-now", {"steps": 10}),
    ("commands/extend", {"steps": 5000}),
    ("policy", {"mode": "advise"}),
]


@pytest.fixture
def env(tmp_path):
    tokens = make_tokens(tmp_path)
    sup = make_sup(tmp_path, tokens)
    with TestClient(build_app(sup), base_url="http://127.0.0.1") as client:
        yield sup, client, {"Authorization": f"Bearer {tokens['admin']}"}
    sup.journal.close()


def _dry(client, headers, path, body):
    r = client.post(f"/v1/{path}", json={**body, "reason": "what would happen", "dry_run": True}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["dry_run"] is True and r.json()["message"].startswith("dry run: would")
    return r.json()


@pytest.mark.parametrize("path, body", RUNNING, ids=[p for p, _ in RUNNING])
def test_a_dry_run_on_a_running_run_changes_nothing(env, path, body):
    sup, client, headers = env
    files, journal, audit = snapshot(sup)
    _dry(client, headers, path, body)
    after_files, after_journal, after_audit = snapshot(sup)
    assert after_files == files
    assert after_journal == journal
    assert after_audit == audit + 1  # the dry run is audited, and that is all it wrote
    assert sup.action is None and sup.pending == {}


def test_a_dry_run_resume_sets_no_corrupt_checkpoint_aside(env):
    sup, client, headers = env
    sup.gen, sup.state = None, "paused"
    assert "step-25" in {p.name for p in (sup.workdir / "checkpoint").iterdir()}  # corrupt, still in place
    files, journal, audit = snapshot(sup)
    plan = _dry(client, headers, "commands/resume", {})["plan"]
    assert plan["load_step"] == 30  # the newest valid one; the corrupt step-25 is skipped, not moved
    assert snapshot(sup) == (files, journal, audit + 1)
    # the real resume does set it aside: what the dry run must not do is observable
    r = client.post("/v1/commands/resume", json={"reason": "go"}, headers=headers)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while "step-25" in {p.name for p in (sup.workdir / "checkpoint").iterdir()} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (sup.workdir / "checkpoint" / "step-25").exists()
    assert any(p.name.startswith("step-25.corrupt") for p in (sup.workdir / "quarantine").iterdir())


def test_a_dry_run_rollback_names_the_skip_an_earlier_rollback_carries(env):
    """The plan is what would happen: a load of step-20 after a generation that started from it and
    skipped 7 batches skips them again (supervisor/data_lineage.py), and the plan says so."""
    sup, client, headers = env
    plain = _dry(client, headers, "commands/rollback", {"to_step": 20, "skip_batches": 3})
    assert (plain["plan"]["carried_skip"], plain["plan"]["batches_skipped"]) == (0, 3)
    assert "skipped again" not in plain["message"]
    sup.journal.record_generation_start(generation=1, run_id="t", load_step=20, skip_batches=7)
    out = _dry(client, headers, "commands/rollback", {"to_step": 20, "skip_batches": 3})
    assert (out["plan"]["skip_batches"], out["plan"]["carried_skip"], out["plan"]["batches_skipped"]) == (3, 7, 10)
    assert "skip 3 batches (+7 an earlier rollback skipped after step 20, skipped again)" in out["message"]
