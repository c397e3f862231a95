"""Training stall of a checkpoint save: synchronous vs torchtitan's async mode.

Why: with `checkpoint.async_mode = "async"` the trainer blocks only for a staging copy and
writes the files from a background thread; the Young/Daly interval should then use that
stall, not the full save time (supervisor/checkpoint_interval.py). This measures it on the
same job both ways (`[checkpoints] async_mode`, passed as `--checkpoint.async_mode`):

  blocked   the trainer's own `checkpoint_saved.seconds`: how long `save` held the step loop
            (the interval advisor's C)
  excess    the step-gap excess around each save: the record-to-record wall time of the save
            step and the two after it, minus three median gaps of steps far from any save (it
            catches what `blocked` cannot: background writing competing with training for CPU)

Medians over the interval saves (the final save, forced at the end, is left out). Prints both
modes and the ratio async/sync; the target is async < 10% of sync.

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

MODES = ("disabled", "async")


def measure(dump: Path, args, mode: str) -> dict:
    p = run_trainer(dump, args.nproc, ["--training.steps", str(args.steps), "--checkpoint.interval",
                                       str(args.interval), "--checkpoint.async_mode", mode, "--debug.seed", "7"],
                    timeout=1800, preset=args.preset)
    if p.returncode != 0:
        raise SystemExit(f"{mode}: trainer failed:\n{p.stderr[-3000:]}")
    records, events = spool(dump)
    saves = [e for e in events if e["kind"] == "checkpoint_saved" and e["step"] % args.interval == 0
             and e["step"] < args.steps]
    wall = {r["step"]: r["wall_time"] for r in records}
    gap = {s: wall[s] - wall[s - 1] for s in wall if s - 1 in wall}
    save_steps = {e["step"] for e in saves}
    quiet = [g for s, g in gap.items() if all(abs(s - k) > 2 for k in save_steps) and s > 3]
    base = statistics.median(quiet)
    excess = [sum(gap.get(k + i, base) for i in range(3)) - 3 * base for k in sorted(save_steps)]
    return {"blocked": statistics.median(e["seconds"] for e in saves), "excess": statistics.median(excess),
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
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out[mode] = m = measure(Path(tmp) / mode, args, mode)
            print(f"{mode:9s} blocked {m['blocked'] * 1000:8.1f} ms   excess {m['excess'] * 1000:8.1f} ms   "
                  f"({m['saves']} saves of {m['size_mib']:.1f} MiB, median step {m['step_s'] * 1000:.0f} ms)",
                  flush=True)
    s, a = out["disabled"], out["async"]
    print(f"async/sync blocked: {a['blocked'] / s['blocked']:.3f}   "
          f"async/sync excess: {(a['excess'] / s['excess']) if s['excess'] > 0 else float('nan'):.3f}   "
          f"(target < 0.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
