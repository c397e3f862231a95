"""`titan-supervisor demo`: the README's main job.

A supervised 2-rank tiny llama3 run on the CPU (real torchtitan, gloo) with a scripted drill:
a real loss spike (the LR multiplied by 1000 for 3 steps), a NaN gradient, a SIGKILLed rank and
a SIGSTOPped (hung) rank. The daemon runs in-process with its defaults plus the few drill
settings below; afterwards a summary is read back from the journal: each incident, what was
done, how long recovery took, the final step, the steps lost and the goodput.
Needs no service beyond itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from supervisor import log

DRILL = "spike@55:lr=1000:steps=3,nan@100,crash@145:rank=1,hang@195:rank=1:gen=1:mode=stop"
ECHO = {"generation started", "decision", "action done", "action failed", "run finished", "page", "listening"}


def demo_settings(workdir: Path, steps: int):
    from supervisor.settings import Settings

    return Settings.load(
        run={"workdir": str(workdir), "run_id": "demo", "preset": "tiny", "nproc_per_node": 2, "steps": steps,
             "checkpoint_interval": 10, "faults": DRILL},
        training={"seed": 42},
        server={"port": 0},
        # a CPU step takes ~60 ms: restart quickly, and name a silent rank after 2.5 s
        policy={"backoff_base_seconds": 1.0, "backoff_max_seconds": 5.0},
        detect={"stall": {"heartbeat_timeout": 2.5}},
    )


class _Echo:
    """A structlog processor: a short human line on stdout for the events a person cares about."""

    def __init__(self, start: float) -> None:
        self.start = start

    def __call__(self, logger, name, event_dict):
        ev = event_dict.get("event")
        if ev in ECHO and not (ev == "decision" and event_dict.get("action") in ("record", "none")):
            t = time.time() - self.start
            if ev == "decision":
                line = f"decide  {event_dict['action']}: {event_dict['reason']}"
            elif ev == "action done":
                line = f"done    {event_dict['kind']} -> {json.dumps(_short(event_dict.get('outcome')))}"
            elif ev == "generation started":
                line = (f"launch  generation {event_dict['generation']} from "
                        f"{'step ' + str(event_dict['load_step']) if event_dict['load_step'] is not None else 'scratch'}"
                        f" ({event_dict['reason']})")
            else:
                line = f"{ev}  " + ", ".join(f"{k}={v}" for k, v in event_dict.items() if k not in ("event", "level", "timestamp"))
            print(f"[{t:6.1f}s] {line}", flush=True)
        return event_dict


def _short(outcome):
    if isinstance(outcome, dict):
        return {k: v for k, v in outcome.items() if k not in ("stacks", "detail")}
    return outcome


def summarize(workdir: Path, wall_s: float, metrics_text: str) -> str:
    from supervisor.journal import Journal

    j = Journal.open(workdir / "supervisor" / "journal.sqlite", readonly=True)
    try:
        decisions = {d["id"]: d for d in j.decisions(limit=10_000)}
        findings = {f["id"]: f for f in j.findings(limit=10_000)}
        steps = sorted(j.recent_steps(limit=100_000), key=lambda r: r["wall_time"])
        rows = []
        for a in sorted(j.actions(limit=10_000), key=lambda a: a["id"]):
            d = decisions.get(a["decision_id"]) or {}
            f = findings.get(d.get("finding_id")) or {}
            detected = f.get("wall_time") or a["created_at"]
            resumed = next((s["wall_time"] for s in steps if s["wall_time"] > a["updated_at"]), None)
            row = {
                "action": a["kind"], "state": a["state"], "finding": f.get("kind", "?"), "step": f.get("step"),
                "last_step": f.get("step"), "count": 1,
                "recovery_s": (resumed - detected) if resumed and a["kind"] != "skip_update" else None,
                "outcome": a.get("outcome") or {}, "reason": d.get("reason", ""),
            }
            prev = rows[-1] if rows else None
            if prev and prev["action"] == row["action"] == "skip_update" and prev["finding"] == row["finding"] \
                    and row["step"] is not None and prev["last_step"] is not None and row["step"] - prev["last_step"] <= 1:
                prev["count"] += 1
                prev["last_step"] = row["step"]
                continue
            rows.append(row)
        last = max((s["step"] for s in steps), default=0)
        gens = j.generations(limit=100)
    finally:
        j.close()
    metrics = _scrape(metrics_text)
    out = ["", "Summary", "-------"]
    for i, r in enumerate(rows, 1):
        o = r["outcome"]
        what = {
            "rollback": f"hot rollback to step {o.get('target_step')}, skipped {o.get('skip_batches')} batches"
                        if o.get("mode") == "hot" else f"cold rollback to step {o.get('target_step')}",
            "rollback_lr_down": f"rollback to step {o.get('target_step')} with the LR scaled down",
            "restart": f"restarted from step {o.get('load_step')} as generation {o.get('generation')}",
            "kill_restart_hang": f"dumped stacks, killed, restarted from step {o.get('load_step')} "
                                 f"as generation {o.get('generation')}",
            "skip_update": (f"{r['count']} updates skipped" if r["count"] > 1 else "update skipped"),
            "stop_page": "stopped the run and paged a human",
        }.get(r["action"], r["action"])
        rec = f"{r['recovery_s']:.1f} s" if r["recovery_s"] is not None else "-"
        where = f"{r['step']}" if r["last_step"] == r["step"] else f"{r['step']}-{r['last_step']}"
        out.append(f"{i:2d}. step {where:>7}  {r['finding']:<12} -> {what}  [recovery {rec}; {r['state']}]")
    total = metrics.get("titan_lost_steps_total", 0.0)
    out += ["",
            f"final step reached : {last}",
            f"generations        : {len(gens)} (restarts: {max(0, len(gens) - 1)})",
            f"steps lost         : {int(total)}",
            f"goodput            : {100 * metrics.get('titan_goodput_ratio', 0.0):.0f}% of {wall_s:.0f} s wall time",
            f"journal            : {workdir / 'supervisor' / 'journal.sqlite'}",
            f"daemon log         : {workdir / 'supervisor' / 'daemon.log'}"]
    return "\n".join(out)


def _scrape(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value  # labelled series sum (lost steps by kind)
    return out


def main(workdir: str = "runs/demo", steps: int = 240, keep: bool = False) -> int:
    from supervisor.service import serve

    wd = Path(workdir).resolve()
    if wd.exists() and not keep:
        shutil.rmtree(wd)
    (wd / "supervisor").mkdir(parents=True, exist_ok=True)
    settings = demo_settings(wd, steps)
    start = time.time()
    logfile = open(wd / "supervisor" / "daemon.log", "a")
    import structlog

    log.configure(settings.log_level, stream=logfile)
    structlog.configure(processors=[_Echo(start), *structlog.get_config()["processors"]])
    print(f"titan-supervisor demo: tiny llama3 on 2 CPU ranks, {steps} steps, drill: {DRILL}")
    print(f"workdir {wd}\n")
    sup = asyncio.run(serve(settings))
    wall = time.time() - start
    logfile.close()
    print(summarize(wd, wall, sup.metrics.render().decode()))
    return 0 if sup.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
