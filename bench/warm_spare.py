"""Warm spare vs cold restart: the time from a SIGKILLed rank to the first new step, and the memory
a parked spare costs.

Why: `[launch] warm_spare` (supervisor/launch/spare.py) should cut a restart's critical path by
torchrun's start-up and the ranks' imports; this measures whether it does on this machine, and at
what price, with the real daemon and trainer. One invocation runs the same job twice under the
daemon: first with ``warm_spare = true`` (rank 1 is SIGKILLed at the first step >= ``--kill-at``
once the spare has parked, so the spare can serve), then with ``warm_spare = false`` (killed at the
same step). For each it prints, from the run's own clocks: kill -> dead-rank finding (journal),
-> new generation launched (daemon log), -> trainer ready (`started` event: checkpoint loaded),
-> first new step (spool), and steps recomputed; for the spare also its RSS and USS (unique
memory, what the parked ranks really hold) summed over torchrun and its ranks, sampled just
before the kill, and how long it took to park.

Usage: python bench/warm_spare.py [--preset small] [--steps 120] [--kill-at 40] [--interval 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.launch.spare import rss_bytes  # noqa: E402
from tests.daemon_harness import Daemon, free_port  # noqa: E402
from tests.trainer_harness import spool  # noqa: E402


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _parked_spare(d: Daemon) -> dict | None:
    j = d.journal()
    try:
        rec = j.get_meta("spare")
    finally:
        j.close()
    if not rec:
        return None
    log = d.workdir / "logs" / f"{Path(rec['folder']).name}.log"
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    n = int(d.cfg["run"]["nproc_per_node"])
    if all(f"[spare rank{r}] parked" in text for r in range(n)):
        return rec
    return None


def run_once(tmp: Path, args, warm: bool, kill_at: int) -> dict:
    cfg = {"run": {"workdir": str(tmp / "run"), "run_id": "spare-bench", "preset": args.preset,
                   "nproc_per_node": args.nproc, "steps": args.steps, "checkpoint_interval": args.interval},
           "training": {"seed": 42}, "server": {"port": free_port()},
           "launch": {"warm_spare": warm}}
    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp, cfg)
    out: dict = {"warm_spare": warm}
    try:
        d.start()
        spare = None
        deadline = time.time() + args.limit
        while time.time() < deadline:
            st = d.status() or {}
            if warm and spare is None and st:
                spare = _parked_spare(d)
                if spare is not None:
                    out["spare_park_s"] = time.time() - psutil.Process(spare["pid"]).create_time()
            if st.get("step", 0) >= kill_at and (spare is not None or not warm) and st.get("trainer_pids", {}).get("1"):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"{'warm' if warm else 'cold'} run never reached step {kill_at} with a parked spare")
        if spare is not None:
            rss, uss = rss_bytes(spare["pid"])
            out.update(spare_rss_mib=rss / 2**20, spare_uss_mib=uss / 2**20)
        out["killed_step"] = st["step"]
        killed = time.time()
        os.kill(int(st["trainer_pids"]["1"]), signal.SIGKILL)
        if d.wait_exit(args.limit) != 0:
            raise SystemExit(d.log_tail())
        events = d.events()
        finding = next(e for e in events if e.get("event") == "finding" and e.get("kind") == "dead_rank")
        launched = next(e for e in events if e.get("event") == "generation started" and e.get("generation") == 1)
        records, evs = spool(d.workdir)
        ready = next(e for e in evs if e.get("kind") == "started" and e["wall_time"] > killed)
        first = min((r for r in records if r.get("generation") == 1), key=lambda r: r["wall_time"])
        j = d.journal()
        try:
            restart = next(a for a in j.actions() if a["kind"] == "restart")
        finally:
            j.close()
        out.update(detect_s=_ts(finding["timestamp"]) - killed, launch_s=_ts(launched["timestamp"]) - killed,
                   ready_s=ready["wall_time"] - killed, first_step_s=first["wall_time"] - killed,
                   load_step=restart["outcome"]["load_step"], served=restart["outcome"].get("warm_spare"),
                   recomputed=out["killed_step"] - restart["outcome"]["load_step"])
        return out
    finally:
        d.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--kill-at", type=int, default=40)
    ap.add_argument("--limit", type=float, default=900.0, help="seconds either run may take")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="spare-bench-") as tmp:
        warm = run_once(Path(tmp) / "warm", args, True, args.kill_at)
        rows.append(warm)
        rows.append(run_once(Path(tmp) / "cold", args, False, warm["killed_step"]))
    print(f"job: preset {args.preset}, {args.nproc} ranks, {args.steps} steps, checkpoint every {args.interval}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'restart':8s} {'killed@':>7s} {'load':>5s} {'->finding':>10s} {'->launch':>9s} {'->ready':>8s} "
          f"{'->1st step':>10s}  served")
    for r in rows:
        print(f"{'spare' if r['warm_spare'] else 'cold':8s} {r['killed_step']:7d} {r['load_step']:5d} "
              f"{r['detect_s']:9.2f}s {r['launch_s']:8.2f}s {r['ready_s']:7.2f}s {r['first_step_s']:9.2f}s  {r['served']}")
    print(f"first new step: cold {rows[1]['first_step_s']:.2f} s, spare {rows[0]['first_step_s']:.2f} s "
          f"(saved {rows[1]['first_step_s'] - rows[0]['first_step_s']:.2f} s)")
    print(f"parked spare: RSS {warm.get('spare_rss_mib', 0):.0f} MiB, USS {warm.get('spare_uss_mib', 0):.0f} MiB "
          f"(torchrun + {args.nproc} ranks), parked {warm.get('spare_park_s', 0):.1f} s after its start")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
