"""Helpers for tests that run real torchtitan training under torchrun (CPU, gloo).

`ScriptedPeer` is a real HTTP server on 127.0.0.1 that speaks the daemon's wire protocol
(supervisor/protocol.py) and replies with directives from a script. It lets the trainer side
be tested on its own; the daemon's own tests use the real daemon.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trainer_cmd(dump: Path, nproc: int = 2, preset: str = "tiny", args: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "training.run", "--preset", preset, "--dump_folder", str(dump), *args]


def trainer_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_trainer(dump: Path, nproc: int = 2, args: list[str] = (), timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(dump, nproc, args=list(args), **kw), env=trainer_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def spool(dump: Path) -> tuple[list[dict], list[dict]]:
    rows = read_jsonl(Path(dump) / "telemetry" / "spool.jsonl")
    return [r for r in rows if "kind" not in r], [r for r in rows if "kind" in r]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    """The last loss recorded for each step (after a rollback, the replayed one)."""
    return {r["step"]: r["loss"] for r in records}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


class ScriptedPeer:
    """Answers telemetry with directives: script maps 'deliver when step >= N' to directives."""

    def __init__(self, script: list[tuple[int, dict]] | None = None) -> None:
        self.script = list(script or [])
        self.records: list[dict] = []
        self.events: list[dict] = []
        self.heartbeats: list[dict] = []
        self.lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = {"accepted": 0, "directives": []}
                with peer.lock:
                    if self.path == "/v1/heartbeat":
                        peer.heartbeats.append(body)
                    else:
                        peer.records += body["records"]
                        peer.events += body["events"]
                        reply["accepted"] = len(body["records"])
                        last = max((r["step"] for r in body["records"]), default=0)
                        due = [d for s, d in peer.script if last >= s]
                        peer.script = [(s, d) for s, d in peer.script if last < s]
                        reply["directives"] = due
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
