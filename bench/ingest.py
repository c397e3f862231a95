"""Ingest at scale: simulated node agents posting liveness to the real daemon on one core.

The daemon is the real one (`supervisor.service.serve`: the FastAPI app under uvicorn, the
journal, the detectors, the reconcile loop), in a child process pinned to one CPU core. Only the
trainer processes are simulated: its launcher is swapped for `SimulatedLauncher`, whose generation
"owns" every pid (there is no torchrun); nothing else in the daemon is touched.

The load generator (this process, pinned to another core) plays ``--agents`` agents × ``--ranks``
ranks, each rank beating once a second, spread evenly over the second, over ``--connections``
HTTP/1.1 keep-alive connections; "rank 0" also posts one StepRecord a second (steps progress, so
no hang is found). Route: ``heartbeat`` (today's per-rank `/v1/heartbeat`: one request per rank)
— the batched per-node report route of the agents work replaces it when it lands.

After ``--seconds`` of steady load one rank goes silent and the bench waits for the daemon's
`missing_heartbeat` finding naming it: the time from the silence to the finding is reported
(the detector's `heartbeat_timeout`, 5 s by default, is most of it).

Printed: offered and sustained rate, the daemon's CPU time per request and the rate one
dedicated core would sustain at that cost (the load-independent figure on a shared machine), p50/p99/max latency (send → reply) and lateness (scheduled →
sent: the client or server falling behind), errors, the daemon's event-loop lag (p50/p99/max of
a 50 ms sleep's overshoot), its RSS, and the silent-rank time. The daemon knows ``--ranks`` ranks
(``nproc_per_node``, at most 64): agents share rank numbers, so the silent rank is silent on
every agent. Usage::

    python bench/ingest.py --agents 2048 --ranks 8 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PID_BASE = 40_000


# --- the daemon side (child process) ----------------------------------------------------------

class SimulatedGeneration:
    """A generation with no processes: alive until stopped; owns every pid (simulated ranks)."""

    def __init__(self, generation: int) -> None:
        self.generation, self.exited, self.stopping, self.exit_expected = generation, None, False, False
        self.rank_pids: dict[int, int] = {}
        self.pid = PID_BASE - 1

    def alive(self) -> bool:
        return self.exited is None

    def stop(self, grace) -> None:
        self.exited = -15 if self.exited is None else self.exited

    def poll(self):
        return []

    def note_rank_pid(self, rank, pid) -> None:
        self.rank_pids[rank] = pid

    def owns(self, pid) -> bool:
        return True

    def log_tail(self, n=None):
        return []

    def dump_stacks(self) -> str:
        return ""


class SimulatedLauncher:
    def __init__(self, logs_dir, config=None) -> None:
        self.specs = []

    def start(self, spec):
        self.specs.append(spec)
        return SimulatedGeneration(spec.generation)

    def adopt(self, spec, pid, rank_pids):
        return None


def serve_child(args) -> None:
    os.sched_setaffinity(0, {args.core})
    import supervisor.daemon as daemon
    from supervisor.service import serve
    from supervisor.settings import Settings

    daemon.LocalLauncher = SimulatedLauncher  # the only stand-in: no trainer processes here
    out = Path(args.serve)
    settings = Settings.load(run={"workdir": str(out.parent / "run"), "run_id": "bench", "nproc_per_node": args.ranks},
                             server={"port": 0, "rate_limit": {"trainer_per_s": 1e7, "read_per_s": 1e4}},
                             preflight={"enabled": False})
    findings = open(out.parent / "findings.jsonl", "a", buffering=1)
    lags: list[float] = []

    async def measure_lag() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.05)
            lags.append(time.perf_counter() - t - 0.05)
            if len(lags) % 20 == 0:
                (out.parent / "lag.json").write_text(json.dumps(lags[-4000:]))

    def ready(sup) -> None:
        original = sup.on_finding

        def on_finding(f):
            findings.write(json.dumps({"kind": f.kind, "rank": f.rank, "at": time.time()}) + "\n")
            return original(f)

        sup.on_finding = on_finding
        sup.spawn(measure_lag())
        out.write_text(json.dumps({"url": sup.url, "generation": sup.generation, "token": sup.trainer_token}))

    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(settings, on_ready=ready, exit_when_finished=False))


# --- the load side ------------------------------------------------------------------------------

class Conn:
    """One keep-alive HTTP/1.1 connection; requests are sent one at a time."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self.host, self.port = host, port
        self.auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n%s"
                          b"Content-Length: %d\r\n\r\n" % (path.encode(), self.auth, len(body)) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        return status


