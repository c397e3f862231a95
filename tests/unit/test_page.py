"""The page webhook retries a blipping endpoint (real HTTP on loopback)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from supervisor.daemon import Supervisor
from supervisor.settings import Settings


def test_page_is_retried_until_the_endpoint_answers(tmp_path, monkeypatch):
    got, calls = [], []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            calls.append(1)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if len(calls) < 3:  # the pager blips twice
                self.send_response(503)
                self.end_headers()
                return
            got.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/page"
    sup = Supervisor(Settings.load(run={"workdir": str(tmp_path / "w")}, server={"port": 0}))
    import time as _time

    monkeypatch.setattr(_time, "sleep", lambda s: None)  # tenacity's waits, not the HTTP server's
    try:
        assert sup.pager.post(url, {"reason": "budget exhausted"})
        assert len(calls) == 3 and got == [{"reason": "budget exhausted"}]
        assert not sup.pager.post("http://127.0.0.1:9/nothing-listens", {"reason": "x"}, attempts=2)
    finally:
        srv.shutdown()
        sup.journal.close()
