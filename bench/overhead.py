"""Trainer overhead of supervision, measured as ratios within one run (the machine is noisy).

Three ways of running the same 2-rank tiny CPU job, interleaved over several rounds:
  plain       no supervisor URL (spool only)
  dead        the URL points at a closed port (a dead daemon)
  live        a live peer answering telemetry and heartbeats over HTTP
The figure is the median step time (steps 6..N, from each run's own spool), and the ratios
dead/plain and live/plain. Usage: python bench/overhead.py [--steps 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.trainer_harness import ScriptedPeer, run_trainer, spool  # noqa: E402


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns


def median_step(dump: Path) -> float:
    recs = spool(dump)[0]
    return statistics.median(r["step_seconds"] for r in recs if r["step"] > 5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"plain": [], "dead": [], "live": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for mode in results:
                dump = Path(tmp) / f"{mode}-{rnd}"
                base = ["--training.steps", str(args.steps), "--checkpoint.interval", "1000"]
                if mode == "plain":
                    p = run_trainer(dump, 2, base)
                elif mode == "dead":
                    p = run_trainer(dump, 2, base + ["--supervision.url", f"http://127.0.0.1:{closed_port()}"])
                else:
                    with ScriptedPeer() as peer:
                        p = run_trainer(dump, 2, base + ["--supervision.url", peer.url])
                if p.returncode != 0:
                    print(p.stderr[-3000:])
                    return 1
                results[mode].append(median_step(dump))
                print(f"round {rnd} {mode:5s} median step {results[mode][-1] * 1000:.2f} ms", flush=True)
    med = {m: statistics.median(v) for m, v in results.items()}
    print()
    for m, v in med.items():
        print(f"{m:5s} median step {v * 1000:.2f} ms  (runs: {', '.join(f'{x * 1000:.2f}' for x in results[m])})")
    print(f"dead/plain = {med['dead'] / med['plain']:.3f}")
    print(f"live/plain = {med['live'] / med['plain']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
