"""`StallDetector.tick` skips its pass over the ranks while no per-rank deadline can be due (the
pass per tick was most of the daemon's core at 16,384 ranks: bench/ingest.py). The skip must
never change what is found: a detector ticked the fast way and one forced through the full pass
on every tick are fed the same random histories (silences, slow phases, stalls, pauses, steps
going back, out-of-order beats) and must find exactly the same things at the same times."""

from __future__ import annotations

import math
import random

import pytest

from supervisor.detect.stall import StallDetector
from tests.unit.test_detectors import hb, rec

T0 = 1_000_000.0


def found(fs):
    return [(f.kind, f.rank, round(f.wall_time, 6), tuple(f.evidence.get("silent_ranks", ()))) for f in fs]


@pytest.mark.parametrize("seed", range(12))
def test_the_fast_tick_finds_exactly_what_the_full_pass_finds(seed):
    rnd = random.Random(seed)
    ranks = rnd.randint(2, 12)
    cfg = StallDetector.Config(heartbeat_timeout=rnd.choice([2.0, 5.0]), floor_seconds=3.0,
                               startup_timeout=rnd.choice([10.0, 30.0]), slow_phase_timeout=20.0)
    fast, full = (StallDetector(cfg, generation=0, now=T0) for _ in range(2))
    for d in (fast, full):
        d.reset(0, T0, world_size=ranks)
    silent: set[int] = set()
    step, now, fired = 0, T0, 0
    for _ in range(400):
        now += rnd.choice([0.05, 0.1, 0.3, 1.0, 2.5])
        event = rnd.random()
        if event < 0.08:
            silent ^= {rnd.randrange(ranks)}  # a rank falls silent, or comes back
        elif event < 0.10:
            step = max(1, step - rnd.randint(1, 5))  # a rollback: steps go back
        elif event < 0.12:
            until = now + rnd.uniform(0, 5)
            for d in (fast, full):
                d.expect_pause(until)
        if rnd.random() < 0.8:  # most of the time the run makes steps
            step += 1
            r = rec(step, 3.0, step_seconds=rnd.uniform(0.2, 1.0))
            r = r.model_copy(update={"wall_time": now - rnd.choice([0.0, 0.0, 3.0])})  # sometimes late
            for d in (fast, full):
                d.observe_record(r)
        for rank in range(ranks):
            if rank in silent or rnd.random() < 0.1:
                continue
            phase = rnd.choice(["train_step"] * 6 + ["checkpoint", "loading", "finishing", "fault:hang"])
            beat = hb(rank, step, now - rnd.choice([0.0, 0.0, 0.0, 4.0]), phase=phase)  # some out of order
            for d in (fast, full):
                d.observe_heartbeat(beat)
        full._quiet_until = -math.inf  # forced through the full pass
        a, b = found(fast.tick(now)), found(full.tick(now))
        assert a == b, (seed, now - T0)
        fired += len(a)
    assert fired > 0  # the histories do make the detector fire (the comparison is not vacuous)
