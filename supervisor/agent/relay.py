"""The node agent's heartbeat relay: its ranks beat to it, it sends them to the daemon in its report.

Why: at 2,048 nodes x 8 ranks, one request per rank per beat is 16,384 requests a second at the
daemon; batched per node it is 2,048 (issue 13). The agent already posts one `NodeReport` per
interval; the relay keeps each of its ranks' latest heartbeat and `take`s them into that report
(`NodeReport.heartbeats`), where the daemon feeds them through the same checks and detectors as
``/v1/heartbeat`` (supervisor/node_api.py).

Who can post: the relay listens on a unix socket in a directory only the agent's user can enter
(``<agent dir>/relay/``, mode 0700; ``/tmp/titan-relay-<uid>-<hash of the agent dir>/``, the
user's own, when that path is too long for a socket): no other user can even connect, so none can tie it up or feed it. The same
user can kill the ranks anyway (outside the threat model, README "Security"). Each generation the
agent starts gets a fresh random secret, handed to its ranks in their environment
(``TITAN_SUPERVISOR_RELAY_SOCKET`` and ``TITAN_SUPERVISOR_RELAY_TOKEN``, never on a command line):
a rank of an older generation, or a careless script, is refused (401); the daemon trusts that
secret for nothing. Ranks adopted by a restarted agent keep their socket and secret (saved in
the run's 0600 state file). A heartbeat is kept only for a rank this agent runs, with the pid
this agent found for that rank in /proc (the child of its own torchrun whose ``RANK`` it is):
the relay holds at most one heartbeat per rank of its node, and never vouches for a process it
did not start. The agent stamps its own node name as the heartbeat's
``host`` (the daemon accepts only its own node's heartbeats in a report).

Bad input changes nothing and gets a specific answer: a body over `MAX_BODY` (413), not JSON or
not a `Heartbeat` (400 naming the field), another run or generation (409), a rank or pid this
node does not run (403). Connections are bounded (`MAX_CONNECTIONS`, idle ones time out), so a
careless process of the same user cannot tie up the agent either.

Failure model: the relay runs in the agent's process. If the agent dies, its ranks' heartbeats
stop reaching the daemon (they are not sent anywhere else: the daemon refuses per-rank
heartbeats under the agents backend) and the node, silent, is lost after ``lost_after_s``: one
path, never two. A rank that cannot reach its agent drops the beat and goes on training
(training/telemetry.py).

Promptness: the agent reports every ``report_interval_s`` (1 s, the ranks' beat), so a heartbeat
reaches the daemon at most one interval later than it would directly; the stall detector times
silence from the heartbeat's own ``wall_time``, so this delays no finding by more than that (the
settings refuse a report interval over half of ``detect.stall.heartbeat_timeout``). A
rank entering or leaving a phase (``checkpoint``, ``loading``, ...) wakes the agent to report at
once (`on_change`, at most every `EARLY_REPORT_GAP_S`): a slow phase must reach the daemon before
the hang timeout it lengthens runs out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socketserver
import stat
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

from supervisor.protocol import Heartbeat, wire_context
from supervisor.wire import WireError, ascii_int, loads

PATH = "/v1/heartbeat"
MAX_BODY = 4096
#: a body over MAX_BODY but under this is read and dropped before the 413; a larger one is not read
DRAIN_LIMIT = 64 * 1024
MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 30.0
EARLY_REPORT_GAP_S = 0.25
CLOCK_SKEW_S = 30.0
MAX_AGE_S = 300.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
ENV_SOCKET = "TITAN_SUPERVISOR_RELAY_SOCKET"
ENV_TOKEN = "TITAN_SUPERVISOR_RELAY_TOKEN"


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class HeartbeatRelay:
    """Latest heartbeat per rank of the node's current generation, for the agent's next report.

    ``rank_pid(rank) -> pid | None`` is the agent's own knowledge of which process is which rank
    (`NodeRun.rank_pid`); ``on_change()`` asks the agent for an early report."""

    def __init__(self, *, run_id: str, node: str, rank_pid: Callable[[int], int | None],
                 on_change: Callable[[], None] = lambda: None, path: Path | str) -> None:
        self.run_id, self.node = run_id, node
        self._rank_pid, self._on_change = rank_pid, on_change
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._secret = ""
        self._latest: dict[int, Heartbeat] = {}
        self._phase: dict[int, str] = {}
        self._last_early = 0.0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._conns: set = set()  # open connections (keep-alive: a closed relay must end them too)
        self.accepted = 0
        self.refused = 0
        self.path = str(path)
        _clear_stale(self.path)
        self._server = _Server(self.path, _handler(self))
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-relay", daemon=True)

    @staticmethod
    def socket_path(agent_dir: Path) -> Path:
        """``<agent_dir>/relay/relay.sock`` in a 0700 directory, or a private temporary directory
        when that path is too long for a unix socket."""
        d = Path(agent_dir) / "relay"
        if len(str(d / "relay.sock")) > MAX_SOCKET_PATH:
            # one per agent dir (a restarted agent finds the same), the user's own, or a fresh one
            key = hashlib.sha256(str(Path(agent_dir).resolve()).encode()).hexdigest()[:12]
            d = Path(tempfile.gettempdir()) / f"titan-relay-{os.getuid()}-{key}"
            try:
                d.mkdir(mode=0o700, exist_ok=True)
                st = os.lstat(d)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                    raise OSError(f"{d} is not a directory of this user")
            except OSError:
                d = Path(tempfile.mkdtemp(prefix="titan-relay-"))  # created 0700
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        return d / "relay.sock"

    def start(self) -> "HeartbeatRelay":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()  # the socket file stays: adopted ranks' next agent binds it again
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(2)  # socket.SHUT_RDWR
            except OSError:
                pass

    # -- generations ---------------------------------------------------------------------------------
    def open(self, generation: int, secret: str | None = None) -> dict[str, str]:
        """Accept heartbeats of ``generation`` only, under a fresh secret (or the one an adopted run's
        ranks hold); the environment to hand that generation's ranks."""
        with self._lock:
            self._generation, self._secret = generation, secret or secrets.token_urlsafe(32)
            self._latest.clear()
            self._phase.clear()
            return {ENV_SOCKET: self.path, ENV_TOKEN: self._secret}

    @property
    def secret(self) -> str:
        return self._secret

    def take(self) -> list[dict]:
        """The heartbeats received since the last `take`, one per rank (each sent once)."""
        with self._lock:
            out, self._latest = self._latest, {}
        return [hb.model_dump(mode="json") for _, hb in sorted(out.items())]

    def put_back(self, beats: list[dict]) -> None:
        """Heartbeats a failed report did not deliver: kept unless a newer one of the rank came meanwhile."""
        with self._lock:
            for b in beats:
                if b["generation"] == self._generation and b["rank"] not in self._latest:
                    self._latest[b["rank"]] = Heartbeat.model_validate(b)

    # -- one request -----------------------------------------------------------------------------------
    def accept(self, token: str, body: bytes) -> None:
        """Keep one heartbeat, or raise `Refused` saying why (nothing is kept then)."""
        with self._lock:
            secret, generation = self._secret, self._generation
        if not secret or not hmac.compare_digest(token.encode(), secret.encode()):
            raise Refused(401, "relay token missing or wrong (each generation's ranks get theirs in "
                               f"{ENV_TOKEN})")
        if len(body) > MAX_BODY:
            raise Refused(413, f"body is {len(body)} bytes; the limit is {MAX_BODY}")
        try:
            hb = Heartbeat.model_validate(loads(body), context=wire_context(
                time.time(), future_s=CLOCK_SKEW_S, past_s=MAX_AGE_S))
        except WireError as e:
            raise Refused(e.status, e.message) from None
        except ValueError as e:  # pydantic's ValidationError
            errs = getattr(e, "errors", lambda: [])()
            where = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}"
                              for err in errs[:5]) or str(e)[:300]
            raise Refused(400, f"body is not a valid Heartbeat: {where}") from None
        if hb.run_id != self.run_id or hb.generation != generation:
            raise Refused(409, f"this node runs generation {generation} of run {self.run_id!r}, not generation "
                               f"{hb.generation} of {hb.run_id!r}")
        pid = self._rank_pid(hb.rank)
        if pid != hb.pid:
            raise Refused(403, f"rank {hb.rank} with pid {hb.pid} is not a rank this node's agent started "
                               f"(its pid for rank {hb.rank}: {pid})")
        hb = hb.model_copy(update={"host": self.node})
        with self._lock:
            if self._generation != generation:
                return  # a new generation opened meanwhile: this beat is of the old one
            prev = self._latest.get(hb.rank)
            if prev is None or hb.wall_time >= prev.wall_time:
                self._latest[hb.rank] = hb
            changed = self._phase.get(hb.rank) != hb.phase
            self._phase[hb.rank] = hb.phase
            now = time.monotonic()
            early = changed and now - self._last_early >= EARLY_REPORT_GAP_S
            if early:
                self._last_early = now
        if early:
            self._on_change()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _clear_stale(path: str) -> None:
    """A socket file left by a previous agent process (nothing listens on it any more)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _handler(relay: HeartbeatRelay):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a rank reuses one connection
        timeout = IDLE_TIMEOUT_S

        def handle(self) -> None:
            if not relay._slots.acquire(blocking=False):  # a careless same-user process, not a rank
                self.close_connection = True
                return  # over MAX_CONNECTIONS: closed at once
            with relay._lock:
                relay._conns.add(self.connection)
            try:
                super().handle()
            finally:
                with relay._lock:
                    relay._conns.discard(self.connection)
                relay._slots.release()

        def log_message(self, *args) -> None:  # no stderr line per request
            pass

        def _answer(self, status: int, text: str) -> None:
            import json

            data = json.dumps({"ok": True} if status == 200 else {"error": text}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if self.path != PATH:
                self.close_connection = True
                return self._answer(404, f"only POST {PATH} is served here")
            size = ascii_int(self.headers.get("Content-Length"))  # "²" once escaped as a traceback
            if size is None:
                self.close_connection = True
                return self._answer(411, "a Content-Length is required")
            if size > MAX_BODY:
                self.close_connection = True
                if size <= DRAIN_LIMIT:  # read and dropped, so the sender sees the answer
                    self.rfile.read(size)  # rather than a broken pipe mid-body (CI, 2026-12-01)
                return self._answer(413, f"body is {size} bytes; the limit is {MAX_BODY}")
            body = self.rfile.read(size)
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            try:
                relay.accept(token.strip() if scheme.lower() == "bearer" else "", body)
            except Refused as e:
                relay.refused += 1
                return self._answer(e.status, e.message)
            relay.accepted += 1
            self._answer(200, "")

        def do_GET(self) -> None:  # noqa: N802
            self.close_connection = True
            self._answer(405, f"only POST {PATH} is served here")

    return Handler
