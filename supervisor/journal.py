"""The journal: the daemon's durable memory and audit log (docs/architecture.md §3, §8), in SQLite.

Failure model and guarantees:
- WAL mode with ``synchronous=FULL`` by default: every committed transaction is on disk before
  the call returns, so it survives a daemon kill *and* a power loss / kernel crash. NORMAL
  would be safe against a daemon crash but may lose the last commits on power loss, and an
  action intent or an operator command lost that way breaks the audit trail and the
  "finish or undo on restart" promise. The cost is one fsync per commit; the journal commits a
  few times a second at most (step records arrive batched, one transaction per batch).
- An action's *intent* is committed before it runs and its *outcome* after; a daemon killed
  in between finds the action in `Journal.unfinished_actions` on restart. ``request_id`` makes
  `Journal.action_intent` idempotent: a retried request returns the first action.
- Nothing is ever deleted: there is no DELETE in this module. The one bounded part is the
  full-resolution step ring (`Config.recent_steps` slots, oldest overwritten); every
  `Config.keep_every`-th step is also kept forever in ``steps``.
- Schema versions live in ``PRAGMA user_version``; `Journal.open` applies pending migrations
  in one transaction and refuses a journal written by a newer supervisor.
- Threads: one connection (``check_same_thread=False``) guarded by one re-entrant lock; every
  public method holds it for its whole transaction, so the asyncio thread and a worker thread
  may both call in. Other processes (the CLI) may read concurrently: WAL lets readers proceed
  while the daemon writes; `Journal.open(path, readonly=True)` opens such a reader.
- Timestamps are Unix seconds (float, UTC); pass ``at=`` to record a time from a record.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, Mapping, NamedTuple

from supervisor.config_types import PositiveInt, Strings, doc
from supervisor.protocol import record_field
from supervisor.wire import clean_text, json_safe

ACTION_STATES = ("intent", "running", "done", "failed", "abandoned")
ACTION_TERMINAL = ("done", "failed", "abandoned")
INCIDENT_STATES = ("open", "acked", "closed")
CHECKPOINT_STATES = ("in_progress", "valid", "corrupt", "quarantined", "deleted_by_retention")
_CHECKPOINT_FINAL = ("quarantined", "deleted_by_retention")

_MIGRATIONS: list[str] = [
    # v1: initial schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, created_at REAL NOT NULL, config TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE generations (
        id INTEGER PRIMARY KEY, run_id TEXT, started_at REAL NOT NULL, ended_at REAL,
        load_step INTEGER NOT NULL DEFAULT 0, skip_batches INTEGER NOT NULL DEFAULT 0,
        lr_scale REAL NOT NULL DEFAULT 1.0, layout TEXT, pids TEXT NOT NULL DEFAULT '[]',
        nodes TEXT NOT NULL DEFAULT '[]',
        exit_code INTEGER, exit_signal INTEGER, exit_reason TEXT,
        state TEXT NOT NULL DEFAULT 'running');
    CREATE TABLE incidents (
        id INTEGER PRIMARY KEY, opened_at REAL NOT NULL, closed_at REAL, kind TEXT NOT NULL,
        onset_step INTEGER, generation INTEGER, summary TEXT NOT NULL DEFAULT '',
        resolution TEXT,
        state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open','acked','closed')),
        acked_by TEXT, acked_at REAL);
    CREATE INDEX incidents_state ON incidents(state);
    CREATE TABLE findings (
        id INTEGER PRIMARY KEY, incident_id INTEGER REFERENCES incidents(id),
        kind TEXT NOT NULL, step INTEGER, severity TEXT NOT NULL, rank INTEGER,
        wall_time REAL, evidence TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
    CREATE INDEX findings_incident ON findings(incident_id);
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY, incident_id INTEGER REFERENCES incidents(id),
        finding_id INTEGER REFERENCES findings(id), action TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}', reason TEXT NOT NULL DEFAULT '',
        advisory INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
    CREATE INDEX decisions_incident ON decisions(incident_id);
    CREATE TABLE actions (
        id INTEGER PRIMARY KEY, decision_id INTEGER REFERENCES decisions(id),
        kind TEXT NOT NULL, params TEXT NOT NULL DEFAULT '{}', request_id TEXT UNIQUE,
        actor TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('intent','running','done','failed','abandoned')),
        created_at REAL NOT NULL, updated_at REAL NOT NULL, outcome TEXT);
    CREATE INDEX actions_state ON actions(state);
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL, role TEXT,
        command TEXT NOT NULL, args TEXT NOT NULL DEFAULT '{}', reason TEXT, request_id TEXT,
        accepted INTEGER NOT NULL, result TEXT);
    CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY, step INTEGER NOT NULL, path TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('in_progress','valid','corrupt','quarantined','deleted_by_retention')),
        pinned INTEGER NOT NULL DEFAULT 0, size INTEGER, seen_at REAL NOT NULL,
        updated_at REAL NOT NULL, save_seconds REAL, note TEXT);
    CREATE INDEX checkpoints_step ON checkpoints(step);
    CREATE TABLE steps (
        generation INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL, grad_norm REAL, lr REAL,
        lr_scale REAL, tokens_per_s REAL, step_seconds REAL, update_skipped INTEGER,
        wall_time REAL, PRIMARY KEY (generation, step));
    CREATE TABLE steps_recent (
        slot INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
        generation INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL, grad_norm REAL, lr REAL,
        lr_scale REAL, tokens_per_s REAL, step_seconds REAL, update_skipped INTEGER,
        wall_time REAL, UNIQUE (generation, step));
    CREATE INDEX steps_recent_seq ON steps_recent(seq);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)

_STEP_FIELDS = ("generation", "step", "loss", "grad_norm", "lr", "lr_scale", "tokens_per_s",
                "step_seconds", "update_skipped", "wall_time")
_JSON_COLUMNS = ("pids", "nodes", "evidence", "params", "args", "outcome", "config", "layout")


class JournalError(RuntimeError):
    pass


class InvalidTransition(JournalError):
    """An action or incident state change that its current state does not allow."""


class IdempotencyConflict(ValueError):
    """A request_id reused for a different action kind or parameters."""


class ActionIntent(NamedTuple):
    id: int
    created: bool  # False: this request_id was seen before; id is the first action's


@dataclass(frozen=True)
class FailureHistory:
    """Inputs for MTBF and the optimal checkpoint interval (Young/Daly)."""

    failure_times: list[float]  # opened_at of failure incidents, oldest first
    observed_since: float | None  # first generation start: the start of the exposure window
    save_seconds: list[float]  # measured checkpoint save durations, oldest first


def _dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str, allow_nan=True)


def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
    if r is None:
        return None
    d = dict(r)
    for k in _JSON_COLUMNS:
        if k in d and isinstance(d[k], str):
            try:
                d[k] = json.loads(d[k])
            except ValueError:
                pass
    for k in ("advisory", "accepted", "pinned", "update_skipped"):
        if k in d and d[k] is not None:
            d[k] = bool(d[k])
    return d


def _private_files(path: Path) -> None:
    """The journal holds the audit log and token hashes: create it (and its WAL/SHM, which SQLite
    creates with the database file's mode) 0600, and tighten an older world-readable one."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists():
            os.chmod(p, 0o600)


class Journal:
    """SQLite journal of generations, incidents, findings, decisions, actions, commands,
    checkpoints and downsampled steps. See the module docstring for the guarantees."""

    @dataclass
    class Config:
        synchronous: Annotated[Literal["FULL", "NORMAL", "EXTRA"], doc(
            "SQLite synchronous mode: FULL fsyncs every commit (see the module docstring)")] = "FULL"
        busy_timeout_ms: Annotated[PositiveInt, doc(
            "how long a write waits for another connection's lock, in milliseconds")] = 10_000
        recent_steps: Annotated[PositiveInt, doc("full-resolution ring of the last N step records")] = 10_000
        keep_every: Annotated[PositiveInt, doc("every M-th step is kept forever in `steps`")] = 10
        failure_kinds: Annotated[Strings, doc(
            "incident kinds counted as failures for the MTBF estimate")] = (
            "crash", "dead_rank", "hang", "stall", "oom", "hardware", "restart")

    def __init__(self, conn: sqlite3.Connection, path: Path, config: Config,
                 readonly: bool, clock: Callable[[], float]) -> None:
        self._conn = conn
        self.path = path
        self.config = config
        self.readonly = readonly
        self._clock = clock
        self._lock = threading.RLock()
        #: called with the sqlite3.Error of every failed write transaction (the daemon counts them)
        self.on_write_error: Callable[[sqlite3.Error], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, config: Config | None = None, *, readonly: bool = False,
             clock: Callable[[], float] = time.time) -> "Journal":
        """Open (creating and migrating unless ``readonly``) the journal at ``path``."""
        config = config or Journal.Config()
        if config.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        if config.recent_steps < 1 or config.keep_every < 1:
            raise ValueError("recent_steps and keep_every must be >= 1")
        path = Path(path)
        if readonly:
            if not path.exists():
                raise FileNotFoundError(f"no journal at {path}")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False, timeout=config.busy_timeout_ms / 1000)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _private_files(path)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=config.busy_timeout_ms / 1000)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        j = cls(conn, path, config, readonly, clock)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {path} has schema v{version}, newer than this supervisor's "
                    f"v{SCHEMA_VERSION}; upgrade the supervisor")
            if readonly:
                if version != SCHEMA_VERSION:
                    raise JournalError(f"journal {path} is at schema v{version}, need "
                                       f"v{SCHEMA_VERSION}; open it read-write once to migrate")
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise JournalError(f"could not put {path} in WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
                j._migrate(version)
        except BaseException:
            conn.close()
            raise
        return j

    def _migrate(self, version: int) -> None:
        if version == SCHEMA_VERSION:
            return
        with self._tx() as c:
            for v in range(version, SCHEMA_VERSION):
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        c.execute(stmt)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock (BEGIN IMMEDIATE: no upgrade deadlocks)."""
        with self._lock:
            if self.readonly:
                raise JournalError("journal opened read-only")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                if self.on_write_error is not None:
                    self.on_write_error(e)
                raise

    def _q(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_row(r) for r in self._conn.execute(sql, tuple(args)).fetchall()]  # type: ignore[misc]

    def _q1(self, sql: str, args: Iterable[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            return _row(self._conn.execute(sql, tuple(args)).fetchone())

    def _now(self, at: float | None) -> float:
        return self._clock() if at is None else float(at)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    # -- runs / meta -----------------------------------------------------------------------

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                      "SET value = excluded.value", (key, _dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        r = self._q1("SELECT value FROM meta WHERE key = ?", (key,))
        return default if r is None else json.loads(r["value"])

    def record_run(self, run_id: str, config: Mapping[str, Any] | None = None,
                   at: float | None = None) -> bool:
        """Register a run (idempotent). True if it was new."""
        with self._tx() as c:
            cur = c.execute("INSERT OR IGNORE INTO runs(run_id, created_at, config) VALUES (?,?,?)",
                            (run_id, self._now(at), _dumps(dict(config or {}))))
            return cur.rowcount == 1

    def runs(self) -> list[dict[str, Any]]:
        return self._q("SELECT * FROM runs ORDER BY created_at")

    # -- generations -----------------------------------------------------------------------

    def record_generation_start(self, *, generation: int | None = None, run_id: str | None = None,
                                load_step: int = 0, skip_batches: int = 0, lr_scale: float = 1.0,
                                layout: Any = None, pids: list[int] | None = None,
                                nodes: list[str] | None = None, at: float | None = None) -> int:
        """Record a generation start; returns its number (next after the last if not given)."""
        with self._tx() as c:
            if generation is None:
                generation = (c.execute("SELECT MAX(id) FROM generations").fetchone()[0] or 0) + 1
            elif c.execute("SELECT 1 FROM generations WHERE id = ?", (generation,)).fetchone():
                raise ValueError(f"generation {generation} already recorded")
            c.execute(
                "INSERT INTO generations(id, run_id, started_at, load_step, skip_batches, lr_scale,"
                " layout, pids, nodes, state) VALUES (?,?,?,?,?,?,?,?,?, 'running')",
                (generation, run_id, self._now(at), load_step, skip_batches, lr_scale,
                 _dumps(layout), _dumps(list(pids or [])), _dumps(list(nodes or []))))
        return generation

    def set_generation_pids(self, generation: int, pids: list[int]) -> None:
        with self._tx() as c:
            if c.execute("UPDATE generations SET pids = ? WHERE id = ?",
                         (_dumps(list(pids)), generation)).rowcount != 1:
                raise KeyError(f"no generation {generation}")

    def record_generation_end(self, generation: int, *, exit_code: int | None = None,
                              exit_signal: int | None = None, reason: str = "",
                              state: str = "exited", at: float | None = None) -> None:
        """Record how a generation ended (``state``: exited | killed | crashed | lost)."""
        with self._tx() as c:
            if c.execute(
                    "UPDATE generations SET ended_at = ?, exit_code = ?, exit_signal = ?, "
                    "exit_reason = ?, state = ? WHERE id = ?",
                    (self._now(at), exit_code, exit_signal, reason, state, generation)).rowcount != 1:
                raise KeyError(f"no generation {generation}")

    def generation(self, generation: int) -> dict[str, Any] | None:
        return self._q1("SELECT * FROM generations WHERE id = ?", (generation,))

    def last_generation(self) -> dict[str, Any] | None:
        return self._q1("SELECT * FROM generations ORDER BY id DESC LIMIT 1")

    def generations(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._q("SELECT * FROM generations ORDER BY id DESC LIMIT ?", (limit,))

    # -- incidents, findings, decisions ----------------------------------------------------

    def open_incident(self, kind: str, onset_step: int | None = None, *, summary: str = "",
                      generation: int | None = None, at: float | None = None) -> int:
        with self._tx() as c:
            return c.execute(
                "INSERT INTO incidents(opened_at, kind, onset_step, generation, summary, state) "
                "VALUES (?,?,?,?,?, 'open')",
                (self._now(at), kind, onset_step, generation, summary)).lastrowid

    def close_incident(self, incident_id: int, resolution: str = "", at: float | None = None) -> bool:
        """Close an open or acked incident. False if it was already closed."""
        with self._tx() as c:
            r = c.execute("SELECT state FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            if r is None:
                raise KeyError(f"no incident {incident_id}")
            if r["state"] == "closed":
                return False
            c.execute("UPDATE incidents SET state = 'closed', closed_at = ?, resolution = ? "
                      "WHERE id = ?", (self._now(at), resolution, incident_id))
            return True

    def ack_incident(self, incident_id: int, actor: str, at: float | None = None) -> bool:
        """A human takes ownership: open -> acked. On a closed incident the ack is recorded
        but the state stays closed. False if it was already acked."""
        with self._tx() as c:
            r = c.execute("SELECT state, acked_by FROM incidents WHERE id = ?",
                          (incident_id,)).fetchone()
            if r is None:
                raise KeyError(f"no incident {incident_id}")
            if r["acked_by"] is not None:
                return False
            state = "acked" if r["state"] == "open" else r["state"]
            c.execute("UPDATE incidents SET state = ?, acked_by = ?, acked_at = ? WHERE id = ?",
                      (state, actor, self._now(at), incident_id))
            return True

    def incident(self, incident_id: int) -> dict[str, Any] | None:
        return self._q1("SELECT * FROM incidents WHERE id = ?", (incident_id,))

    def incidents(self, *, state: str | None = None, kind: str | None = None,
                  since: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first. ``state='unresolved'`` means open or acked."""
        where, args = [], []
        if state == "unresolved":
            where.append("state IN ('open','acked')")
        elif state is not None:
            if state not in INCIDENT_STATES:
                raise ValueError(f"unknown incident state {state!r}")
            where.append("state = ?")
            args.append(state)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if since is not None:
            where.append("opened_at >= ?")
            args.append(since)
        sql = "SELECT * FROM incidents"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._q(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))

    def incident_detail(self, incident_id: int) -> dict[str, Any] | None:
        """The incident with its findings, decisions and the actions taken for them."""
        with self._lock:
            inc = self.incident(incident_id)
            if inc is None:
                return None
            inc["findings"] = self._q("SELECT * FROM findings WHERE incident_id = ? ORDER BY id",
                                      (incident_id,))
            inc["decisions"] = self._q("SELECT * FROM decisions WHERE incident_id = ? ORDER BY id",
                                       (incident_id,))
            inc["actions"] = self._q(
                "SELECT a.* FROM actions a JOIN decisions d ON a.decision_id = d.id "
                "WHERE d.incident_id = ? ORDER BY a.id", (incident_id,))
            return inc

    def add_finding(self, kind: str, step: int | None, severity: str,
                    evidence: Mapping[str, Any] | None = None, *, incident_id: int | None = None,
                    rank: int | None = None, wall_time: float | None = None,
                    at: float | None = None) -> int:
        with self._tx() as c:
            return c.execute(
                "INSERT INTO findings(incident_id, kind, step, severity, rank, wall_time, evidence,"
                " created_at) VALUES (?,?,?,?,?,?,?,?)",
                (incident_id, kind, step, severity, rank, wall_time, _dumps(dict(evidence or {})),
                 self._now(at))).lastrowid

    def findings(self, *, incident_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if incident_id is None:
            return self._q("SELECT * FROM findings ORDER BY id DESC LIMIT ?", (limit,))
        return self._q("SELECT * FROM findings WHERE incident_id = ? ORDER BY id DESC LIMIT ?",
                       (incident_id, limit))

    def add_decision(self, action: str, params: Mapping[str, Any] | None = None, reason: str = "",
                     *, incident_id: int | None = None, finding_id: int | None = None,
                     advisory: bool = False, at: float | None = None) -> int:
        with self._tx() as c:
            return c.execute(
                "INSERT INTO decisions(incident_id, finding_id, action, params, reason, advisory, "
                "created_at) VALUES (?,?,?,?,?,?,?)",
                (incident_id, finding_id, action, _dumps(dict(params or {})), reason,
                 int(advisory), self._now(at))).lastrowid

    def finding_of_decision(self, decision_id: int) -> dict[str, Any] | None:
        """The finding a decision answered (None for an operator's decision or an unknown id)."""
        rows = self._q("SELECT f.* FROM findings f JOIN decisions d ON d.finding_id = f.id WHERE d.id = ?",
                       (decision_id,))
        return rows[0] if rows else None

    def decisions(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._q("SELECT * FROM decisions ORDER BY id DESC LIMIT ?", (limit,))

    # -- actions ---------------------------------------------------------------------------

    def action_intent(self, kind: str, params: Mapping[str, Any] | None = None, *,
                      request_id: str | None = None, actor: str = "policy",
                      decision_id: int | None = None, at: float | None = None) -> ActionIntent:
        """Commit the intent to act, before acting. With a ``request_id`` seen before, returns
        that action (``created=False``); a different kind or params is an IdempotencyConflict."""
        p = _dumps(dict(params or {}))
        now = self._now(at)
        with self._tx() as c:
            if request_id is not None:
                r = c.execute("SELECT id, kind, params FROM actions WHERE request_id = ?",
                              (request_id,)).fetchone()
                if r is not None:
                    if r["kind"] != kind or r["params"] != p:
                        raise IdempotencyConflict(
                            f"request_id {request_id!r} was already used for action {r['id']} "
                            f"({r['kind']} {r['params']})")
                    return ActionIntent(r["id"], False)
            aid = c.execute(
                "INSERT INTO actions(decision_id, kind, params, request_id, actor, state, "
                "created_at, updated_at) VALUES (?,?,?,?,?, 'intent', ?, ?)",
                (decision_id, kind, p, request_id, actor, now, now)).lastrowid
            return ActionIntent(aid, True)

    def _transition(self, action_id: int, to: str, allowed_from: tuple[str, ...],
                    outcome: Any, at: float | None) -> bool:
        with self._tx() as c:
            r = c.execute("SELECT state FROM actions WHERE id = ?", (action_id,)).fetchone()
            if r is None:
                raise KeyError(f"no action {action_id}")
            if r["state"] == to:
                return False  # a repeat of the same transition (e.g. on restart) is a no-op
            if r["state"] not in allowed_from:
                raise InvalidTransition(f"action {action_id} is {r['state']}, cannot become {to}")
            if outcome is None:
                c.execute("UPDATE actions SET state = ?, updated_at = ? WHERE id = ?",
                          (to, self._now(at), action_id))
            else:
                c.execute("UPDATE actions SET state = ?, updated_at = ?, outcome = ? WHERE id = ?",
                          (to, self._now(at), _dumps(outcome), action_id))
            return True

    def action_running(self, action_id: int, at: float | None = None) -> bool:
        return self._transition(action_id, "running", ("intent",), None, at)

    def action_done(self, action_id: int, outcome: Any = None, at: float | None = None) -> bool:
        return self._transition(action_id, "done", ("intent", "running"), outcome, at)

    def action_failed(self, action_id: int, outcome: Any = None, at: float | None = None) -> bool:
        return self._transition(action_id, "failed", ("intent", "running"), outcome, at)

    def action_abandoned(self, action_id: int, reason: str = "", at: float | None = None) -> bool:
        """Give up on an unfinished action (e.g. found on restart and judged stale)."""
        return self._transition(action_id, "abandoned", ("intent", "running"),
                                {"reason": reason}, at)

    def action(self, action_id: int) -> dict[str, Any] | None:
        return self._q1("SELECT * FROM actions WHERE id = ?", (action_id,))

    def action_by_request(self, request_id: str) -> dict[str, Any] | None:
        return self._q1("SELECT * FROM actions WHERE request_id = ?", (request_id,))

    def unfinished_actions(self) -> list[dict[str, Any]]:
        """Actions whose intent was committed but whose outcome never was, oldest first."""
        return self._q("SELECT * FROM actions WHERE state IN ('intent','running') ORDER BY id")

    def actions(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._q("SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,))

    # -- operator commands -----------------------------------------------------------------

    def record_command(self, *, actor: str, command: str, accepted: bool,
                       args: Mapping[str, Any] | None = None, role: str | None = None,
                       reason: str | None = None, request_id: str | None = None,
                       result: str = "", at: float | None = None) -> int:
        """Audit one operator command, accepted or refused (every attempt is a new row). Everything
        in it came from a request: stored as strict JSON and valid Unicode, so the row can always be
        read back and served (`json_safe`)."""
        text = lambda v: None if v is None else clean_text(str(v))  # noqa: E731
        with self._tx() as c:
            return c.execute(
                "INSERT INTO commands(at, actor, role, command, args, reason, request_id, accepted,"
                " result) VALUES (?,?,?,?,?,?,?,?,?)",
                (self._now(at), text(actor), text(role), text(command),
                 json.dumps(json_safe(dict(args or {})), sort_keys=True, default=str), text(reason),
                 text(request_id), int(accepted), text(result))).lastrowid

    def commands(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._q("SELECT * FROM commands ORDER BY id DESC LIMIT ?", (limit,))

    # -- checkpoints -----------------------------------------------------------------------

    def record_checkpoint(self, step: int, *, path: str | Path | None = None,
                          state: str | None = None, pinned: bool | None = None,
                          size: int | None = None, save_seconds: float | None = None,
                          note: str | None = None, at: float | None = None) -> int:
        """Upsert the current row for ``step`` (None leaves a field unchanged). Once a row is
        quarantined or deleted_by_retention it is history: a new row starts for that step."""
        if state is not None and state not in CHECKPOINT_STATES:
            raise ValueError(f"unknown checkpoint state {state!r}")
        now = self._now(at)
        with self._tx() as c:
            r = c.execute("SELECT id, state FROM checkpoints WHERE step = ? ORDER BY id DESC "
                          "LIMIT 1", (step,)).fetchone()
            if r is None or (r["state"] in _CHECKPOINT_FINAL and state not in _CHECKPOINT_FINAL):
                return c.execute(
                    "INSERT INTO checkpoints(step, path, state, pinned, size, seen_at, updated_at,"
                    " save_seconds, note) VALUES (?,?,?,?,?,?,?,?,?)",
                    (step, str(path or f"step-{step}"), state or "in_progress", int(bool(pinned)),
                     size, now, now, save_seconds, note)).lastrowid
            c.execute(
                "UPDATE checkpoints SET path = COALESCE(?, path), state = COALESCE(?, state), "
                "pinned = COALESCE(?, pinned), size = COALESCE(?, size), updated_at = ?, "
                "save_seconds = COALESCE(?, save_seconds), note = COALESCE(?, note) WHERE id = ?",
                (None if path is None else str(path), state,
                 None if pinned is None else int(pinned), size, now, save_seconds, note, r["id"]))
            return r["id"]

    def checkpoints(self, *, include_history: bool = False) -> list[dict[str, Any]]:
        """Current row per step (all rows with ``include_history``), by step."""
        if include_history:
            return self._q("SELECT * FROM checkpoints ORDER BY step, id")
        return self._q("SELECT * FROM checkpoints WHERE id IN "
                       "(SELECT MAX(id) FROM checkpoints GROUP BY step) ORDER BY step")

    def pinned_checkpoints(self) -> list[int]:
        return [r["step"] for r in self.checkpoints() if r["pinned"]]

    # -- steps -----------------------------------------------------------------------------

    def add_steps(self, records: Iterable[Any]) -> int:
        """Store step records (StepRecord objects or mappings) in one transaction. Repeats of a
        (generation, step) already held are ignored (a resent spool is harmless). Returns how
        many were new to the ring."""
        rows = []
        for rec in records:
            row = []
            for name in _STEP_FIELDS:
                v = record_field(rec, name)
                if name in ("generation", "step"):
                    if v is None:
                        raise ValueError(f"step record without {name}")
                    v = int(v)
                elif name == "update_skipped":
                    v = int(bool(v))
                elif v is not None:
                    v = float(v)
                    if name in ("loss", "grad_norm") and not math.isfinite(v):
                        v = str(v)  # keep 'nan' / 'inf' visible (SQLite would make NaN NULL)
                row.append(v)
            rows.append(tuple(row))
        if not rows:
            return 0
        n_recent, every = self.config.recent_steps, self.config.keep_every
        cols = ", ".join(_STEP_FIELDS)
        marks = ", ".join("?" * len(_STEP_FIELDS))
        new = 0
        with self._tx() as c:
            seq = int(c.execute("SELECT COALESCE(MAX(seq), -1) FROM steps_recent").fetchone()[0])
            c.executemany(f"INSERT OR IGNORE INTO steps({cols}) VALUES ({marks})",
                          [r for r in rows if r[1] % every == 0])
            for r in rows:
                if c.execute("SELECT 1 FROM steps_recent WHERE generation = ? AND step = ?",
                             (r[0], r[1])).fetchone():
                    continue
                seq += 1
                new += 1
                c.execute(f"INSERT OR REPLACE INTO steps_recent(slot, seq, {cols}) "
                          f"VALUES (?, ?, {marks})", (seq % n_recent, seq, *r))
        return new

    def add_step(self, record: Any) -> int:
        return self.add_steps([record])

    def recent_steps(self, limit: int = 1000, generation: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` full-resolution records, oldest first (in arrival order)."""
        if generation is None:
            rows = self._q("SELECT * FROM steps_recent ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._q("SELECT * FROM steps_recent WHERE generation = ? ORDER BY seq DESC "
                           "LIMIT ?", (generation, limit))
        return [self._step_row(r) for r in reversed(rows)]

    def step_history(self, since_step: int = 0, limit: int = 100_000) -> list[dict[str, Any]]:
        """The kept-forever downsampled series (every ``keep_every``-th step)."""
        rows = self._q("SELECT * FROM steps WHERE step >= ? ORDER BY step, generation LIMIT ?",
                       (since_step, limit))
        return [self._step_row(r) for r in rows]

    @staticmethod
    def _step_row(r: dict[str, Any]) -> dict[str, Any]:
        r.pop("slot", None)
        r.pop("seq", None)
        for k in ("loss", "grad_norm"):
            if isinstance(r.get(k), str):
                r[k] = float(r[k])
        return r

    # -- history for MTBF / checkpoint interval --------------------------------------------

    def failure_history(self, *, kinds: Iterable[str] | None = None, since: float | None = None,
                        save_seconds_limit: int = 100) -> FailureHistory:
        """Failure incident times, the start of observation and measured save durations."""
        kinds = tuple(kinds or self.config.failure_kinds)
        marks = ",".join("?" * len(kinds))
        args: list[Any] = list(kinds)
        sql = f"SELECT opened_at FROM incidents WHERE kind IN ({marks})"
        if since is not None:
            sql += " AND opened_at >= ?"
            args.append(since)
        times = [r["opened_at"] for r in self._q(sql + " ORDER BY opened_at", args)]
        first = self._q1("SELECT MIN(started_at) AS t FROM generations")
        saves = self._q("SELECT save_seconds FROM checkpoints WHERE save_seconds IS NOT NULL "
                        "ORDER BY updated_at DESC, id DESC LIMIT ?", (save_seconds_limit,))
        return FailureHistory(times, first["t"] if first else None,
                              [r["save_seconds"] for r in reversed(saves)])

    def counts(self) -> dict[str, int]:
        """Row count per table (for status pages and tests)."""
        tables = ("runs", "generations", "incidents", "findings", "decisions", "actions",
                  "commands", "checkpoints", "steps", "steps_recent")
        with self._lock:
            return {t: self._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                    for t in tables}
