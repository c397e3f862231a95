"""Shared pieces for control-plane tests: a real Supervisor (journal, catalog with real DCP
checkpoints copied from tests/fixtures/dcp) whose generation is a stand-in process object."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from supervisor.api import build_app
from supervisor.auth import add_token
from supervisor.daemon import Supervisor
from supervisor.settings import Settings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dcp" / "step-10"


class FakeGen:
    """Stands in for a launched generation (supervisor.launch.local.Generation)."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.exited = None
        self.stopping = False
        self.exit_expected = False
        self.rank_pids: dict[int, int] = {0: 101, 1: 102}
        self.pid = 100

    def alive(self) -> bool:
        return self.exited is None

    def stop(self, grace) -> None:
        if self.exited is None:
            self.exited = -15

    def poll(self):
        return []

    def note_rank_pid(self, rank, pid):
        self.rank_pids[rank] = pid

    def owns(self, pid):  # a fake generation has no process tree: every pid is "ours"
        return True


class FakeLauncher:
    def __init__(self) -> None:
        self.specs = []

    def start(self, spec):
        self.specs.append(spec)
        return FakeGen(spec.generation)


def make_checkpoint(root: Path, step: int) -> Path:
    dst = root / f"step-{step}"
    shutil.copytree(FIXTURE, dst)
    return dst


def make_tokens(tmp_path):
    f = tmp_path / "tokens.jsonl"
    return {"file": f, "admin": add_token(f, "root", "admin"), "operator": add_token(f, "alice", "operator"),
            "viewer": add_token(f, "vic", "viewer")}


def make_sup(tmp_path, tokens, logger=None):
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t"},
                      server={"port": 0, "token_file": str(tokens["file"])},
                      launch={"directive_timeout_s": 5.0, "stop_grace_s": 0.0})
    sup = Supervisor(s, logger=logger)
    ckroot = sup.workdir / "checkpoint"
    for step in (10, 20, 30):
        make_checkpoint(ckroot, step)
    bad = make_checkpoint(ckroot, 25)
    (bad / "__1_0.distcp").write_bytes(b"x")  # a truncated shard: corrupt
    q = make_checkpoint(sup.workdir / "quarantine", 35)
    q.rename(sup.workdir / "quarantine" / "step-35.corrupt")
    (sup.workdir / "quarantine" / "step-35.corrupt.reason.json").write_text(json.dumps({"reason": "corrupt: torn"}))
    sup.generations.launcher = FakeLauncher()
    sup.generations.id = 0
    sup.journal.record_generation_start(generation=0, run_id="t")
    sup.generations.current = FakeGen(0)
    sup.status.state = "running"
    sup.status.last_step = 33
    return sup


# Fixtures (import them by name into a test module): a token file, a Supervisor, its app's client.
@pytest.fixture
def tokens(tmp_path):
    return make_tokens(tmp_path)


@pytest.fixture
def sup(tmp_path, tokens):
    sup = make_sup(tmp_path, tokens)
    yield sup
    sup.journal.close()


@pytest.fixture
def client(sup):
    with TestClient(build_app(sup), base_url="http://127.0.0.1") as c:
        yield c
