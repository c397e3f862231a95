"""Training stall of a checkpoint save: synchronous vs async.

Why: with `checkpoint.async_mode = "async"` the trainer blocks only for a staging copy and
writes the files from a background thread; the Young/Daly interval should then use that
stall, not the full save time (supervisor/checkpoint_interval.py). This measures it on the
same job three ways: `--checkpoint.async_mode disabled`; `async` as the trainer runs it (CPU
twins built at the first save and refilled on the step, the whole DCP save on a writer thread:
training/snapshot.py); and `async` through torchtitan's own path (`--supervision.no-async-snapshot`:
state dicts, gc.collect and a fresh staging copy on every save's step):

  blocked   the trainer's own `checkpoint_saved.seconds`: how long `save` held the step loop
            (the interval advisor's C)
  excess    the step-gap excess around each save: the record-to-record wall time of the save
            step and the steps after it up to the one before the next save (interval - 1 gaps),
            minus as many baseline gaps; the baseline is the median gap of the steps just before
            a save (as far from the previous save as the interval allows), taken across the whole
            run so that it follows the machine's load (it catches what `blocked` cannot:
            background writing competing with training for CPU)

Medians over the interval saves (the final save, forced at the end, is left out); `first` is the
first save's blocked time (where the snapshot path builds its twins). Prints each mode and the
ratios to sync; the target is async < 10% of sync.

Usage: python bench/checkpoint_stall.py [--preset deep6] [--steps 40] [--interval 5] [--nproc 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.trainer_harness import run_trainer, spool  # noqa: E402

MODES = {"disabled": ["--checkpoint.async_mode", "disabled"],
         "async": ["--checkpoint.async_mode", "async"],
         "async-tt": ["--checkpoint.async_mode", "async", "--supervision.no-async-snapshot"]}


def measure(dump: Path, args, mode: str) -> dict:
    p = run_trainer(dump, args.nproc, ["--training.steps", str(args.steps), "--checkpoint.interval",
                                       str(args.interval), *MODES[mode], "--debug.seed", "7"],
                    timeout=1800, preset=args.preset)
    if p.returncode != 0:
        raise SystemExit(f"{mode}: trainer failed:\n{p.stderr[-3000:]}")
    records, events = spool(dump)
    saves = [e for e in events if e["kind"] == "checkpoint_saved" and e["step"] % args.interval == 0
             and e["step"] < args.steps]
    wall = {r["step"]: r["wall_time"] for r in records}
    gap = {s: wall[s] - wall[s - 1] for s in wall if s - 1 in wall}
    save_steps = sorted(e["step"] for e in saves)
    width = args.interval - 1  # gaps k .. k+interval-2 carry the save at k; gap k+interval-1 is the baseline
    base = statistics.median(gap[k + width] for k in save_steps if k + width in gap)
    excess = [sum(gap.get(k + i, base) for i in range(width)) - width * base for k in save_steps]
    return {"blocked": statistics.median(e["seconds"] for e in saves), "first": saves[0]["seconds"],
            "excess": statistics.median(excess),
            "saves": len(saves), "step_s": base,
            "size_mib": sum(f.stat().st_size for f in (dump / "checkpoint" / f"step-{args.interval}").rglob("*")
                            if f.is_file()) / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deep6")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    if args.interval < 3:
        ap.error("--interval must be >= 3 (the excess needs a baseline step between saves)")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out[mode] = m = measure(Path(tmp) / mode, args, mode)
            print(f"{mode:9s} blocked {m['blocked'] * 1000:8.1f} ms   excess {m['excess'] * 1000:8.1f} ms   "
                  f"first {m['first'] * 1000:7.1f} ms   ({m['saves']} saves of {m['size_mib']:.1f} MiB, "
                  f"baseline step {m['step_s'] * 1000:.0f} ms)", flush=True)
    s = out["disabled"]
    for mode in ("async", "async-tt"):
        a = out[mode]
        print(f"{mode + '/sync':14s} blocked: {a['blocked'] / s['blocked']:.3f}   excess: "
              f"{(a['excess'] / s['excess']) if s['excess'] > 0 else float('nan'):.3f}   (target < 0.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