class Load:
    def __init__(self, args, url: str, generation: int, token: str | None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.args, self.generation = args, generation
        # connection 0 is rank 0's telemetry alone (a step record never waits behind heartbeats)
        self.conns = [Conn(host, int(port), token) for _ in range(args.connections + 1)]
        self.queues = [asyncio.Queue() for _ in range(args.connections + 1)]
        self.latency: list[float] = []
        self.lateness: list[float] = []
        self.errors: dict[int, int] = {}
        self.sent = 0
        self.silent_rank: int | None = None
        self.measuring = False

    def heartbeat(self, agent: int, rank: int, step: int) -> bytes:
        return (b'{"run_id":"bench","generation":%d,"rank":%d,"step":%d,"pid":%d,"host":"node-%d",'
                b'"phase":"train_step","wall_time":%.6f}' % (self.generation, rank, step, PID_BASE + rank, agent,
                                                             time.time()))

    def record(self, step: int) -> bytes:
        rec = {"run_id": "bench", "generation": self.generation, "step": step, "loss": 3.0, "grad_norm": 1.0,
               "lr": 1e-4, "lr_scale": 1.0, "tokens_per_s": 1e5, "step_seconds": 1.0, "wall_time": time.time()}
        return json.dumps({"run_id": "bench", "generation": self.generation, "records": [rec]}).encode()

    async def worker(self, i: int) -> None:
        conn, q = self.conns[i], self.queues[i]
        while True:
            due, path, make, rank = await q.get()
            if rank is not None and rank == self.silent_rank:
                continue  # queued before the silence began: a silent rank sends nothing more
            sent_at = time.perf_counter()
            try:
                status = await conn.post(path, make())
            except (OSError, asyncio.IncompleteReadError):
                status, conn.writer = -1, None
            done = time.perf_counter()
            if self.measuring:
                self.latency.append(done - sent_at)
                self.lateness.append(max(0.0, sent_at - due))
                self.sent += 1
            if status != 200:
                self.errors[status] = self.errors.get(status, 0) + 1

    async def schedule(self, seconds: float) -> None:
        a = self.args
        n = a.agents * a.ranks
        start = time.perf_counter()
        step = 0
        while time.perf_counter() - start < seconds:
            second = time.perf_counter()
            step += 1
            self.queues[0].put_nowait((second, "/v1/telemetry", lambda s=step: self.record(s), None))
            for k in range(n):
                agent, rank = divmod(k, a.ranks)
                if rank == self.silent_rank:
                    continue
                due = second + k / n
                delay = due - time.perf_counter()
                if delay > 0.002:
                    await asyncio.sleep(delay)
                self.queues[1 + k % (len(self.queues) - 1)].put_nowait(
                    (due, "/v1/heartbeat", lambda ag=agent, r=rank, s=step: self.heartbeat(ag, r, s), rank))
            rest = second + 1.0 - time.perf_counter()
            if rest > 0:
                await asyncio.sleep(rest)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def drive(args, tmp: Path, child: subprocess.Popen) -> dict:
    info = json.loads((tmp / "ready.json").read_text())
    load = Load(args, info["url"], info["generation"], info["token"])
    workers = [asyncio.create_task(load.worker(i)) for i in range(args.connections + 1)]
    sched = asyncio.create_task(load.schedule(args.warmup + args.seconds + args.silent_wait))
    await asyncio.sleep(args.warmup)
    load.measuring = True
    t0, cpu0 = time.perf_counter(), cpu_seconds(child.pid)
    await asyncio.sleep(args.seconds)
    load.measuring = False
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(child.pid) - cpu0
    rss, hwm = rss_mib(child.pid)
    silent = args.ranks - 1
    load.silent_rank = silent
    silenced_at = time.time()
    found_at = None
    while time.time() - silenced_at < args.silent_wait:
        for line in (tmp / "findings.jsonl").read_text().splitlines() if (tmp / "findings.jsonl").exists() else []:
            f = json.loads(line)
            if f["kind"] == "missing_heartbeat" and f["rank"] == silent and f["at"] >= silenced_at:
                found_at = f["at"]
        if found_at is not None:
            break
        await asyncio.sleep(0.05)
    sched.cancel()
    for w in workers:
        w.cancel()
    lags = json.loads((tmp / "lag.json").read_text()) if (tmp / "lag.json").exists() else []
    per_req = cpu / max(1, load.sent)
    return {"offered_per_s": args.agents * args.ranks + 1, "sustained_per_s": load.sent / elapsed,
            "daemon_cpu_share": cpu / elapsed, "daemon_cpu_ms_per_request": per_req * 1e3,
            "one_core_capacity_per_s": 1 / per_req if per_req > 0 else float("nan"),
            "p50_ms": pct(load.latency, 50) * 1e3, "p99_ms": pct(load.latency, 99) * 1e3,
            "max_ms": max(load.latency, default=float("nan")) * 1e3,
            "late_p50_ms": pct(load.lateness, 50) * 1e3, "late_p99_ms": pct(load.lateness, 99) * 1e3,
            "errors": load.errors, "loop_lag_p50_ms": pct(lags, 50) * 1e3, "loop_lag_p99_ms": pct(lags, 99) * 1e3,
            "loop_lag_max_ms": max(lags, default=float("nan")) * 1e3, "rss_mib": rss, "peak_rss_mib": hwm,
            "silent_rank_to_finding_s": None if found_at is None else found_at - silenced_at}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=2048)
    ap.add_argument("--ranks", type=int, default=8, help="ranks per agent (the daemon's nproc_per_node, <= 64)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured steady-state seconds")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--silent-wait", type=float, default=15.0, help="give up on the silent-rank finding after this")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--route", choices=["heartbeat"], default="heartbeat")
    ap.add_argument("--core", type=int, default=0, help="the daemon's CPU core (the load runs on the others)")
    ap.add_argument("--uvloop", action="store_true", help="run the daemon (and the load) on uvloop (must be installed)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_child(args)
        return 0
    others = sorted(os.sched_getaffinity(0) - {args.core}) or [args.core]
    os.sched_setaffinity(0, set(others))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = dict(os.environ, TITAN_SUPERVISOR_LOG_LEVEL="warning")
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "ready.json"), "--ranks",
                                  str(args.ranks), "--core", str(args.core)] + (["--uvloop"] if args.uvloop else []),
                                 env=env,
                                 stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "w"))
        try:
            deadline = time.time() + 60
            while not (tmp / "ready.json").exists():
                if child.poll() is not None or time.time() > deadline:
                    print((tmp / "daemon.log").read_text()[-3000:])
                    return 1
                time.sleep(0.1)
            if args.uvloop:
                import uvloop

                uvloop.install()
            res = asyncio.run(drive(args, tmp, child))
        finally:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
    import importlib.util

    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    print(f"agents {args.agents} x ranks {args.ranks} ({args.agents * args.ranks} ranks), route {args.route}, "
          f"{args.connections} connections, daemon on core {args.core}, uvicorn HTTP parser {parser}, "
          f"loop {'uvloop' if args.uvloop else 'asyncio'}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for k, v in res.items():
        print(f"  {k:26s} {v:.2f}" if isinstance(v, float) else f"  {k:26s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
