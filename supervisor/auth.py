"""Bearer tokens with roles for the daemon's API (docs/architecture.md §8: every operator command is
authenticated).

Roles are ordered ``viewer < operator < admin``: a viewer reads (status, incidents,
checkpoints, audit), an operator also runs commands (rollback, pause, lr, ...), an admin also
changes the policy mode. ``alerts`` (Alertmanager's token) may only post to /v1/alerts; ``agent``
(one per node agent, named as the agent) may only post that agent's node reports. A token is a random string (``tsv_`` + 43 URL-safe characters) that
is shown once, when it is made; only its SHA-256 is stored. A SHA-256 of a 256-bit random
secret needs no salt or slow hash: nobody can guess their way back to the token.

Token file: JSON lines, one token each, written by ``titan-supervisor token add``::

    {"name": "alice", "role": "operator", "sha256": "9f86d0..."}

``TITAN_SUPERVISOR_TOKENS`` may add entries as ``name:role:sha256`` separated by commas or
whitespace (for containers whose secrets arrive as environment). Names are unique across both;
a duplicate, an unknown role or a malformed hash is an error naming the line, at start.

Lookup hashes the presented token and compares it with every stored hash using
``hmac.compare_digest`` (no early exit, so timing tells nothing about which entry was close).
The file is re-read when its modification time changes, so ``token add`` / ``token revoke``
take effect on a running daemon without a restart. Tokens themselves are never logged or
journaled: only the name of the token that made a request is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ORDERED_ROLES = ("viewer", "operator", "admin")
#: ``alerts`` is outside the order: it may post to /v1/alerts (Alertmanager's token) and nothing else
ROLES = (*ORDERED_ROLES, "alerts", "agent")
_RANK = {r: i for i, r in enumerate(ORDERED_ROLES)}
ALERT_POSTERS = frozenset({"alerts", "operator", "admin"})
ENV_VAR = "TITAN_SUPERVISOR_TOKENS"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TokenError(ValueError):
    """A token file or entry that cannot be used (the message names where and why)."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token's name and role (or 'anonymous' / 'local')."""

    name: str
    role: str

    def allows(self, needed: str) -> bool:
        if needed == "alerts":
            return self.role in ALERT_POSTERS
        if needed == "agent":
            return self.role == "agent"
        return self.role in _RANK and _RANK[self.role] >= _RANK[needed]


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: str
    sha256: str
    source: str = "file"  # file | env


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "tsv_" + secrets.token_urlsafe(32)


def _entry(name, role, digest, where: str, source: str) -> TokenEntry:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TokenError(f"{where}: name {name!r} must be 1-64 of [A-Za-z0-9_.@-]")
    if role not in ROLES:
        raise TokenError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise TokenError(f"{where}: sha256 must be 64 lowercase hex digits")
    return TokenEntry(name, role, digest, source)


def parse_token_lines(text: str, where: str = "token file") -> list[TokenEntry]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TokenError(f"{where}:{n}: not JSON: {e}") from None
        if not isinstance(obj, dict) or set(obj) - {"name", "role", "sha256", "created_at"}:
            raise TokenError(f"{where}:{n}: expected {{name, role, sha256}}")
        out.append(_entry(obj.get("name"), obj.get("role"), obj.get("sha256"), f"{where}:{n}", "file"))
    _check_unique(out, where)
    return out


def parse_env(value: str) -> list[TokenEntry]:
    out = []
    for i, part in enumerate(filter(None, re.split(r"[,\s]+", value.strip())), 1):
        bits = part.split(":")
        if len(bits) != 3:
            raise TokenError(f"{ENV_VAR} entry {i}: expected name:role:sha256")
        out.append(_entry(*bits, f"{ENV_VAR} entry {i}", "env"))
    _check_unique(out, ENV_VAR)
    return out


def _check_unique(entries: list[TokenEntry], where: str) -> None:
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise TokenError(f"{where}: token name {e.name!r} appears twice")
        seen.add(e.name)


def load_token_file(path: str | Path) -> list[TokenEntry]:
    p = Path(path)
    if not p.is_file():
        raise TokenError(f"token file {p} does not exist; create it with "
                         f"`titan-supervisor token add NAME --role admin --file {p}`")
    return parse_token_lines(p.read_text(), str(p))


