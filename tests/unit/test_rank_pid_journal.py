"""Rank pids are journaled in batches, not one journal write per rank's first heartbeat (at
16,384 ranks each write carried every pid so far: O(ranks^2) at every start; bench/ingest.py).
A real Supervisor, journal and `Generations`; the running generation is a stand-in that owns
1,000 pids (starting 1,000 trainer processes is not what this checks; the launcher's own
ownership checks are tested in test_launcher.py)."""

from __future__ import annotations

import pytest

from supervisor.daemon import Supervisor
from supervisor.settings import Settings

WORLD = 1000


class ThousandRanks:
    """A running generation of WORLD ranks with pids 5000.. (what a launcher reports owning)."""

    generation, pid, exited, stopping, exit_expected, world_size = 0, 4999, None, False, False, WORLD

    def __init__(self) -> None:
        self.rank_pids: dict[int, int] = {}

    def owns(self, pid: int) -> bool:
        return 5000 <= pid < 5000 + WORLD

    def note_rank_pid(self, rank: int, pid: int) -> None:
        self.rank_pids.setdefault(rank, pid)


@pytest.fixture
def sup(tmp_path):
    s = Settings.load(run={"workdir": str(tmp_path / "run"), "run_id": "t", "nproc_per_node": 8},
                      server={"port": 0})
    sup = Supervisor(s)
    gens = sup.generations
    gens.current, gens.id = ThousandRanks(), 0
    sup.journal.record_generation_start(generation=0, run_id="t", load_step=0, skip_batches=0, lr_scale=1.0, layout={})
    yield sup
    sup.journal.close()


def test_pids_are_journaled_in_batches_and_completely(sup, monkeypatch):
    gens, writes = sup.generations, []
    real = sup.journal.set_generation_pids
    monkeypatch.setattr(sup.journal, "set_generation_pids", lambda g, pids: (writes.append(len(pids)), real(g, pids)))
    assert gens.note_rank_pid(0, 5000, ranks=8) is None
    assert writes == [1]  # the first pid is journaled at once
    for r in range(1, WORLD):
        assert gens.note_rank_pid(r, 5000 + r, ranks=8) is None
    assert len(writes) <= 3 and writes[-1] == WORLD  # the complete world, in a few writes
    meta = sup.journal.get_meta("generation_0")
    assert {int(k): v for k, v in meta["rank_pids"].items()} == {r: 5000 + r for r in range(WORLD)}


def test_a_pid_is_one_ranks_only_and_a_straggler_is_journaled_by_the_reconcile_tick(sup, monkeypatch):
    gens = sup.generations
    assert gens.note_rank_pid(0, 5000, ranks=8) is None
    assert "not a trainer process" in gens.note_rank_pid(1, 5000, ranks=8)  # already rank 0's
    assert gens.note_rank_pid(1, 5001, ranks=8) is None  # within the second: not yet journaled
    assert sup.journal.get_meta("generation_0")["rank_pids"] == {"0": 5000}
    gens.flush_pids(due_only=True)
    assert sup.journal.get_meta("generation_0")["rank_pids"] == {"0": 5000}  # not due yet
    monkeypatch.setattr(gens, "_pids_journaled_at", gens._pids_journaled_at - 2.0)
    gens.flush_pids(due_only=True)
    assert sup.journal.get_meta("generation_0")["rank_pids"] == {"0": 5000, "1": 5001}
