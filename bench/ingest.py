"""Ingest at scale: simulated node agents posting liveness to the real daemon on one core.

The daemon is the real one (`supervisor.service.serve`: the FastAPI app under uvicorn, the
journal, the detectors, the reconcile loop, the token store), in a child process pinned to one
CPU core. Only the trainer processes are simulated: its launcher is swapped for
`SimulatedLauncher`, whose generation "owns" every pid of its ``agents x ranks`` ranks (there is
no torchrun); nothing else in the daemon is touched.

Route ``node`` (the default; issue 13): ``--agents`` simulated node agents, each with its own
agent token (a token file of ``--agents`` role-``agent`` entries, as `titan-supervisor token
add NODE --role agent` writes them), post one `NodeReport` a second each: its ``--ranks`` ranks'
states and heartbeats (global ranks ``agent x ranks + r``, distinct pids), node health, over
one keep-alive HTTP/1.1 connection per agent, raw on asyncio streams. The agents are spread over
``--procs`` generator processes pinned away from the daemon's core, their reports spread evenly
over the second. The first report of each agent registers it (before the measured window).

Route ``heartbeat`` (before): one ``/v1/heartbeat`` request per rank per second, from this
process over ``--connections`` connections (ranks share numbers 0..ranks-1 across agents).

Either way "rank 0" also posts one StepRecord a second (steps progress, so no hang is found).
After ``--seconds`` of steady load one rank (the last rank of agent 0) goes silent (its heartbeat
is left out of its node's reports) and the bench waits for the daemon's `missing_heartbeat`
finding naming it: the time from the silence to the finding is reported (the detector's
`heartbeat_timeout`, 5 s by default, is most of it).

Printed: the rate the generators actually offered (requests sent per second while measuring,
and their CPU share: a generator near 100% of its core, or lateness growing, means the figure
is client-bound, not the daemon's) and the rate answered, the daemon's CPU time per request and
the rate one dedicated core would sustain at that cost (the load-independent figure on a shared
machine), p50/p99/max latency (send -> reply) and lateness (scheduled -> sent), errors by
status, the daemon's event-loop lag (p50/p99/max of a 50 ms sleep's overshoot), its RSS, and the
silent-rank time. Usage::

    python bench/ingest.py --agents 2048 --ranks 8 --seconds 15           # node route
    python bench/ingest.py --route heartbeat --agents 64 --ranks 8        # per-rank route
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

    world_size = 8  # set by serve_child: every simulated rank is one of this generation's

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

    def vouches(self, agent_id, rank, pid) -> bool:
        """Every simulated agent runs its ranks (the real `AgentGeneration.vouches` also looks the
        pair up in that node's report: O(ranks of the node), 8 here)."""
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
    from supervisor import log
    from supervisor.service import serve
    from supervisor.settings import Settings

    daemon.LocalLauncher = SimulatedLauncher  # the only stand-in: no trainer processes here
    SimulatedGeneration.world_size = args.ranks * (args.agents if args.route == "node" else 1)
    out = Path(args.serve)
    log.configure(os.environ.get("TITAN_SUPERVISOR_LOG_LEVEL", "info"))  # as `service.run` does
    server = {"port": 0, "rate_limit": {"trainer_per_s": 1e7, "read_per_s": 1e4}}
    if args.route == "node":
        server["token_file"] = str(out.parent / "tokens.jsonl")  # one agent token per simulated agent
    settings = Settings.load(run={"workdir": str(out.parent / "run"), "run_id": "bench", "nproc_per_node": args.ranks},
                             server=server, preflight={"enabled": False})
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
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
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


# --- the node route: generator processes ----------------------------------------------------

def agent_name(i: int) -> str:
    return f"node-{i:05d}"


class NodeAgent:
    """One simulated node agent: its report body, built as bytes (the generator must stay cheap)."""

    GPU = (b'{"index":%d,"name":"NVIDIA H200","mem_used_gib":101.5,"mem_total_gib":139.8,'
           b'"ecc_uncorrected":0,"temperature_c":61.0}')

    def __init__(self, i: int, plan: dict) -> None:
        self.i, self.plan = i, plan
        self.name = agent_name(i).encode()
        n = plan["ranks"]
        self.ranks = [i * n + r for r in range(n)]
        self.seq = 0
        gpus = b",".join(self.GPU % k for k in range(n))
        self.health = (b'{"mem_total_gib":2015.6,"mem_available_gib":1630.2,"disk_free_gib":2810.0,"load_1m":9.5,'
                       b'"gpus":[%s],"kernel":[]}' % gpus)
        self.rank_states = b",".join(b'{"rank":%d,"pid":%d,"state":"running"}' % (r, PID_BASE + r) for r in self.ranks)

    def registration(self) -> bytes:
        """The first report of an agent started before the run: idle, no ranks yet."""
        return (b'{"run_id":"bench","agent_id":"%s","node":"%s","address":"10.1.%d.%d","seq":0,"wall_time":%.6f,'
                b'"state":"idle","health":%s}' % (self.name, self.name, self.i // 256, self.i % 256, time.time(),
                                                 self.health))

    def body(self, step: int, silent: int | None) -> bytes:
        now = time.time()
        gen = self.plan["generation"]
        beats = b",".join(
            b'{"run_id":"bench","generation":%d,"rank":%d,"step":%d,"pid":%d,"host":"%s","phase":"train_step",'
            b'"wall_time":%.6f}' % (gen, r, step, PID_BASE + r, self.name, now) for r in self.ranks if r != silent)
        self.seq += 1
        return (b'{"run_id":"bench","agent_id":"%s","node":"%s","address":"10.1.%d.%d","seq":%d,"wall_time":%.6f,'
                b'"generation":%d,"state":"running","node_rank":%d,"nnodes":%d,"torchrun_pid":%d,"ranks":[%s],'
                b'"exits":[],"heartbeats":[%s],"health":%s}' % (
                    self.name, self.name, self.i // 256, self.i % 256, self.seq, now, gen, self.i,
                    self.plan["agents"], PID_BASE - 1, self.rank_states, beats, self.health))


class GenStats:
    def __init__(self) -> None:
        self.latency: list[float] = []
        self.lateness: list[float] = []
        self.errors: dict[int, int] = {}
        self.sent = 0


async def agent_loop(agent: NodeAgent, conn: Conn, plan: dict, st: GenStats) -> None:
    """Report once a second at this agent's slot of the second, until the plan's end."""
    silent_rank = plan["ranks"] - 1  # agent 0's last rank
    offset = agent.i / plan["agents"]
    tick = 0
    while True:
        due = plan["t0"] + tick + offset
        if due >= plan["end"]:
            return
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tick += 1
        silent = silent_rank if time.time() >= plan["silent_at"] else None
        body = agent.body(tick, silent)
        sent_at = time.time()
        try:
            status = await conn.post("/v1/nodes/report", body)
        except (OSError, asyncio.IncompleteReadError):
            status, conn.writer = -1, None
        except Exception as e:  # noqa: BLE001 - a bench bug must show, not silently stop an agent
            print(f"agent {agent.i}: {e!r}", file=sys.stderr)
            raise
        done = time.time()
        if plan["warm_end"] <= sent_at < plan["measure_end"]:
            st.latency.append(done - sent_at)
            st.lateness.append(max(0.0, sent_at - due))
            st.sent += 1
            if status != 200:
                st.errors[status] = st.errors.get(status, 0) + 1


async def telemetry_loop(conn: Conn, plan: dict) -> None:
    """Rank 0's step records, one a second: the run makes progress (no hang is found)."""
    step = 0
    while time.time() < plan["end"]:
        step += 1
        rec = {"run_id": "bench", "generation": plan["generation"], "step": step, "loss": 3.0, "grad_norm": 1.0,
               "lr": 1e-4, "lr_scale": 1.0, "tokens_per_s": 1e5, "step_seconds": 1.0, "wall_time": time.time()}
        try:
            await conn.post("/v1/telemetry", json.dumps(
                {"run_id": "bench", "generation": plan["generation"], "records": [rec]}).encode())
        except (OSError, asyncio.IncompleteReadError):
            conn.writer = None
        await asyncio.sleep(1.0)


async def generate(plan: dict, index: int, out: Path) -> None:
    host, port = plan["url"].removeprefix("http://").split(":")
    tokens = plan["agent_tokens"]
    mine = range(index, plan["agents"], plan["procs"])
    st = GenStats()
    agents = [(NodeAgent(i, plan), Conn(host, int(port), tokens[i])) for i in mine]
    gate = asyncio.Semaphore(32)  # connect and register a few at a time (no SYN storm at the daemon)

    async def register(agent: NodeAgent, conn: Conn) -> None:
        async with gate:
            status = await conn.post("/v1/nodes/report", agent.registration())
            if status != 200:
                raise RuntimeError(f"agent {agent.i} registration answered {status}")

    await asyncio.gather(*(register(a, c) for a, c in agents))
    (out.parent / f"gen-{index}.ready").write_text("")
    go = out.parent / "go.json"
    while not go.exists():
        await asyncio.sleep(0.05)
    plan.update(json.loads(go.read_text()))
    tasks = [asyncio.create_task(agent_loop(a, c, plan, st)) for a, c in agents]
    if index == 0:
        tasks.append(asyncio.create_task(telemetry_loop(Conn(host, int(port), plan["trainer_token"]), plan)))
    await asyncio.sleep(max(0.0, plan["warm_end"] - time.time()))
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, plan["measure_end"] - time.time()))
    cpu = time.process_time() - cpu0
    out.write_text(json.dumps({"latency": st.latency, "lateness": st.lateness, "sent": st.sent,
                               "errors": {str(k): v for k, v in st.errors.items()}, "cpu_s": cpu}))
    for r in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(r, BaseException):
            print(f"generator {index}: {r!r}", file=sys.stderr)


