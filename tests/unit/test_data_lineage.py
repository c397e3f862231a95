"""Data skips carried over to a later load of an older checkpoint (supervisor/data_lineage.py)."""

from __future__ import annotations

from supervisor.data_lineage import Load, active_skips, carried_skip


def test_the_goodput_run_that_met_its_nan_batch_three_times():
    """Rollback to 12 skipping 54 (a spike at 56); the NaN batch then at step 26 -> rollback to 12
    again: the 54 batches skipped after 12 must be skipped again, or the NaN batch returns."""
    loads = [Load(None), Load(12), Load(12, 54)]
    assert carried_skip(loads, 12) == 54
    assert carried_skip(loads, 0) == 54 and carried_skip(loads, None) == 0
    assert carried_skip(loads, 24) == 0  # a checkpoint written after the skip has it in its position


def test_a_load_rewinds_the_skips_made_after_its_checkpoint():
    loads = [Load(None), Load(40, 20), Load(10, 30)]  # the rollback to 10 undid the skip made at 40
    assert active_skips(loads) == [(10, 30)]
    assert carried_skip(loads, 10) == 30 and carried_skip(loads, 5) == 30
    # skips at different checkpoints of one trajectory add up for an older load
    loads = [Load(None), Load(10, 30), Load(50, 7)]
    assert active_skips(loads) == [(10, 30), (50, 7)]
    assert carried_skip(loads, 10) == 37 and carried_skip(loads, 20) == 7 and carried_skip(loads, 60) == 0


def test_a_restart_that_carried_a_skip_keeps_it_and_a_fresh_start_forgets_it():
    loads = [Load(None), Load(12, 54), Load(12, 54)]  # a cold restart from 12 re-skipping the 54
    assert carried_skip(loads, 12) == 54
    assert carried_skip([*loads, Load(None)], 12) == 0
    assert carried_skip([*loads, Load(0)], 12) == 0
