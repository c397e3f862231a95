"""A stand-in for Grafana's annotation API (no Grafana server can run on this machine).

It records every request and answers like Grafana's `POST /api/annotations` (bearer token, JSON
with `time` in epoch ms, `tags`, `text`, optional `dashboardUID`): 200 with an id when the body
has that shape, 400 naming the problem otherwise, 503 when told to fail. `BlackHole` accepts TCP
connections and never answers: a Grafana that hangs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeGrafana:
    def __init__(self, fail_first: int = 0, always_fail: bool = False, delay_s: float = 0.0,
                 first_delay_s: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.accepted: list[dict] = []
        self.fail_first, self.always_fail, self.delay_s = fail_first, always_fail, delay_s
        self.first_delay_s = first_delay_s  # the first request alone is held this long (a hung Grafana)
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                time.sleep(outer.first_delay_s if len(outer.requests) == 1 else outer.delay_s)
                if outer.always_fail or len(outer.requests) <= outer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                problems = outer.check(self.path, body)
                code = 400 if problems else 200
                reply = {"message": "; ".join(problems)} if problems else {"message": "Annotation added", "id": len(outer.accepted) + 1}
                if not problems:
                    outer.accepted.append(body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def check(path: str, body: dict) -> list[str]:
        """Grafana's POST /api/annotations contract (docs: HTTP API, annotations)."""
        p = []
        if path != "/api/annotations":
            p.append(f"path {path}")
        if not isinstance(body.get("time"), int) or body["time"] < 10 ** 12:
            p.append("time must be epoch milliseconds")
        if not isinstance(body.get("tags"), list) or not all(isinstance(t, str) for t in body["tags"]):
            p.append("tags must be a list of strings")
        if not isinstance(body.get("text"), str) or not body["text"]:
            p.append("text required")
        if set(body) - {"time", "timeEnd", "tags", "text", "panelId", "dashboardUID", "dashboardId"}:
            p.append(f"unknown fields {set(body)}")
        return p

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Listens on loopback and never reads or answers: every request to it hangs until the
    client's own timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()