def write_agent_tokens(path: Path, agents: int) -> list[str]:
    """``agents`` role-agent tokens named as the agents, in the daemon's token-file format."""
    from supervisor.auth import hash_token, new_token

    tokens = [new_token() for _ in range(agents)]
    path.write_text("".join(json.dumps({"name": agent_name(i), "role": "agent", "sha256": hash_token(t)}) + "\n"
                            for i, t in enumerate(tokens)))
    return tokens


async def drive_node(args, tmp: Path, child: subprocess.Popen, tokens: list[str]) -> dict:
    info = json.loads((tmp / "ready.json").read_text())
    plan = {"url": info["url"], "generation": info["generation"], "trainer_token": info["token"],
            "agent_tokens": tokens, "agents": args.agents, "ranks": args.ranks, "procs": args.procs}
    (tmp / "plan.json").write_text(json.dumps(plan))
    gens = [subprocess.Popen([sys.executable, __file__, "--generate", str(i), "--plan", str(tmp / "plan.json")]
                             + (["--uvloop"] if args.uvloop else []), stderr=open(tmp / f"gen-{i}.log", "w"))
            for i in range(args.procs)]
    spy = None
    try:
        # every agent connects and registers (an idle report) first; then the load starts at t0
        registering = time.time()
        while not all((tmp / f"gen-{i}.ready").exists() for i in range(args.procs)):
            if any(g.poll() is not None for g in gens) or time.time() - registering > 600:
                raise RuntimeError("registration failed: " + " | ".join(
                    (tmp / f"gen-{i}.log").read_text()[-500:] for i in range(args.procs)))
            await asyncio.sleep(0.1)
        registered_s = time.time() - registering
        t0 = time.time() + 0.5
        times = {"t0": t0, "warm_end": t0 + args.warmup, "measure_end": t0 + args.warmup + args.seconds}
        times["silent_at"] = times["measure_end"]
        times["end"] = times["silent_at"] + args.silent_wait
        plan.update(times)
        (tmp / "go.json").write_text(json.dumps(times))
        await asyncio.sleep(max(0.0, plan["warm_end"] - time.time()))
        if args.profile:  # py-spy (pinned in the lock file) samples the daemon over the measured window
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(child.pid),
                                    "--duration", str(int(args.seconds)), "--rate", "200", "--format", "raw",
                                    "--output", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = cpu_seconds(child.pid)
        await asyncio.sleep(max(0.0, plan["measure_end"] - time.time()))
        cpu = cpu_seconds(child.pid) - cpu0
        rss, hwm = rss_mib(child.pid)
        found_at = await wait_for_silence_finding(tmp, (args.ranks - 1), plan["silent_at"], plan["end"])
        results = []
        for i in range(args.procs):
            f = tmp / f"gen-{i}.json"
            while not f.exists() and gens[i].poll() is None:
                await asyncio.sleep(0.05)
            if not f.exists():
                raise RuntimeError(f"generator {i} died: {(tmp / f'gen-{i}.log').read_text()[-2000:]}")
            results.append(json.loads(f.read_text()))
    finally:
        if spy is not None:
            spy.wait(30)
        for g in gens:
            g.terminate()
        for g in gens:
            g.wait(10)
    if not any(r["sent"] for r in results):
        print("\n".join((tmp / f"gen-{i}.log").read_text()[-1000:] for i in range(args.procs)), file=sys.stderr)
    latency = [x for r in results for x in r["latency"]]
    lateness = [x for r in results for x in r["lateness"]]
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    sent = sum(r["sent"] for r in results)
    res = summarize(args, sent, args.seconds, cpu, latency, lateness, errors, tmp, rss, hwm, found_at,
                    plan["silent_at"])
    res["sustained_per_s"] = (sent - sum(errors.values())) / args.seconds  # answered 200
    res["offered_per_s"] = sent / args.seconds  # what the generators actually sent (scheduled: args.agents)
    res["scheduled_per_s"] = float(args.agents)
    res["generator_cpu_share"] = [round(r["cpu_s"] / args.seconds, 2) for r in results]
    res["ranks_per_s"] = res["sustained_per_s"] * args.ranks
    res["registration_s"] = registered_s  # every agent's first (idle) report, before the load
    return res


