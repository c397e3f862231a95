"""The real observability stack on loopback for the end-to-end test: Prometheus and Alertmanager
from apt, a webhook receiver that records what Alertmanager delivers, and a stand-in DCGM exporter.

Why each piece is what it is:
- Prometheus 2.42 and Alertmanager 0.25 are the real binaries (`make obs-tools`); `BINARIES`
  names them so the test can skip, and say why, where they are missing.
- The rules are a *test-only copy* of alerts/rules/titan.yml (`rules_copy`): every `for:` is 0s,
  every group evaluates every 0.5 s, and `TitanRankHeartbeatStale`'s threshold is 2 s instead of
  60 s, because a CPU run restarts a generation in ~8 s where a GPU cluster takes minutes. The
  expressions are otherwise the committed ones, and a change to them that the copy cannot
  follow fails loudly instead of testing something else.
- The Alertmanager configuration is alerts/alertmanager.yml itself with its URLs pointed at the
  local receiver and the daemon, its credentials file at a real operator token, and its
  group waits/intervals shortened (`alertmanager_copy`): routing, grouping and inhibition
  are the example's.
- `DcgmExporter` serves the DCGM exporter's metric (`DCGM_FI_DEV_XID_ERRORS` with its labels):
  there is no GPU and so no dcgm-exporter here. It is the one stand-in.

Every process is started with a deadline and stopped (terminate, then kill) by `Stack.close`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER_BIN = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
BINARIES = {"prometheus": shutil.which("prometheus"), "alertmanager": ALERTMANAGER_BIN}
HEARTBEAT_STALE = ("titan_rank_heartbeat_age_seconds > 60", "titan_rank_heartbeat_age_seconds > 2")
EVAL = "500ms"


def missing_binaries() -> list[str]:
    return [name for name, path in BINARIES.items() if path is None]


def rules_copy(dst: Path) -> Path:
    """alerts/rules/titan.yml with `for: 0s`, 0.5 s evaluation and a 2 s heartbeat threshold."""
    doc = yaml.safe_load((ROOT / "alerts" / "rules" / "titan.yml").read_text())
    found = False
    for group in doc["groups"]:
        group["interval"] = EVAL
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
            if rule.get("alert") == "TitanRankHeartbeatStale":
                assert HEARTBEAT_STALE[0] in rule["expr"], f"the rule changed: {rule['expr']!r}; update the e2e copy"
                rule["expr"] = rule["expr"].replace(*HEARTBEAT_STALE)
                found = True
    assert found, "TitanRankHeartbeatStale is gone from alerts/rules/titan.yml; update the e2e test"
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def alertmanager_copy(dst: Path, *, receiver_url: str, daemon_url: str, token_file: Path) -> Path:
    """alerts/alertmanager.yml pointed at loopback, with 0 s group waits and 1 s intervals."""
    doc = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    routes = [doc["route"], *doc["route"].get("routes", [])]
    for r in routes:
        r["group_wait"], r["group_interval"], r["repeat_interval"] = "0s", "1s", "1h"
    for rc in doc["receivers"]:
        for wh in rc.get("webhook_configs", []):
            path = urllib.parse.urlsplit(wh["url"]).path
            if path == "/v1/alerts":
                wh["url"] = daemon_url + path
                wh["http_config"]["authorization"]["credentials_file"] = str(token_file)
            else:
                wh["url"] = receiver_url + path
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


class Receiver:
    """Records every webhook Alertmanager POSTs: (path, payload)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts.append((self.path, body))
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, path: str) -> list[tuple[str, str]]:
        """(alertname, status) of every alert delivered to `path`, in order."""
        return [(a["labels"]["alertname"], a["status"]) for p, body in list(self.posts) if p == path
                for a in body["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DcgmExporter:
    """Serves `DCGM_FI_DEV_XID_ERRORS` as dcgm-exporter names and labels it (no GPU here)."""

    def __init__(self, hostname: str) -> None:
        self.xid = 0
        self.hostname = hostname
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                body = ("# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.\n"
                        "# TYPE DCGM_FI_DEV_XID_ERRORS gauge\n"
                        f'DCGM_FI_DEV_XID_ERRORS{{gpu="0",UUID="GPU-5fd4b1c6-0000-0000-0000-000000000000",'
                        f'device="nvidia0",modelName="NVIDIA H200",Hostname="{outer.hostname}",'
                        f'DCGM_FI_DRIVER_VERSION="560.35.03"}} {outer.xid}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stack:
    """Prometheus scraping the daemon and the DCGM stand-in, alerting to Alertmanager."""

    def __init__(self, tmp: Path, *, daemon_target: str, run_id: str, dcgm_target: str, rules: Path,
                 alertmanager_config: Path, ports: tuple[int, int]) -> None:
        self.tmp = tmp
        self.prom_port, self.am_port = ports
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        self.am_url = f"http://127.0.0.1:{self.am_port}"
        cfg = {
            "global": {"scrape_interval": EVAL, "scrape_timeout": "450ms", "evaluation_interval": EVAL},
            "rule_files": [str(rules)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.am_port}"]}]}]},
            "scrape_configs": [
                {"job_name": "titan-supervisor",
                 "static_configs": [{"targets": [daemon_target], "labels": {"run_id": run_id}}]},
                {"job_name": "dcgm-exporter", "static_configs": [{"targets": [dcgm_target]}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.procs: list[subprocess.Popen] = []
        self._start("alertmanager", [ALERTMANAGER_BIN, f"--config.file={alertmanager_config}",
                                     f"--storage.path={tmp / 'am-data'}", f"--web.listen-address=127.0.0.1:{self.am_port}",
                                     "--cluster.listen-address=", "--log.level=warn"])
        self._start("prometheus", [BINARIES["prometheus"], f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'prom-data'}",
                                   f"--web.listen-address=127.0.0.1:{self.prom_port}",
                                   "--rules.alert.resend-delay=1s", "--log.level=warn"])
        self._wait_ready(self.am_url + "/-/ready", "alertmanager")
        self._wait_ready(self.prom_url + "/-/ready", "prometheus")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_ready(self, url: str, name: str, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"{name} not ready in {timeout}s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text()[-3000:]
        except OSError:
            return ""

    def api(self, path: str, **params) -> dict:
        url = f"{self.prom_url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def raw(self, selector: str, window: str = "15m") -> dict[float, float]:
        """{scrape timestamp: value} of one series' raw samples (a range-vector instant query)."""
        result = self.api("query", query=f"{selector}[{window}]")["result"]
        assert len(result) == 1, f"{selector}: expected one series, got {result}"
        return {float(t): float(v) for t, v in result[0]["values"]}

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
