"""Run the real daemon (`titan-supervisor run CONFIG`) as a subprocess for drills."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.trainer_harness import ROOT, trainer_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(cfg: dict) -> str:
    lines = []
    for k, v in cfg.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for section, body in cfg.items():
        if not isinstance(body, dict):
            continue
        flat = {k: v for k, v in body.items() if not isinstance(v, dict)}
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in flat.items()]
        for sub, subbody in body.items():
            if isinstance(subbody, dict):
                lines.append(f"\n[{section}.{sub}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in subbody.items()]
    return "\n".join(lines) + "\n"


def drill_config(workdir: Path, port: int, **run) -> dict:
    cfg = {
        "run": {"workdir": str(workdir), "run_id": "drill", "preset": "tiny", "nproc_per_node": 2,
                "checkpoint_interval": 10, **run},
        "training": {"seed": 42},
        "server": {"port": port},
        "policy": {"backoff_base_seconds": 0.5, "backoff_max_seconds": 2.0},
        "detect": {"stall": {"heartbeat_timeout": 2.5}},
    }
    return cfg


def merge_sections(cfg: dict, extra: dict | None) -> dict:
    """``extra``'s sections into ``cfg``: a table's keys are updated, anything else replaced."""
    for section, body in (extra or {}).items():
        if isinstance(body, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(body)
        else:
            cfg[section] = body
    return cfg


class DaemonFactory:
    """Makes drill daemons under one test's tmp_path, each in its own directory, and cleans every
    one up (the drills' ``make_daemon`` fixture)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = Path(tmp)
        self.made: list[Daemon] = []

    def __call__(self, extra: dict | None = None, **run) -> "Daemon":
        n = len(self.made)
        home = self.tmp / f"d{n}"
        home.mkdir()
        d = Daemon(home, merge_sections(drill_config(self.tmp / f"run{n}", free_port(), **run), extra))
        self.made.append(d)
        return d

    def cleanup(self) -> None:
        for d in self.made:
            d.cleanup()


def wait_until(pred, timeout: float, what: str, detail=lambda: "", interval: float = 0.1):
    """`pred()` once it is truthy; an AssertionError naming `what` (and `detail()`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{detail()}")


class Daemon:
    def __init__(self, tmp: Path, cfg: dict) -> None:
        self.tmp = Path(tmp)
        self.cfg = cfg
        self.port = cfg["server"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(cfg["run"]["workdir"])
        self.config_path = self.tmp / "supervisor.toml"
        self.config_path.write_text(to_toml(cfg))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Daemon":
        self.starts += 1
        self.log_path = self.tmp / f"daemon-{self.starts}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", str(self.config_path)],
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                     env=trainer_env(), cwd=ROOT, start_new_session=True)
        return self

    def get(self, path: str, timeout: float = 2.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()

    def status(self) -> dict | None:
        try:
            return self.get("/v1/status")
        except OSError:
            return None

    def wait_for(self, pred, timeout: float, what: str, interval: float = 0.05):
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status()
            if st is not None:
                got = pred(st)
                if got:
                    return got
            if self.proc is not None and self.proc.poll() is not None and not pred({}):
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.log_tail()}")
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status={self.status()}\n{self.log_tail()}")

    def wait_step(self, step: int, timeout: float = 120, ranks: int = 2) -> dict:
        """The status once the run is at `step` or later with `ranks` trainer pids known."""
        return self.wait_for(lambda st: st if st.get("step", 0) >= step and len(st.get("trainer_pids", {})) == ranks
                             else None, timeout, f"step {step}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout}s; status={self.status()}\n{self.log_tail()}")

    def kill(self, sig=signal.SIGKILL) -> None:
        os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def events(self) -> list[dict]:
        out = []
        for i in range(1, self.starts + 1):
            for line in (self.tmp / f"daemon-{i}.log").read_text().splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def journal(self):
        from supervisor.journal import Journal

        return Journal.open(self.workdir / "supervisor" / "journal.sqlite", readonly=True)

    def cleanup(self) -> None:
        """Kill the daemon and any trainer it left (they run in their own sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        import psutil

        for p in psutil.process_iter(["cmdline"]):
            try:
                if str(self.workdir) in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass


class AuthedDaemon(Daemon):
    """The drill daemon read with a bearer token (when tokens are configured, /v1 reads need one)."""

    token = ""

    def get(self, path: str, timeout: float = 2.0):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()
