"""Goodput soak: the same job under the same written fault schedule, run several ways.

Why: users judge a supervisor by one number, the fraction of wall time spent on useful
training (ETTR) under realistic faults. This runs one job (preset, ranks, steps, checkpoint
interval, seed) clean and under a fault schedule, each way:

  torchrun              plain `torchrun --max-restarts 3` (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1:
                        without it restarts hang in gloo's connectFullMesh here); it may hang or
                        crash-loop: every run is bounded by a wall-time limit, and that is reported
  supervisor            the `titan-supervisor run` daemon on its own workdir, default settings
  supervisor-cold       the daemon with `[launch] warm_spare = false` (every restart cold)
  supervisor-spare      the daemon with `[launch] warm_spare = true` (restarts served by a parked
                        spare generation: supervisor/launch/spare.py)
  supervisor-adaptive   warm spare + async saves + the Young/Daly interval on the measured save
                        stall (`[checkpoints] adaptive`), told the schedule's fault rate as its
                        MTBF prior (ADAPTIVE_MTBF_S), as an operator tells it the fleet's
  supervisor-torchft    the daemon with `[fault_tolerance] mode = "torchft"`: the job's ranks as
                        that many replica groups of one rank each (README, "torchft mode"). A
                        fault's rank= is the global rank, so rank=1 is group 1 (killed, SIGSTOPped
                        and slowed alone: the other group keeps stepping, or waits for it in the
                        allreduce); the spike and the NaN batch hit every group. Directives reach
                        group 0, which leads: the other group heals from it at the next quorum,
                        so a rollback is hot here too (training/ft.py)

For supervisor ways also the journal's actions in order (a replica group relaunched alone, a new
generation from a checkpoint, a refused directive) and a restart table from the journal: per new generation, seconds from
the old generation's last step to the launch, to the trainer being ready and to its first step,
and whether a warm spare served it (the least noisy measure of restart cost on a shared machine).
For each way: time to the target step, ETTR = (clean time to target) / (faulted time to
target) against its own clean run, restarts, hot rollbacks, the seconds each fault cost
(the faulted run's wall time between two fault steps minus the clean run's for the same
steps: detection + kill + restart + recompute + slowdown), steps recomputed, and the final
loss (mean of the last 10 steps) vs clean. Then, from the supervisor's hot rollback: the
same rollback done cold (a fresh torchrun loading the same checkpoint with the same data
skip: spawn -> ready to train) vs hot (the trainer's own load + drain seconds), and the hot
time vs the raw read time of the checkpoint files it loads (the physical limit).

Everything comes from the runs' own numbers: rank 0's telemetry spool (`<dump>/telemetry/
spool.jsonl`, written with or without a daemon). Runs are bounded: a run past its limit is
killed (its process group and every process naming its workdir) and reported as such.

Usage: python bench/goodput.py [--steps 300] [--preset small] [--way torchrun --way supervisor]
       [--out goodput.json]. `--steps 120` is a quick version (fault steps scale with it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon_harness import free_port, to_toml  # noqa: E402
from tests.trainer_harness import ROOT, spool, trainer_env  # noqa: E402

# The written schedule, as fractions of the run (300 steps: 60, 110, 160, 210, 250).
SCHEDULE = [
    ("killed rank", "crash@{s}:rank=1", 0.20),
    ("unrecovered LR spike", "spike@{s}:lr=300:steps=3", 0.3667),
    ("NaN batch reached the weights", "nan@{s}:applied=1", 0.5333),
    ("hung rank (SIGSTOP)", "hang@{s}:rank=1:mode=stop", 0.70),
    ("slow rank", "slow@{s}:rank=1:seconds=0.3:steps=15", 0.8333),
]


@dataclass
class Job:
    preset: str = "small"
    nproc: int = 2
    steps: int = 300
    interval: int = 25
    seed: int = 42

    def schedule(self) -> list[tuple[str, str, int]]:
        return [(name, spec.format(s=max(2, round(frac * self.steps))), max(2, round(frac * self.steps)))
                for name, spec, frac in SCHEDULE]

    def faults(self) -> str:
        return ",".join(spec for _, spec, _ in self.schedule())


@dataclass
class Run:
    way: str
    faulted: bool
    workdir: str
    launched: float
    ended: float
    rc: int | None  # None: killed at the time limit
    records: list = field(default_factory=list, repr=False)
    events: list = field(default_factory=list, repr=False)

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def reached(self, step: int) -> float | None:
        """Seconds from launch until the run first reached `step` (high-water mark)."""
        for r in sorted(self.records, key=lambda r: r["wall_time"]):
            if r["step"] >= step:
                return r["wall_time"] - self.launched
        return None

    def final_losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in sorted(self.records, key=lambda r: r["wall_time"])}

    def recomputed(self, lo: int = 0, hi: int = 1 << 30) -> int:
        """Step records at or below a step already reached before them, with lo < step <= hi."""
        top, n = 0, 0
        for r in sorted(self.records, key=lambda r: r["wall_time"]):
            if r["step"] <= top and lo < r["step"] <= hi:
                n += 1
            top = max(top, r["step"])
        return n


def _kill_tree(proc: subprocess.Popen, workdir: Path) -> None:
    """The process group we started, then any process naming this run's (unique) workdir."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(workdir) in " ".join(p.info["cmdline"] or []):
                p.kill()
        except psutil.Error:
            pass
    try:  # torchft mode: the daemon's Lighthouse runs in its own session and does not name the workdir
        lh = psutil.Process(json.loads((workdir / "logs" / "lighthouse.json").read_text())["pid"])
        if "torchft_lighthouse" in " ".join(lh.cmdline()):
            lh.kill()
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait(proc: subprocess.Popen, workdir: Path, limit_s: float) -> int | None:
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc, workdir)
        return None


