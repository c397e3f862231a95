"""The on-call CLI's HTTP client: where the supervisor is, which token to send, what an answer
means as an exit code.

Where and who, first found wins:
  1. flags ``--url``, ``--token``, ``--token-file``
  2. environment ``TITAN_SUPERVISOR_URL``, ``TITAN_SUPERVISOR_TOKEN``, ``TITAN_SUPERVISOR_TOKEN_FILE``
  3. a client config file (``--client-config``, else ``TITAN_SUPERVISOR_CLIENT_CONFIG``, else
     ``~/.config/titan-supervisor/client.toml``) with keys ``url``, ``token``, ``token_file``
  4. ``http://127.0.0.1:8642`` and no token
Prefer a token file or the environment to ``--token``: a flag shows in ``ps``.

Retries: a request that never reached the daemon (connection refused, connect timeout) is
retried; a command whose answer was lost is retried with the same ``request_id``, so the daemon
answers with the first action instead of acting twice.
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8642"

# Exit codes (documented in README "On-call CLI" and in `titan-supervisor --help`).
EXIT_OK = 0  # done
EXIT_FAILED = 1  # the command ran but the action failed, or the run is unhealthy (status)
EXIT_USAGE = 2  # bad arguments, or the daemon refused the input (400)
EXIT_UNREACHABLE = 3  # no answer from the supervisor
EXIT_AUTH = 4  # 401 / 403: no, unknown or too weak a token
EXIT_CONFLICT = 5  # 409: another action is in flight, wrong run state, reused request id
EXIT_NOT_FOUND = 6  # 404: no such incident / action
EXIT_DECLINED = 7  # the confirmation prompt was answered no
EXIT_CODES = {EXIT_OK: "ok", EXIT_FAILED: "the action failed / the run is unhealthy",
              EXIT_USAGE: "bad usage or refused input (400)", EXIT_UNREACHABLE: "supervisor unreachable",
              EXIT_AUTH: "not authenticated or not allowed (401/403)",
              EXIT_CONFLICT: "conflict: busy, wrong state or reused request id (409)",
              EXIT_NOT_FOUND: "not found (404)", EXIT_DECLINED: "declined at the confirmation prompt"}


class ClientError(Exception):
    """A request that did not succeed; ``exit_code`` says how the CLI should exit."""

    def __init__(self, message: str, exit_code: int, status: int | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.status, self.details = message, exit_code, status, details


def exit_code_for(status: int) -> int:
    if status == 400 or status == 422:
        return EXIT_USAGE
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    return EXIT_FAILED


@dataclass
class ClientConfig:
    url: str = DEFAULT_URL
    token: str | None = None
    timeout: float = 30.0

    @classmethod
    def resolve(cls, *, url: str | None = None, token: str | None = None, token_file: str | None = None,
                config_file: str | None = None, timeout: float = 30.0, env: dict | None = None) -> "ClientConfig":
        env = os.environ if env is None else env
        file_cfg: dict = {}
        path = config_file or env.get("TITAN_SUPERVISOR_CLIENT_CONFIG")
        explicit = path is not None
        p = Path(path).expanduser() if path else Path("~/.config/titan-supervisor/client.toml").expanduser()
        if p.is_file():
            try:
                file_cfg = tomllib.loads(p.read_text())
            except (tomllib.TOMLDecodeError, OSError) as e:
                raise ClientError(f"client config {p}: {e}", EXIT_USAGE) from None
            unknown = set(file_cfg) - {"url", "token", "token_file"}
            if unknown:
                raise ClientError(f"client config {p}: unknown keys {sorted(unknown)} (known: url, token, "
                                  "token_file)", EXIT_USAGE)
        elif explicit:
            raise ClientError(f"client config {p} does not exist", EXIT_USAGE)

        def pick(flag, env_key, file_key):
            return flag or env.get(env_key) or file_cfg.get(file_key)

        tok = token or env.get("TITAN_SUPERVISOR_TOKEN")
        tok_file = None if tok else (token_file or env.get("TITAN_SUPERVISOR_TOKEN_FILE"))
        if not tok and not tok_file:
            tok = file_cfg.get("token")
            tok_file = None if tok else file_cfg.get("token_file")
        if tok_file:
            try:
                tok = Path(tok_file).expanduser().read_text().strip()
            except OSError as e:
                raise ClientError(f"cannot read token file {tok_file}: {e}", EXIT_USAGE) from None
        u = (pick(url, "TITAN_SUPERVISOR_URL", "url") or DEFAULT_URL).rstrip("/")
        if not u.startswith(("http://", "https://")):
            raise ClientError(f"supervisor URL {u!r} must start with http:// or https://", EXIT_USAGE)
        return cls(url=u, token=tok or None, timeout=timeout)


class Client:
    def __init__(self, config: ClientConfig, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        headers = {"User-Agent": "titan-supervisor-cli"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self.http = httpx.Client(base_url=config.url, headers=headers, timeout=config.timeout,
                                 transport=transport or httpx.HTTPTransport(retries=2))

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, *, json_body: Any = None, params: dict | None = None,
              attempts: int = 1) -> Any:
        last: Exception | None = None
        for i in range(attempts):
            try:
                r = self.http.request(method, path, json=json_body, params=params)
                break
            except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError) as e:
                last = e  # the answer was lost: safe to resend (same request_id)
                time.sleep(0.5 * (i + 1))
            except httpx.HTTPError as e:
                raise ClientError(f"cannot reach the supervisor at {self.config.url}: {e}", EXIT_UNREACHABLE) from None
        else:
            raise ClientError(f"no answer from the supervisor at {self.config.url}: {last}", EXIT_UNREACHABLE)
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:500] or r.reason_phrase}
        if r.status_code >= 400:
            msg = body.get("error") if isinstance(body, dict) else None
            if not msg and isinstance(body, dict):
                msg = str(body.get("detail") or r.reason_phrase)
            raise ClientError(msg or f"HTTP {r.status_code}", exit_code_for(r.status_code), r.status_code,
                              body.get("details") if isinstance(body, dict) else None)
        return body

    def get(self, path: str, **params) -> Any:
        return self._send("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict) -> Any:
        return self._send("POST", path, json_body=body, attempts=3 if body.get("request_id") else 1)

    def wait_action(self, action_id: int, timeout: float, on_tick=None) -> dict:
        """Poll an action until it is done / failed / abandoned (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            a = self.get(f"/v1/actions/{action_id}")
            if a.get("state") in ("done", "failed", "abandoned") or time.monotonic() >= deadline:
                return a
            if on_tick is not None:
                on_tick(a)
            time.sleep(0.5)