async def wait_for_silence_finding(tmp: Path, rank: int, silenced_at: float, give_up_at: float) -> float | None:
    """When the daemon's `missing_heartbeat` finding for ``rank`` came (None: not by ``give_up_at``)."""
    await asyncio.sleep(max(0.0, silenced_at - time.time()))
    while time.time() < give_up_at:
        path = tmp / "findings.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            f = json.loads(line)
            if f["kind"] == "missing_heartbeat" and f["rank"] == rank and f["at"] >= silenced_at:
                return f["at"]
        await asyncio.sleep(0.05)
    return None


def summarize(args, sent, elapsed, cpu, latency, lateness, errors, tmp, rss, hwm, found_at, silenced_at) -> dict:
    lags = json.loads((tmp / "lag.json").read_text()) if (tmp / "lag.json").exists() else []
    per_req = cpu / max(1, sent)
    return {"sustained_per_s": sent / elapsed,
            "daemon_cpu_share": cpu / elapsed, "daemon_cpu_ms_per_request": per_req * 1e3,
            "one_core_capacity_per_s": 1 / per_req if per_req > 0 else float("nan"),
            "p50_ms": pct(latency, 50) * 1e3, "p99_ms": pct(latency, 99) * 1e3,
            "max_ms": max(latency, default=float("nan")) * 1e3,
            "late_p50_ms": pct(lateness, 50) * 1e3, "late_p99_ms": pct(lateness, 99) * 1e3,
            "errors": errors, "loop_lag_p50_ms": pct(lags, 50) * 1e3, "loop_lag_p99_ms": pct(lags, 99) * 1e3,
            "loop_lag_max_ms": max(lags, default=float("nan")) * 1e3, "rss_mib": rss, "peak_rss_mib": hwm,
            "silent_rank_to_finding_s": None if found_at is None else found_at - silenced_at}


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
    ap.add_argument("--route", choices=["node", "heartbeat"], default="node",
                    help="node: one NodeReport per agent per second (batched); heartbeat: one request per rank")
    ap.add_argument("--agents", type=int, default=2048)
    ap.add_argument("--ranks", type=int, default=8, help="ranks per agent (the daemon's nproc_per_node, <= 64)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured steady-state seconds")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--silent-wait", type=float, default=12.0, help="give up on the silent-rank finding after this")
    ap.add_argument("--procs", type=int, default=4, help="node route: load generator processes")
    ap.add_argument("--connections", type=int, default=64, help="heartbeat route: connections")
    ap.add_argument("--core", type=int, default=0, help="the daemon's CPU core (the load runs on the others)")
    ap.add_argument("--uvloop", action="store_true", help="run the daemon (and the load) on uvloop (must be installed)")
    ap.add_argument("--profile", help="node route: py-spy record the daemon over the measured window into this "
                                      "file (collapsed stacks)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    if args.serve:
        serve_child(args)
        return 0
    if args.generate is not None:
        asyncio.run(generate(json.loads(Path(args.plan).read_text()), args.generate,
                             Path(args.plan).parent / f"gen-{args.generate}.json"))
        return 0
    others = sorted(os.sched_getaffinity(0) - {args.core}) or [args.core]
    os.sched_setaffinity(0, set(others))  # the generators inherit it
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tokens = write_agent_tokens(tmp / "tokens.jsonl", args.agents) if args.route == "node" else []
        env = dict(os.environ, TITAN_SUPERVISOR_LOG_LEVEL="warning")
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "ready.json"), "--ranks",
                                  str(args.ranks), "--agents", str(args.agents), "--route", args.route,
                                  "--core", str(args.core)] + (["--uvloop"] if args.uvloop else []),
                                 env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "w"))
        try:
            deadline = time.time() + 60
            while not (tmp / "ready.json").exists():
                if child.poll() is not None or time.time() > deadline:
                    print((tmp / "daemon.log").read_text()[-3000:])
                    return 1
                time.sleep(0.1)
            if args.route == "node":
                res = asyncio.run(drive_node(args, tmp, child, tokens))
            else:
                res = asyncio.run(drive(args, tmp, child))
        finally:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    import importlib.util

    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    how = (f"{args.procs} generator processes, one keep-alive connection per agent" if args.route == "node"
           else f"{args.connections} connections")
    print(f"agents {args.agents} x ranks {args.ranks} ({args.agents * args.ranks} ranks), route {args.route}, "
          f"{how}, daemon on core {args.core}, uvicorn HTTP parser {parser}, "
          f"loop {'uvloop' if args.uvloop else 'asyncio'}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for k, v in res.items():
        print(f"  {k:26s} {v:.2f}" if isinstance(v, float) else f"  {k:26s} {v}")
    if args.route == "node" and res["offered_per_s"] < 0.95 * res["scheduled_per_s"]:
        busy = max(res["generator_cpu_share"]) > 0.8
        print(f"  NOTE: the generators offered {res['offered_per_s']:.0f} of {res['scheduled_per_s']:.0f} req/s "
              "scheduled: " + ("client-bound (a generator used its core)" if busy else
                               "daemon-bound (each agent waits for its reply, as a real agent does, and the "
                               f"daemon got {res['daemon_cpu_share']:.0%} of a core)")
              + "; the load-independent figure is daemon CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
