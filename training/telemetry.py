"""Telemetry from a rank to the supervisor: never blocks training.

Failure model: the daemon may be absent, dead, slow or restarting. The training thread only
(a) appends the record to the local JSON-lines spool (rank 0; a buffered write) and (b) puts
it on a bounded queue. A background thread posts batches and heartbeats; when the queue is
full the newest record is dropped and counted, and the count rides on the next record that
gets through. Directives from the reply are kept for the training thread to take at its next
step boundary. The spool is complete even when the network is not, so a restarted daemon can
re-read what it missed.

Heartbeats go to the daemon (``/v1/heartbeat``), or, when the rank's node agent put
``TITAN_SUPERVISOR_RELAY_SOCKET`` and ``TITAN_SUPERVISOR_RELAY_TOKEN`` in its environment
(`launch.backend = "agents"`), to that agent's relay (a unix socket), which sends them in its node's
report (supervisor/agent/relay.py). A beat the relay does not take (agent gone, refused) is
dropped and counted (`heartbeats_dropped`), with one short try per beat: it never holds up the
records, and it never falls back to the daemon (two paths would hide a dead agent).

Ranks are global: in torchft mode group g's local rank r beats as ``g * ranks per group + r``, so
the daemon's stall detector hears every group; only global rank 0 (group 0's) posts step records
and events, which keeps group 0's stream the run's (docs/architecture.md, "torchft mode").
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the node agent's heartbeat relay)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


@dataclass
class TelemetryConfig:
    url: str = ""  # http://127.0.0.1:PORT ; empty: no supervisor
    run_id: str = "local"
    generation: int = 0
    rank: int = 0  # the global rank: in torchft mode replica_id * ranks per group + local rank
    spool_path: str = ""  # empty: no spool (the trainer gives one to each group's local rank 0)
    queue_size: int = 4096
    batch_max: int = 256
    post_timeout_s: float = 2.0
    heartbeat_s: float = 1.0
    retry_backoff_s: float = 0.5
    relay_timeout_s: float = 0.5  # one heartbeat to the node agent's relay


class TelemetryClient:
    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._directives: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.dropped = 0
        self._dropped_reported = 0
        self.sent = 0
        self.heartbeats_dropped = 0
        self.last_step = 0
        self.phase = "starting"
        self.host = socket.gethostname()
        self._spool = None
        # Step records and events are the run's stream: only global rank 0 posts them. Another
        # group's local rank 0 keeps its own spool and posts heartbeats only (torchft mode).
        self.posts_records = config.rank == 0
        if config.spool_path:
            Path(config.spool_path).parent.mkdir(parents=True, exist_ok=True)
            # line-buffered: a SIGKILLed rank loses no line (the page cache keeps it; no fsync)
            self._spool = open(config.spool_path, "a", buffering=1)
        self._thread: threading.Thread | None = None
        if config.url:
            parsed = urlparse(config.url)
            if parsed.scheme != "http" or not parsed.hostname:
                raise ValueError(f"supervisor url must look like http://HOST:PORT, got {config.url!r}")
            self._host, self._port = parsed.hostname, parsed.port or 80
            self._headers = {"Content-Type": "application/json"}
            token = os.environ.get("TITAN_SUPERVISOR_TRAINER_TOKEN")  # set by the daemon when it requires one
            if token:
                self._headers["Authorization"] = f"Bearer {token}"
            self._conn: http.client.HTTPConnection | None = None
            self._relay = None  # (socket path, headers) of the node agent's relay, if it gave us one
            relay_socket, relay_token = os.environ.get("TITAN_SUPERVISOR_RELAY_SOCKET"), os.environ.get(
                "TITAN_SUPERVISOR_RELAY_TOKEN")
            if relay_socket and relay_token:
                self._relay = (relay_socket, {"Content-Type": "application/json",
                                              "Authorization": f"Bearer {relay_token}"})
            self._relay_conn: http.client.HTTPConnection | None = None
            self._thread = threading.Thread(target=self._run, name="titan-telemetry", daemon=True)
            self._thread.start()

    # --- training thread -------------------------------------------------------------------
    def record(self, rec: dict) -> None:
        rec["dropped_records"] = self.dropped
        rec["dropped_heartbeats"] = self.heartbeats_dropped
        self._write_spool(rec)
        self._enqueue(("record", rec))

    def event(self, ev: dict) -> None:
        self._write_spool(ev)
        self._enqueue(("event", ev))

    def take_directives(self) -> list[dict]:
        if not self._directives:
            return []
        with self._lock:
            out, self._directives = self._directives, []
        return out

    def _write_spool(self, obj: dict) -> None:
        if self._spool is not None:
            self._spool.write(json.dumps(obj, allow_nan=True) + "\n")

    def _enqueue(self, item) -> None:
        if self._thread is None or not self.posts_records:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 3.0) -> None:
        """Send what is queued (bounded by ``timeout_s``), then stop the thread."""
        if self._thread is not None:
            deadline = time.monotonic() + timeout_s
            while not self._queue.empty() and time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(0.02)
            self._stop.set()
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # --- background thread -----------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict | None:
        data = json.dumps(body, allow_nan=True).encode()
        for attempt in (0, 1):  # one reconnect for a stale keep-alive connection
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.config.post_timeout_s)
                self._conn.request("POST", path, body=data, headers=self._headers)
                resp = self._conn.getresponse()
                payload = resp.read()
                if resp.status != 200:
                    return None
                return json.loads(payload) if payload else {}
            except (OSError, http.client.HTTPException, ValueError):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 1:
                    raise
        return None

    def _heartbeat(self) -> None:
        c = self.config
        body = {"run_id": c.run_id, "generation": c.generation, "rank": c.rank, "step": self.last_step,
                "pid": os.getpid(), "host": self.host, "wall_time": time.time(), "phase": self.phase}
        if self._relay is None:
            self._post("/v1/heartbeat", body)
        else:
            self._relay_beat(body)

    def _relay_beat(self, body: dict) -> None:
        """One try at the node agent's relay; a beat it does not take is dropped and counted."""
        path, headers = self._relay
        try:
            if self._relay_conn is None:
                self._relay_conn = _UnixHTTPConnection(path, timeout=self.config.relay_timeout_s)
            self._relay_conn.request("POST", "/v1/heartbeat", body=json.dumps(body).encode(), headers=headers)
            resp = self._relay_conn.getresponse()
            resp.read()
            if resp.status != 200:
                self.heartbeats_dropped += 1
        except (OSError, http.client.HTTPException):
            self.heartbeats_dropped += 1
            if self._relay_conn is not None:
                self._relay_conn.close()
            self._relay_conn = None

    def _run(self) -> None:
        c = self.config
        next_hb = 0.0
        pending: list[tuple[str, dict]] = []
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=min(0.05, c.heartbeat_s))
                pending.append(item)
                while len(pending) < c.batch_max:
                    pending.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            try:
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + c.heartbeat_s
                    self._heartbeat()
                if pending and self.posts_records:
                    records = [p for k, p in pending if k == "record"]
                    events = [p for k, p in pending if k == "event"]
                    reply = self._post("/v1/telemetry", {
                        "version": 1, "run_id": c.run_id, "generation": c.generation,
                        "records": records, "events": events,
                    })
                    self.sent += len(records)
                    pending = []
                    if reply and reply.get("directives"):
                        with self._lock:
                            self._directives.extend(reply["directives"])
            except (OSError, http.client.HTTPException, ValueError):
                # Daemon absent: keep at most one batch of pending records, count the rest.
                if len(pending) > c.batch_max:
                    self.dropped += len(pending) - c.batch_max
                    pending = pending[-c.batch_max:]
                self._stop.wait(c.retry_backoff_s)
