"""`titan-supervisor agent`: the loop of one node agent.

Every `report_interval_s` (the daemon may change it in its reply) the agent polls its ranks,
collects node health, posts one `NodeReport` to ``/v1/nodes/report`` with its own token, and
reconciles towards the `NodeOrder` in the reply: run generation g (start it once: a generation
that ended is never restarted by the agent), run nothing (stop), dump stacks for an id. The
daemon decides; the agent only does and tells.

Failure model:
- The daemon is down or slow: the agent keeps its ranks running and keeps trying; rank exits
  it could not deliver are kept (bounded, oldest dropped) and sent with the next report that
  gets through. A restarted daemon re-adopts what the agents report running.
- A stop blocks for up to its grace, a stack dump for up to py-spy's timeout: both run in a
  thread, so reports keep flowing (the daemon would otherwise take a busy node for a lost one).
- The agent itself is stopped or dies: its ranks keep training (they run in their own session;
  systemd's ``KillMode=process``), and the next agent process adopts them from its state file
  (`NodeRun.adopt`: the torchrun pid and its start time, so a reused pid is never adopted). If
  no agent comes back, the daemon takes the silent node for lost and stops the job everywhere.
- Only its own process tree is ever signalled (see `supervisor.agent.ranks`).
- Heartbeats: its ranks beat to the agent's relay (`supervisor.agent.relay`: a unix socket in a
  0700 directory, a fresh secret per generation in their environment), and each report carries
  the latest beat of each rank. A dead agent silences its ranks at the daemon too (the daemon
  takes no per-rank heartbeats under this backend): the node is lost, never half-alive.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from supervisor.agent.health import HealthProbe
from supervisor.agent.ranks import NodeRun
from supervisor.agent.relay import ENV_SOCKET, ENV_TOKEN, HeartbeatRelay
from supervisor.config_types import PositiveInt, Seconds, doc, quoted_scalars
from supervisor.hosts import is_address
from supervisor.launch.local import LauncherConfig

MAX_PENDING_EXITS = 1024
# under the daemon's 1 MiB cap on a report (supervisor/node_api.py MAX_REPORT_BODY), with room for
# the fields `fit_report` does not shrink (a heartbeat per rank, health)
REPORT_BUDGET = 900 * 1024


def encode_report(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def fit_report(body: dict, budget: int = REPORT_BUDGET) -> dict:
    """``body`` made to fit ``budget`` bytes, so a report is never refused for its size: a report
    the daemon refuses (413) keeps every exit pending and was refused again at every later tick,
    until the node counted as lost and its crash evidence never arrived (found by an adversarial
    review: two rank exits whose 60 log lines were long non-ASCII text). In order, as needed: each
    exit's log tail cut to its last 10 lines of 500 characters, the stacks cut to their tail, and
    exits left for the next report (`Agent.tick` removes only the exits it sent). Pure."""
    if len(encode_report(body)) <= budget:
        return body
    out = dict(body)
    out["exits"] = [{**ex, "log_tail": [x[:500] for x in (ex.get("log_tail") or [])[-10:]]} for ex in body["exits"]]
    size = len(encode_report(out))
    if size > budget and out.get("stacks"):
        keep = max(0, len(out["stacks"]) - (size - budget) - 1024)
        out["stacks"] = out["stacks"][len(out["stacks"]) - keep:] if keep else ""
        size = len(encode_report(out))
    while size > budget and out["exits"]:
        out["exits"] = out["exits"][: len(out["exits"]) // 2]
        size = len(encode_report(out))
    return out
ENV_PREFIX = "TITAN_SUPERVISOR_AGENT__"


@dataclass
class AgentConfig:
    """One node agent: the ``[agent]`` table of its TOML file, then ``TITAN_SUPERVISOR_AGENT__<FIELD>``
    environment, then the flags of `titan-supervisor agent` (see `load_agent_config`)."""

    daemon_url: Annotated[str, doc("the supervisor daemon, e.g. http://supervisor:8642")]
    run_id: Annotated[str, doc("the run this node serves (the daemon refuses another run's agent)")]
    agent_id: Annotated[str, doc("this agent's name: the name of its agent token; empty: the node's name")] = ""
    workdir: Annotated[Path, doc("where the agent keeps its state and its ranks' logs (<workdir>/agent-<id>/)")] = \
        Path("/var/lib/titan-supervisor-agent")
    node: Annotated[str, doc("the node's name (exclusion and the policy count by it); empty: the host name")] = ""
    address: Annotated[str, doc("address the other nodes reach this one at (rendezvous host); empty: the "
                                "host's FQDN")] = ""
    token_file: Annotated[str, doc("file holding this agent's token (role agent); empty: none (loopback "
                                   "daemon without tokens)")] = ""
    python: Annotated[str, doc("the Python that runs torchrun on this node; empty: the daemon's choice")] = ""
    kernel_log: Annotated[str, doc("kernel log source: /dev/kmsg, dmesg, a file, or none")] = "/dev/kmsg"
    report_interval_s: Annotated[Seconds, doc("seconds between reports until the daemon says otherwise")] = 1.0
    request_timeout_s: Annotated[Seconds, doc("timeout of one report")] = 5.0
    max_interval_s: Annotated[PositiveInt, doc("the longest report interval a reply may set")] = 60
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def __post_init__(self) -> None:
        # what the daemon accepts as an address (protocol.NodeReport): a host name or a bare IP
        if self.address and not is_address(self.address):
            raise ValueError(f"address {self.address[:64]!r} is no host name or bare IP address")


def load_agent_config(path: str | None, environ: dict, overrides: dict) -> AgentConfig:
    """The ``[agent]`` table of ``path``, then ``TITAN_SUPERVISOR_AGENT__*``, then ``overrides``
    (flags; None = unset). Raises ValueError naming the field on a mistake."""
    import tomllib

    from pydantic import TypeAdapter, ValidationError

    values: dict = {}
    if path:
        with open(path, "rb") as f:
            doc_ = tomllib.load(f)
        unknown = set(doc_) - {"agent"}
        if unknown:
            raise ValueError(f"{path}: only an [agent] table belongs here, not {sorted(unknown)}")
        table = doc_.get("agent") or {}
        quoted = quoted_scalars(table, AgentConfig, "agent.") if isinstance(table, dict) else []
        if quoted:
            raise ValueError("; ".join(quoted))
        values.update(table)
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            values[key[len(ENV_PREFIX):].lower()] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = set(AgentConfig.__dataclass_fields__)
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown agent setting(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return TypeAdapter(AgentConfig).validate_python(values)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"agent.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


class Agent:
    def __init__(self, config: AgentConfig, *, log=None) -> None:
        self.config = c = config
        self.node = c.node or socket.gethostname()
        self.agent_id = c.agent_id or self.node
        self.address = c.address or socket.getfqdn()
        self.dir = Path(c.workdir) / f"agent-{self.agent_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.token = Path(c.token_file).read_text().strip() if c.token_file else ""
        self._log = log or (lambda msg, **kw: print(json.dumps({"event": msg, "agent": self.agent_id, **kw},
                                                                default=str), file=sys.stderr, flush=True))
        self.health = HealthProbe(self.dir, c.kernel_log, log=lambda problem: self._log("health source off",
                                                                                        why=problem))
        self.interval = c.report_interval_s
        self.run: NodeRun | None = None
        self.started: set[tuple] = set()  # (generation, argv) this agent has started (never started twice)
        self._stopper: threading.Thread | None = None
        self._pending_exits: list[dict] = []
        self._stacks: tuple[str, str] | None = None  # (id, text) to send
        self._stacks_done: set[str] = set()
        self._seq = 0
        self.stop_event = threading.Event()
        self._wake = threading.Event()  # set on stop and when the relay wants an early report
        self.run = NodeRun.adopt(self.dir, config=c.launcher)  # ranks a previous agent process left running
        if self.run is not None:
            self.started.add((self.run.generation, tuple(self.run.order.argv)))
            self._log("adopted running generation", generation=self.run.generation, torchrun_pid=self.run.torchrun_pid)
        self.relay = self._start_relay(c)

    def _start_relay(self, c: AgentConfig) -> HeartbeatRelay:
        """The heartbeat relay, on the socket an adopted run's ranks were given if there is one."""
        adopted = self.run.relay_env if self.run is not None else {}
        kw = dict(run_id=c.run_id, node=self.node, rank_pid=self._rank_pid, on_change=self._wake.set)
        try:
            relay = HeartbeatRelay(path=adopted.get(ENV_SOCKET) or HeartbeatRelay.socket_path(self.dir), **kw)
        except OSError as e:  # the adopted ranks' socket cannot be bound: they will be found silent
            self._log("heartbeat relay socket unavailable", path=adopted.get(ENV_SOCKET), error=str(e)[:200])
            relay = HeartbeatRelay(path=HeartbeatRelay.socket_path(self.dir), **kw)
        if self.run is not None:
            relay.open(self.run.generation, secret=adopted.get(ENV_TOKEN))
        return relay.start()

    def _rank_pid(self, rank: int) -> int | None:
        run = self.run
        return run.rank_pid(rank) if run is not None else None

    # -- one round ----------------------------------------------------------------------------------
    def report(self) -> dict:
        run = self.run
        if run is not None:
            self._pending_exits += run.poll()
            del self._pending_exits[:-MAX_PENDING_EXITS]
        state, code = run.state() if run is not None else ("idle", None)
        body = {"run_id": self.config.run_id, "agent_id": self.agent_id, "node": self.node,
                "address": self.address, "seq": self._seq, "wall_time": time.time(),
                "generation": run.generation if run is not None else -1, "state": state,
                "node_rank": run.order.node_rank if run is not None else None,
                "nnodes": run.order.nnodes if run is not None else None,
                "torchrun_pid": run.torchrun_pid if run is not None else None, "exit_code": code,
                "ranks": run.ranks() if run is not None else [], "exits": list(self._pending_exits),
                "heartbeats": self.relay.take(), "health": self.health.collect()}
        if self._stacks is not None:
            body["stacks_id"], body["stacks"] = self._stacks[0], self._stacks[1][-200_000:]
        return fit_report(body)

    def post(self, body: dict) -> dict | None:
        req = urllib.request.Request(self.config.daemon_url.rstrip("/") + "/v1/nodes/report",
                                     data=encode_report(body), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.config.request_timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            self._log("report refused", status=e.code, body=e.read()[:500].decode(errors="replace"))
        except (OSError, ValueError) as e:
            self._log("daemon unreachable", error=str(e)[:300])
        return None

    def tick(self) -> None:
        body = self.report()
        self._seq += 1
        reply = self.post(body)
        if reply is None:
            self.relay.put_back(body["heartbeats"])
            return
        self._pending_exits = self._pending_exits[len(body["exits"]):]  # delivered
        if body.get("stacks_id") and self._stacks is not None and self._stacks[0] == body["stacks_id"]:
            self._stacks = None
        self.interval = min(float(reply.get("report_interval_s") or self.interval), self.config.max_interval_s)
        self.apply(reply.get("order"))

    def apply(self, order: dict | None) -> None:
        """Reconcile towards the daemon's order for this node."""
        from supervisor.protocol import NodeOrder

        if order is None:
            return
        o = NodeOrder.model_validate(order)
        if o.stacks_id and o.stacks_id not in self._stacks_done:
            self._stacks_done.add(o.stacks_id)
            # py-spy on a stopped rank can take its whole timeout: dump in a thread, keep reporting
            threading.Thread(target=self._dump, args=(o.stacks_id, self.run), daemon=True, name="agent-stacks").start()
        if self._stopper is not None and self._stopper.is_alive():
            return  # a stop is under way: act on the order once it is done
        run = self.run
        running = run is not None and run.state()[0] == "running"
        # an order is (generation, argv): a restarted daemon may order the same generation number
        # again with a fresh rendezvous, and then the old start must go
        other = run is not None and (run.generation != o.generation or (o.argv and list(run.order.argv) != o.argv))
        if o.generation == -1 or other:
            if running:
                self._stop_async(run, o.stop_grace_s)
                return
        key = (o.generation, tuple(o.argv))
        if o.generation >= 0 and o.argv and key not in self.started:
            self.started.add(key)
            self.run = NodeRun(o, self.dir, python=self.config.python, config=self.config.launcher,
                               relay_env=self.relay.open(o.generation))
            self.run.start()
            self._log("generation started", generation=o.generation, node_rank=o.node_rank, nnodes=o.nnodes,
                      torchrun_pid=self.run.torchrun_pid, failed=self.run.failed)

    def _dump(self, stacks_id: str, run: NodeRun | None) -> None:
        try:
            text = run.dump_stacks() if run is not None else "(no ranks running)"
        except Exception as e:  # noqa: BLE001 - the daemon must get an answer either way
            text = f"(stack dump failed: {e!r})"
        self._stacks = (stacks_id, text)

    def _stop_async(self, run: NodeRun, grace_s: float) -> None:
        run.stopping = True
        self._log("stopping generation", generation=run.generation, grace_s=grace_s)
        self._stopper = threading.Thread(target=run.stop, args=(grace_s,), daemon=True, name="agent-stop")
        self._stopper.start()

    # -- the loop -----------------------------------------------------------------------------------
    def serve(self) -> int:
        self._log("agent started", node=self.node, address=self.address, daemon=self.config.daemon_url)
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - one bad round must not end the agent
                self._log("agent round failed", error=repr(e)[:500])
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - started)))
            self._wake.clear()
        if self.run is not None and self.run.state()[0] == "running":
            # Crash-only, like the daemon (systemd KillMode=process): the ranks keep training and the
            # next agent process adopts them; the daemon stops them if this node stays silent.
            self._log("agent exiting; its ranks keep running", generation=self.run.generation)
        if self._stopper is not None:
            self._stopper.join()
        self.relay.close()
        return 0

    def shutdown(self) -> None:
        self.stop_event.set()
        self._wake.set()


def run_agent(config: AgentConfig) -> int:
    agent = Agent(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.shutdown())
    return agent.serve()
