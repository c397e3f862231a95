"""Generate the benchmark's curves: one real torchtitan CPU run per matrix entry (matrix.py).

A long job (about 40 s per run on 2 shared cores, mostly start-up): run it in the background,
one run at a time (the CPU cap: one single-rank trainer). It is resumable: a run whose curve file exists is skipped, so an
interrupted job picks up where it stopped. Each run is 1 rank (half the CPU of 2), unsupervised
(no daemon: the spool is the record), checkpoints every 10 steps (the `checkpoint_saved`
events give replay its rollback targets); only the spool is kept, gzip-compressed, as
`curves/<id>.jsonl.gz`; the checkpoint folder is a scratch directory removed after the run.

    PYTHONPATH=$PWD .venv/bin/python -m bench.detection.generate [--split tuning] [--max-runs N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.detection.matrix import STEPS, runs

HERE = Path(__file__).resolve().parent
CURVES = HERE / "curves"
ROOT = HERE.parents[1]


PRIORITY = [5, 3, 9, 16, 13, 18, 23, 7, 14, 1, 11, 20, 24, 15, 21, 0, 2, 4, 6, 8, 10, 12, 17, 19, 22]


def command(run, dump: Path) -> list[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            "-m", "training.run", "--preset", run.model, "--dump_folder", str(dump),
            "--training.steps", str(STEPS), "--debug.seed", str(run.seed),
            "--checkpoint.interval", "10",
            "--supervision.optimizer", json.dumps({"lr": run.lr})]
    if run.faults:
        args += ["--supervision.faults", run.faults]
    return args


def generate_one(run, scratch: Path) -> float:
    dump = scratch / run.id
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HOME=str(scratch / "hf"),
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.run(command(run, dump), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    spool = dump / "telemetry" / "spool.jsonl"
    if proc.returncode != 0 or not spool.is_file():
        raise RuntimeError(f"run {run.id} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = CURVES / f"{run.id}.jsonl.gz"
    tmp = out.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        f.write(spool.read_text())
    tmp.rename(out)
    shutil.rmtree(dump)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tuning", "test"), default=None)
    ap.add_argument("--max-runs", type=int, default=100)
    a = ap.parse_args(argv)
    CURVES.mkdir(exist_ok=True)
    todo = [r for r in runs() if (a.split is None or r.split == a.split)
            and not (CURVES / f"{r.id}.jsonl.gz").is_file()]
    # clean twins first, then the two halves interleaved perturbation by perturbation (in
    # PRIORITY order: the most varied kinds first), so an interrupted job leaves a balanced
    # subset of both halves
    order = {r.id: i for i, r in enumerate(runs())}
    todo.sort(key=lambda r: (r.kind != "clean", PRIORITY.index(int(r.id.split("-p")[-1][:2])) if r.kind != "clean" else 0,
                             r.split != "tuning", order[r.id]))
    with tempfile.TemporaryDirectory(prefix="det-bench-") as scratch:
        for i, run in enumerate(todo[: a.max_runs]):
            secs = generate_one(run, Path(scratch))
            print(f"[{i + 1}/{min(len(todo), a.max_runs)}] {run.id}: {secs:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