def add_token(path: str | Path, name: str, role: str) -> str:
    """Append a new token for ``name`` to the file (created 0600); return the token (shown once)."""
    p = Path(path)
    existing = load_token_file(p) if p.exists() else []
    if any(e.name == name for e in existing):
        raise TokenError(f"a token named {name!r} already exists in {p}; revoke it first")
    token = new_token()
    entry = _entry(name, role, hash_token(token), "new token", "file")
    line = json.dumps({"name": entry.name, "role": entry.role, "sha256": entry.sha256}) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def revoke_token(path: str | Path, name: str) -> bool:
    """Remove ``name`` from the file (tmp + rename). False if it was not there."""
    p = Path(path)
    entries = load_token_file(p)
    keep = [e for e in entries if e.name != name]
    if len(keep) == len(entries):
        return False
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for e in keep:
            f.write(json.dumps({"name": e.name, "role": e.role, "sha256": e.sha256}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return True


def token_matches(presented: str, hashes: list[str]) -> bool:
    """Whether ``presented`` hashes to one of ``hashes`` (every entry compared: no early exit)."""
    digest = hash_token(presented)
    found = False
    for h in hashes:
        found = hmac.compare_digest(digest, h) or found
    return found


TRAINER_HASHES_KEPT = 8


def trainer_token_hashes(journal, token: str) -> list[str]:
    """Journal the hash of this daemon's new trainer token next to the previous ones (a re-adopted
    generation's ranks still hold an older token); return the accepted hashes. Only hashes are
    stored; a plain-text token an older version journaled is replaced by its hash."""
    hashes = list(journal.get_meta("trainer_token_sha256") or [])
    legacy = journal.get_meta("trainer_token")
    if isinstance(legacy, str) and legacy:
        hashes.append(hash_token(legacy))
        journal.set_meta("trainer_token", None)
    hashes = (hashes + [hash_token(token)])[-TRAINER_HASHES_KEPT:]
    journal.set_meta("trainer_token_sha256", hashes)
    return hashes


class TokenStore:
    """The daemon's view of the configured tokens (file + environment)."""

    def __init__(self, path: str | Path | None = None, env: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._env = parse_env(env) if env else []
        self._file: list[TokenEntry] = []
        self._stamp: tuple[int, int] | None = None
        self._index: dict[str, TokenEntry] = {}
        self._index_key: tuple | None = None
        self._reload()

    @classmethod
    def from_settings(cls, settings) -> "TokenStore":
        return cls(settings.server.token_file, os.environ.get(ENV_VAR))

    def _reload(self) -> None:
        if self.path is None:
            return
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            entries = load_token_file(self.path)
            clash = {e.name for e in entries} & {e.name for e in self._env}
            if clash:
                raise TokenError(f"token names {sorted(clash)} are both in {self.path} and {ENV_VAR}")
            self._file, self._stamp = entries, stamp

    @property
    def configured(self) -> bool:
        return self.path is not None or bool(self._env)

    def entries(self) -> list[TokenEntry]:
        try:
            self._reload()
        except (OSError, TokenError):
            pass  # keep the last good set: a half-edited file must not lock everyone out
        return self._file + self._env

    def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        digest = hash_token(token)
        found = None
        for e in self.entries():
            if hmac.compare_digest(digest, e.sha256) and found is None:
                found = e
        return Principal(found.name, found.role) if found else None

    def lookup(self, token: str | None) -> Principal | None:
        """`authenticate` in O(1) for the hot node-report route (thousands of agents a second): a
        dict from SHA-256 to entry, rebuilt when the token set changes. A dict lookup of the hash
        of what the caller sent leaks no more than `authenticate`: to learn anything by timing one
        would need a SHA-256 preimage of a stored hash."""
        if not token:
            return None
        entries = self.entries()
        key = (len(entries), self._stamp)
        if self._index_key != key:
            self._index = {e.sha256: e for e in entries}
            self._index_key = key
        found = self._index.get(hash_token(token))
        return Principal(found.name, found.role) if found else None
