"""The data-position proof shared by the reshard and node-agent drills.

A run that changed its DP degree (a reshard, a lost node, a node grown back) must have trained on
exactly the samples an unbroken run with the same seed and config saw, step for step, and its loss
must stay within float32 reduction-order noise of that run's. The per-rank sample logs
(`<dump>/samples/rank-r.jsonl`, written by `training.data`) and the telemetry spool are the
evidence; this module reads them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tests.trainer_harness import losses_by_step, read_jsonl, run_trainer, spool

# DP 2 × 1 microbatch and DP 1 × 2 microbatches sum the same per-token losses and gradients in a
# different order (gloo all-reduce vs local accumulation), so float32 rounding differs at ~1e-7
# relative per step and compounds through Adam over a few steps; a wrong sample moves the loss by
# ~1e-2 relative on this model, so 1e-4 separates the two by two orders of magnitude.
LOSS_RTOL = 1e-4


def samples_by_step(dump, generation: int | None = None) -> dict[int, list[tuple[int, str]]]:
    """Every rank's logged rows, merged per step and ordered by global sample index; for a step
    trained more than once, the last generation's rows."""
    rows: dict[tuple[int, int], list] = defaultdict(list)
    for path in sorted((Path(dump) / "samples").glob("rank-*.jsonl")):
        for line in read_jsonl(path):
            if generation is None or line["generation"] == generation:
                rows[(line["step"], line["generation"])] += [tuple(i) for i in line["ids"]]
    out: dict[int, list] = {}
    for (step, _gen), ids in sorted(rows.items()):
        out[step] = sorted(ids)
    return out


def dp_of(dump, generation: int) -> set[int]:
    """The DP degree(s) a generation's sample logs say it trained at."""
    return {line["dp"] for p in (Path(dump) / "samples").glob("rank-*.jsonl") for line in read_jsonl(p)
            if line["generation"] == generation}


def unbroken_run(dump: Path, *, steps: int, interval: int, global_batch: int = 8, seed: int = 42) -> Path:
    """A plain 2-rank torchrun of the tiny preset with the flags a daemon drill's config renders
    (``[training] seed``, ``global_batch_size``; ``run.steps``, ``run.checkpoint_interval``)."""
    proc = run_trainer(dump, 2, ["--training.global_batch_size", str(global_batch), "--debug.seed", str(seed),
                                 "--checkpoint.interval", str(interval), "--training.steps", str(steps)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dump


def worst_loss_gap(reference: Path, run: Path, steps) -> float:
    """The largest relative loss difference of ``run`` from ``reference`` over ``steps`` (the last
    loss recorded for each step: after a restart, the redone one)."""
    a, b = losses_by_step(spool(reference)[0]), losses_by_step(spool(run)[0])
    missing = [s for s in steps if s not in b]
    assert not missing, f"no loss recorded for steps {missing}"
    return max(abs(b[s] - a[s]) / abs(a[s]) for s in steps)
