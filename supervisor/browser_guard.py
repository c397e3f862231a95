"""Refuse what only a browser would send: the daemon serves no web page, so no browser request is legitimate.

Failure model: a web page open in a browser on a machine that can reach the daemon is hostile.
It can POST to 127.0.0.1 without asking first (a ``<form enctype="text/plain">`` or a
``fetch(..., {mode: "no-cors"})`` needs no CORS preflight), and a page reached through DNS
rebinding talks to the daemon under its own host name and can read the answers. Bearer tokens
already stop it (a browser adds an ``Authorization`` header cross-site only after a preflight,
which the daemon never answers), but with no tokens configured the reads are open and, with
``server.allow_unauthenticated_loopback = true``, so are the commands. What is guaranteed, in
every mode, before any route runs (so nothing is read, journaled or changed):

- a request that can change state (any method but GET, HEAD, OPTIONS) that carries an
  ``Origin`` header is refused, 403: browsers add it to every such request, and the daemon's
  clients (the CLI, trainers, node agents, Alertmanager) never send it;
- such a request whose ``Content-Type`` is not JSON (``application/json`` or ``*/*+json``), or
  that has a body and no ``Content-Type``, is refused, 415: the types a page may send without a
  preflight are form and text types;
- while no tokens are configured, a request whose ``Host`` is not a loopback address or
  ``localhost`` is refused, 403: a rebinding page names its own host.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from supervisor.hosts import is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _headers(scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def refusal(method: str, headers: dict[bytes, bytes], *, open_mode: bool) -> tuple[int, str] | None:
    """(status, why) if the request must be refused, else None. Pure."""
    if open_mode:
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not is_loopback(host):
            return 403, ("this supervisor has no tokens configured and answers only requests addressed "
                         f"to a loopback host, not {host[:64]!r} (a DNS-rebinding page names its own)")
    if method in SAFE_METHODS:
        return None
    if b"origin" in headers:
        return 403, "requests from a web browser (an Origin header) are refused: use the CLI or an API client"
    ctype = headers.get(b"content-type")
    has_body = headers.get(b"content-length", b"0").strip() not in (b"", b"0") or b"transfer-encoding" in headers
    if ctype is None:
        if has_body:
            return 415, "a body needs Content-Type: application/json"
        return None
    if not is_json(ctype.decode("latin-1")):
        return 415, f"Content-Type must be application/json, not {ctype.decode('latin-1')[:64]!r}"
    return None


def guard(open_mode: bool):
    """An ASGI wrapper (`Metrics.add_asgi_middleware`) applying `refusal` to every HTTP request."""
    def wrap(inner):
        async def check(scope, receive, send):
            if scope["type"] == "http":
                no = refusal(scope["method"], _headers(scope), open_mode=open_mode)
                if no is not None:
                    # Connection: close - the body is never read, so the connection is not drained
                    # for keep-alive (a 1 GiB chunked body would be read to its end to no purpose)
                    return await JSONResponse({"error": no[1], "details": []}, status_code=no[0],
                                              headers={"Connection": "close"})(scope, receive, send)
            await inner(scope, receive, send)
        return check
    return wrap