def _trainer_cmd(job: Job, dump: Path, extra: list[str]) -> list[str]:
    return ["-m", "training.run", "--preset", job.preset, "--dump_folder", str(dump),
            "--training.steps", str(job.steps), "--checkpoint.interval", str(job.interval),
            "--debug.seed", str(job.seed), *extra]


class TorchrunWay:
    """Plain torchrun with in-place restarts: no detection beyond a process exit."""

    name = "torchrun"

    def run(self, job: Job, workdir: Path, faults: str, limit_s: float) -> Run:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.nproc}",
               "--max-restarts", "3", *_trainer_cmd(job, workdir, ["--supervision.faults", faults] if faults else [])]
        env = trainer_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
        workdir.mkdir(parents=True, exist_ok=True)
        launched = time.time()
        with open(workdir.parent / f"{workdir.name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            rc = _wait(proc, workdir, limit_s)
        return Run(self.name, bool(faults), str(workdir), launched, time.time(), rc)


class SupervisorWay:
    """The titan-supervisor daemon with its default settings on a fresh workdir."""

    def __init__(self, name: str = "supervisor", extra: dict | None = None) -> None:
        self.name = name
        self.extra = extra or {}

    def config(self, job: Job, workdir: Path, faults: str) -> dict:
        cfg = {"run": {"workdir": str(workdir), "run_id": "goodput", "preset": job.preset,
                       "nproc_per_node": job.nproc, "steps": job.steps, "checkpoint_interval": job.interval,
                       "faults": faults},
               "training": {"seed": job.seed},
               "server": {"port": free_port()}}
        for section, body in self.extra.items():
            cfg.setdefault(section, {}).update(body)
        if cfg.get("fault_tolerance", {}).get("mode") == "torchft":
            # the same world as the other ways: job.nproc replica groups of one rank each
            cfg["fault_tolerance"].setdefault("groups", job.nproc)
            cfg["run"]["nproc_per_node"] = 1
        return cfg

    def run(self, job: Job, workdir: Path, faults: str, limit_s: float) -> Run:
        workdir.parent.mkdir(parents=True, exist_ok=True)
        conf = workdir.parent / f"{workdir.name}.toml"
        conf.write_text(to_toml(self.config(job, workdir, faults)))
        launched = time.time()
        with open(workdir.parent / f"{workdir.name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", str(conf)], env=trainer_env(),
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            rc = _wait(proc, workdir, limit_s)
        _kill_tree(proc, workdir)  # a daemon that exited leaves no trainer behind; make sure
        return Run(self.name, bool(faults), str(workdir), launched, time.time(), rc)


ADAPTIVE_MTBF_S = 32.0
WAYS = {"torchrun": TorchrunWay(), "supervisor": SupervisorWay(),
        "supervisor-cold": SupervisorWay("supervisor-cold", {"launch": {"warm_spare": False}}),
        "supervisor-spare": SupervisorWay("supervisor-spare", {"launch": {"warm_spare": True}}),
        "supervisor-torchft": SupervisorWay("supervisor-torchft", {"fault_tolerance": {"mode": "torchft"}}),
        # warm spare + async saves + the Young/Daly interval on the measured stall, told the schedule's
        # fault rate as an operator tells it the fleet's (5 faults in ~160 s of training: one per ~32 s)
        "supervisor-adaptive": SupervisorWay("supervisor-adaptive", {
            "launch": {"warm_spare": True},
            "checkpoints": {"async_mode": "async", "adaptive": True, "mtbf_prior_hours": ADAPTIVE_MTBF_S / 3600,
                            "min_interval_steps": 5}}),
        # torchft mode with the same async saves and interval (a relaunched group heals from its peer;
        # the interval bounds what a rollback recomputes)
        "supervisor-torchft-adaptive": SupervisorWay("supervisor-torchft-adaptive", {
            "fault_tolerance": {"mode": "torchft"},
            "checkpoints": {"async_mode": "async", "adaptive": True, "mtbf_prior_hours": ADAPTIVE_MTBF_S / 3600,
                            "min_interval_steps": 5}})}


def load(run: Run) -> Run:
    try:
        run.records, run.events = spool(Path(run.workdir))
    except OSError:
        run.records, run.events = [], []
    return run


def tail_loss(run: Run, n: int = 10) -> float | None:
    final = run.final_losses()
    if not final:
        return None
    last = max(final)
    vals = [final[s] for s in range(last - n + 1, last + 1) if s in final]
    return statistics.mean(vals) if vals else None


def summarize(job: Job, clean: Run, bad: Run) -> dict:
    target = job.steps
    t_clean, t_bad = clean.reached(target), bad.reached(target)
    starts = [e for e in bad.events if e.get("kind") == "started"]
    # a directive is re-delivered until acknowledged: its repeats say "already applied" and are not rollbacks
    rollbacks = [e for e in bad.events if e.get("kind") == "directive_applied" and e.get("directive") == "rollback"
                 and e.get("ok") and str(e.get("detail", "")).startswith("rolled back")]
    bounds = [s for _, _, s in job.schedule()]
    edges = [b - 1 for b in bounds] + [target]
    per_fault = []
    for (name, spec, step), lo, hi in zip(job.schedule(), edges, edges[1:]):
        a_c, b_c, a_b, b_b = clean.reached(lo), clean.reached(hi), bad.reached(lo), bad.reached(hi)
        lost = None if None in (a_c, b_c, a_b, b_b) else (b_b - a_b) - (b_c - a_c)
        per_fault.append({"fault": name, "spec": spec, "lost_s": lost, "recomputed": bad.recomputed(lo, hi)})
    l_clean, l_bad = tail_loss(clean), tail_loss(bad)
    clean_final = clean.final_losses()
    noise = (statistics.pstdev([clean_final[s] - clean_final[s - 1] for s in range(target - 19, target + 1)
                                if s in clean_final and s - 1 in clean_final]) if clean_final else None)
    return {
        "way": bad.way, "clean_s": t_clean, "faulted_s": t_bad,
        "ettr": (t_clean / t_bad) if t_clean and t_bad else None,
        "finished": bad.rc == 0 and t_bad is not None, "timed_out": bad.timed_out, "rc": bad.rc,
        "max_step": max((r["step"] for r in bad.records), default=0),
        "restarts": max(0, len(starts) - 1), "hot_rollbacks": len(rollbacks),
        "group_restarts": sum(1 for a in journal_actions(bad) if a["group_restart"]),
        "recomputed": bad.recomputed(), "per_fault": per_fault,
        "loss_clean": l_clean, "loss_faulted": l_bad,
        "loss_diff": (l_bad - l_clean) if l_clean is not None and l_bad is not None else None,
        "loss_noise": noise, "restart_timeline": restart_timeline(bad), "actions": journal_actions(bad),
    }


def hot_vs_cold(job: Job, bad: Run, tmp: Path) -> dict | None:
    """The supervisor's first hot rollback, redone cold from the same checkpoint and skip."""
    hot = next((e for e in bad.events if e.get("kind") == "directive_applied" and e.get("directive") == "rollback"
                and e.get("ok") and e.get("seconds") is not None), None)
    if hot is None:
        return None
    detail = hot["detail"]  # "rolled back to step C, skipped K batches, lr scale S"
    step = int(detail.split("step ")[1].split(",")[0])
    skip = int(detail.split("skipped ")[1].split(" ")[0])
    src = Path(bad.workdir) / "checkpoint" / f"step-{step}"
    if not src.is_dir():
        src = next(Path(bad.workdir).glob(f"quarantine/**/step-{step}"), src)
    files = [p for p in src.rglob("*") if p.is_file()]
    t0 = time.perf_counter()
    nbytes = 0
    for p in files:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                nbytes += len(chunk)
    raw_read = time.perf_counter() - t0
    dump = tmp / "cold"
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(src, dump / "checkpoint" / f"step-{step}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.nproc}",
           *_trainer_cmd(replace_steps(job, step + 1), dump, ["--checkpoint.load_step", str(step),
                                                               "--supervision.skip_batches", str(skip)])]
    spawned = time.time()
    p = subprocess.run(cmd, env=trainer_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    _, events = spool(dump)
    started = next(e for e in events if e.get("kind") == "started")
    cold = started["wall_time"] - spawned
    return {"step": step, "skip_batches": skip, "hot_s": hot["seconds"], "cold_s": cold,
            "cold_over_hot": cold / hot["seconds"] if hot["seconds"] else None,
            "checkpoint_bytes": nbytes, "raw_read_s": raw_read,
            "hot_over_raw_read": hot["seconds"] / raw_read if raw_read else None}


def journal_actions(run: Run) -> list[dict]:
    """A supervisor run's actions in order (journal): seconds after launch, kind, state, and what the
    outcome says (a replica group relaunched alone, a checkpoint loaded, a directive refused)."""
    path = Path(run.workdir) / "supervisor" / "journal.sqlite"
    if not path.is_file():
        return []
    from supervisor.journal import Journal

    j = Journal.open(path, readonly=True)
    try:
        rows = sorted(j.actions(limit=1000), key=lambda a: a["id"])
    finally:
        j.close()
    out = []
    for a in rows:
        o = a.get("outcome") if isinstance(a.get("outcome"), dict) else {}
        if o.get("group_restart"):
            what = f"replica group {o.get('replica_group')} relaunched alone" + (" (stacks dumped)" if o.get("stacks") else "")
        elif o.get("mode") in ("hot", "cold"):
            what = f"{o['mode']} rollback to step {o.get('target_step')}" + (
                f", new generation {o.get('generation')}" if o["mode"] == "cold" else "") + (
                " (hot refused: torchft mode)" if "refused in torchft mode" in str(o.get("detail")) else "")
        elif "load_step" in o:
            what = f"new generation {o.get('generation')} from step {o.get('load_step')}"
        else:
            what = ", ".join(f"{k}={o[k]}" for k in list(o)[:3] if not isinstance(o[k], (dict, list)))[:90]
        out.append({"at_s": a["created_at"] - run.launched, "kind": a["kind"], "state": a["state"], "what": what,
                    "group_restart": bool(o.get("group_restart"))})
    return out


def restart_timeline(run: Run) -> list[dict]:
    """Per new generation of a supervisor run (journal + spool): seconds from the old generation's
    last step to the new one's launch (detection, dump, stop), to its trainer being ready (start-up,
    checkpoint load) and to its first step; and whether a warm spare served it."""
    path = Path(run.workdir) / "supervisor" / "journal.sqlite"
    if not path.is_file():
        return []
    from supervisor.journal import Journal

    j = Journal.open(path, readonly=True)
    try:
        gens = sorted(j.generations(), key=lambda g: g["id"])
        actions = [a for a in j.actions(limit=1000) if isinstance(a.get("outcome"), dict)]
    finally:
        j.close()
    by_gen = {a["outcome"].get("generation"): a for a in actions if a["outcome"].get("generation") is not None}
    starts = sorted(e["wall_time"] for e in run.events if e.get("kind") == "started")
    out = []
    for g in gens[1:]:
        before = [r["wall_time"] for r in run.records if r.get("generation") == g["id"] - 1]
        mine = [r["wall_time"] for r in run.records if r.get("generation") == g["id"]]
        if not before or not mine:
            continue
        last = max(before)
        ready = next((t for t in starts if t >= g["started_at"]), None)
        a = by_gen.get(g["id"], {})
        out.append({"generation": g["id"], "action": a.get("kind"), "spare": (a.get("outcome") or {}).get("warm_spare"),
                    "to_launch_s": g["started_at"] - last, "to_ready_s": (ready - last) if ready else None,
                    "to_first_step_s": min(mine) - last})
    return out


def replace_steps(job: Job, steps: int) -> Job:
    return Job(job.preset, job.nproc, steps, job.interval, job.seed)


def _f(x, fmt="{:.2f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def report(job: Job, rows: list[dict], hc: dict | None) -> str:
    out = [f"job: preset {job.preset}, {job.nproc} ranks, {job.steps} steps, checkpoint every {job.interval}, "
           f"seed {job.seed}",
           "faults: " + "; ".join(f"{n} ({spec})" for n, spec, _ in job.schedule()), "",
           f"{'way':20s} {'clean s':>8s} {'faulted s':>9s} {'ETTR':>5s} {'done':>5s} {'restarts':>8s} {'grp rst':>7s} "
           f"{'hot rb':>6s} {'recomp':>6s} {'loss clean':>10s} {'loss fault':>10s} {'diff':>7s} {'noise':>6s}"]
    for r in rows:
        done = "yes" if r["finished"] else ("limit" if r["timed_out"] else f"rc{r['rc']}")
        out.append(f"{r['way']:20s} {_f(r['clean_s'], '{:8.1f}'):>8s} {_f(r['faulted_s'], '{:9.1f}'):>9s} "
                   f"{_f(r['ettr'], '{:5.2f}'):>5s} {done:>5s} {r['restarts']:8d} {r.get('group_restarts', 0):7d} {r['hot_rollbacks']:6d} "
                   f"{r['recomputed']:6d} {_f(r['loss_clean'], '{:10.4f}'):>10s} {_f(r['loss_faulted'], '{:10.4f}'):>10s} "
                   f"{_f(r['loss_diff'], '{:+7.4f}'):>7s} {_f(r['loss_noise'], '{:6.4f}'):>6s}"
                   + ("" if r["finished"] else f"   (reached step {r['max_step']})"))
    out += ["", "seconds lost per fault (faulted minus clean wall time between fault steps; steps recomputed):"]
    names = [n for n, _, _ in job.schedule()]
    out.append(f"{'way':20s} " + " ".join(f"{n[:22]:>24s}" for n in names))
    for r in rows:
        cells = [f"{_f(pf['lost_s'], '{:.1f}')} s / {pf['recomputed']}" for pf in r["per_fault"]]
        out.append(f"{r['way']:20s} " + " ".join(f"{c:>24s}" for c in cells))
    timed = [r for r in rows if r.get("restart_timeline")]
    if timed:
        out += ["", "restarts (seconds from the old generation's last step; journal + spool):",
                f"{'way':20s} {'gen':>3s} {'action':>16s} {'->launch':>8s} {'->ready':>8s} {'->step':>8s}  spare"]
        for r in timed:
            for t in r["restart_timeline"]:
                out.append(f"{r['way']:20s} {t['generation']:3d} {str(t['action']):>16s} {t['to_launch_s']:8.2f} "
                           f"{_f(t['to_ready_s'], '{:8.2f}'):>8s} {t['to_first_step_s']:8.2f}  {t['spare']}")
    acted = [r for r in rows if r.get("actions")]
    if acted:
        out += ["", "actions (journal; seconds after launch):"]
        for r in acted:
            for a in r["actions"]:
                out.append(f"{r['way']:20s} {a['at_s']:7.1f} {a['kind']:>18s} {a['state']:>6s}  {a['what']}")
    if hc and "error" not in hc:
        out += ["", f"hot rollback vs cold restart (to step {hc['step']}, skipping {hc['skip_batches']} batches): "
                    f"hot {hc['hot_s']:.2f} s, cold {hc['cold_s']:.2f} s (spawn -> ready): "
                    f"cold/hot = {hc['cold_over_hot']:.1f}x",
                f"hot rollback vs raw read of the checkpoint ({hc['checkpoint_bytes'] / 2**20:.1f} MiB in "
                f"{hc['raw_read_s'] * 1000:.1f} ms): hot/raw = {hc['hot_over_raw_read']:.1f}x"]
    elif hc:
        out += ["", "cold restart failed: " + hc["error"][-500:]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--interval", type=int, default=None, help="checkpoint interval (default: steps / 12)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--way", action="append", choices=sorted(WAYS), help="repeat; default torchrun and supervisor")
    ap.add_argument("--limit-factor", type=float, default=3.0,
                    help="a faulted run is killed after this many times its clean run's wall time (+120 s)")
    ap.add_argument("--clean-limit", type=float, default=1800.0, help="seconds a clean run may take")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = ap.parse_args()
    job = Job(args.preset, args.nproc, args.steps, args.interval or max(5, round(args.steps / 12)))
    ways = args.way or ["torchrun", "supervisor"]
    tmp = Path(tempfile.mkdtemp(prefix="goodput-"))
    rows, hc = [], None
    loads = [os.getloadavg()[0]]  # the machine's load beside the runs: these numbers are wall times
    try:
        for name in ways:
            way = WAYS[name]
            clean = load(way.run(job, tmp / f"{name}-clean", "", args.clean_limit))
            t = clean.reached(job.steps)
            print(f"{name} clean: {'%.1f s to step %d' % (t, job.steps) if t else 'did not finish'} (rc {clean.rc})",
                  flush=True)
            limit = (t or args.clean_limit) * args.limit_factor + 120
            bad = load(way.run(job, tmp / f"{name}-faulted", job.faults(), limit))
            rows.append(summarize(job, clean, bad))
            loads.append(os.getloadavg()[0])
            print(f"{name} faulted: rc {bad.rc}, reached step {rows[-1]['max_step']}, "
                  f"ETTR {_f(rows[-1]['ettr'])} (1-min load average {loads[-1]:.1f})", flush=True)
            if name.startswith("supervisor") and not name.startswith("supervisor-torchft") and hc is None:
                hc = hot_vs_cold(job, bad, tmp / "hotcold")
        text = report(job, rows, hc) + ("\n\n1-min load average at the start and after each way: "
                                        + ", ".join(f"{x:.1f}" for x in loads))
        print("\n" + text)
        if args.out:
            args.out.write_text(json.dumps({"job": asdict(job), "rows": rows, "hot_vs_cold": hc}, indent=2))
    finally:
        if args.keep:
            print(f"runs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
