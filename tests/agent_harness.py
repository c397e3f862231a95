"""Two node agents on one machine as two nodes, and the real daemon over them (drills).

Each agent is its own `titan-supervisor agent` process in its own session with its own token,
node name, work folder and kernel-log file (a plain file the test appends fixture lines to:
this machine has no GPU and its real kernel log has no Xid). The daemon runs with
``launch.backend = "agents"`` and ``nproc_per_node = 1``: 2 nodes x 1 rank, each node's torchrun
joining one c10d rendezvous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

from supervisor.auth import add_token
from tests.daemon_harness import AuthedDaemon, drill_config, free_port
from tests.trainer_harness import ROOT, trainer_env


class AuthDaemon(AuthedDaemon):
    """The drill daemon, read with a viewer token (the token file also holds the agents')."""

    def post(self, path: str, body: dict, token: str, timeout: float = 30.0) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


class NodeAgent:
    def __init__(self, tmp: Path, daemon: AuthDaemon, name: str, token_file: Path) -> None:
        self.name, self.daemon = name, daemon
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kernel_log = self.dir / "kmsg.txt"
        self.kernel_log.write_text("")
        self.token_file = token_file
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "NodeAgent":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "agent", "--daemon", self.daemon.url, "--run-id", "drill",
             "--agent-id", self.name, "--node", self.name, "--address", "127.0.0.1", "--token-file",
             str(self.token_file), "--workdir", str(self.dir), "--kernel-log", str(self.kernel_log),
             "--interval", "0.2"],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=trainer_env(), cwd=ROOT,
            start_new_session=True)
        return self

    def torchrun_pids(self) -> list[int]:
        """The torchrun processes this agent started (its children)."""
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children() if "torch.distributed.run" in
                    " ".join(c.cmdline())]
        except psutil.Error:
            return []

    def kill_node(self) -> None:
        """The whole node dies: SIGKILL its agent and every process of its ranks' session."""
        groups = self.torchrun_pids()
        os.kill(self.proc.pid, signal.SIGKILL)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_node()


def cluster(tmp: Path, nodes=("node-a", "node-b"), *, steps: int = 60, extra: dict | None = None,
            **run) -> tuple[AuthDaemon, list[NodeAgent]]:
    """A daemon over ``nodes`` (not started) and one agent per node (not started)."""
    tokens = tmp / "tokens.jsonl"
    agent_tokens = {}
    for n in nodes:
        agent_tokens[n] = tmp / f"{n}.token"
        agent_tokens[n].write_text(add_token(tokens, n, "agent"))
    viewer = add_token(tokens, "drill-viewer", "viewer")
    operator = add_token(tokens, "drill-operator", "operator")
    cfg = drill_config(tmp / "run", free_port(), steps=steps, nproc_per_node=1, **run)
    cfg["server"]["token_file"] = str(tokens)
    cfg["launch"] = {"backend": "agents", "agents": {
        "nodes": list(nodes), "lost_after_s": 3.0, "report_interval_s": 0.2, "register_timeout_s": 60.0,
        "rejoin_wait_s": 1.0, "confirm_timeout_s": 60.0}}
    for section, body in (extra or {}).items():
        if isinstance(body, dict) and isinstance(cfg.get(section), dict):
            for k, v in body.items():
                if isinstance(v, dict) and isinstance(cfg[section].get(k), dict):
                    cfg[section][k].update(v)
                else:
                    cfg[section][k] = v
        else:
            cfg[section] = body
    d = AuthDaemon(tmp, cfg)
    d.token, d.operator = viewer, operator
    return d, [NodeAgent(tmp, d, n, agent_tokens[n]) for n in nodes]
