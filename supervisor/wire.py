"""Everything that comes off the wire passes through here once: bodies, JSON, numbers, strings.

Why one module: the daemon's routes (trainer ingest in `supervisor.api`, operator commands and
the Alertmanager receiver in `supervisor.control`) each used to read and parse bodies their own
way, and each way had its own hole (a 1 GiB body read whole before the size check, ``1e400``
parsed as ``inf`` and journaled, a lone surrogate that SQLite cannot encode). Here:

- `read_body` caps a body *while it streams*: a declared ``Content-Length`` over the limit is
  refused before a byte is read, and a chunked body is abandoned as soon as it passes the limit,
  so a huge body costs the daemon at most ``limit`` bytes of memory.
- `loads` parses JSON with numbers that must be finite (``1e400`` overflows to inf: refused) and,
  unless ``allow_nan``, without the ``NaN``/``Infinity`` literals; every string in the result has
  invalid Unicode (lone surrogates) replaced, so whatever is stored can be encoded and read back.
- `check_wall_time` puts a time from a request within a window of the daemon's clock (a forged
  future heartbeat must not push a hang deadline out of reach).
- `inert` renders any string from outside harmless for a terminal or a log line: control
  characters (ANSI escapes, carriage returns) become visible ``\\x1b`` escapes and rich markup
  brackets are escaped, so a reason or an alert name prints as the text it is.

Failure model: every refusal is a `WireError` with the HTTP status to answer and a message that
says what is wrong; nothing here changes any state.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from typing import Any

import msgspec

#: steps, sample counts and other integers from the wire stay below this (JSON-safe, SQLite-safe)
MAX_WIRE_INT = 2**53


def ascii_int(text: object, max_digits: int = 18) -> int | None:
    """``text`` as a non-negative integer when it is 1..``max_digits`` ASCII digits, else None.

    The one check for an integer written as text by someone else (a path id, a header, a CLI
    argument, a fault spec, a child's environment): ``int()`` reads "４２" as 42, "1_0" as 10 and
    " +1" as 1, and ``str.isdigit()`` is true for "²", which ``int()`` then refuses with a
    ValueError. 18 digits stay below 2**63 (SQLite's integer)."""
    if isinstance(text, str) and 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


class WireError(Exception):
    """A request that is refused before anything happens (status: the HTTP status to answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request, limit: int) -> bytes:
    """The request body, or `WireError(413)` as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        n = ascii_int(declared)
        if n is None:
            raise WireError(400, f"Content-Length {declared[:32]!r} is not a number")
        if n > limit:
            raise WireError(413, f"body is {n} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WireError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:32]} is out of range (not a finite float)")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed here")


def loads(raw: bytes, *, allow_nan: bool = False) -> Any:
    """Parse a JSON body (see the module docstring); `WireError(400)` if it is not acceptable.

    msgspec first (a C parser, ~6x the stdlib's speed on a node report): it accepts only strict
    JSON in valid UTF-8 with finite numbers and no lone surrogates, and on such input gives what
    `json.loads` gives. Anything it refuses (NaN literals, 1e400, a lone surrogate, UTF-16, a
    BOM, garbage) takes the stdlib path below, which decides as it always did."""
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass
    try:
        obj = json.loads(raw, parse_float=_finite_float,
                         **({} if allow_nan else {"parse_constant": _no_constant}))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise WireError(400, f"body is not JSON: {e}") from None
    return clean_strings(obj)


def clean_text(s: str) -> str:
    """``s`` with invalid Unicode (lone surrogates) replaced by U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def clean_strings(obj: Any) -> Any:
    """``obj`` with `clean_text` applied to every string in it (keys included)."""
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, dict):
        return {clean_text(k): clean_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_strings(v) for v in obj]
    return obj


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON can carry it: non-finite floats as "nan"/"inf"/"-inf", strings cleaned."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, dict):
        return {clean_text(str(k)): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def check_wall_time(t: float, now: float, *, future_s: float, past_s: float) -> None:
    """Raise ValueError unless ``t`` is within [now - past_s, now + future_s]."""
    if not math.isfinite(t):
        raise ValueError("must be finite")
    if t > now + future_s:
        raise ValueError(f"is {t - now:.1f} s ahead of the supervisor's clock (at most {future_s:g} s allowed)")
    if t < now - past_s:
        raise ValueError(f"is {now - t:.0f} s behind the supervisor's clock (at most {past_s:g} s allowed)")


# What a terminal or a page does not show as itself: controls (C0, C1), format characters (bidi
# marks and overrides, zero-width ones, soft hyphen, tag characters), line and paragraph
# separators, private-use characters. By category, not a hand-written range list.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Co"})


def _spell_hidden(s: str) -> str:
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _HIDDEN else ch
                   for ch in s)


def inert(value: Any, *, newlines: bool = False, markup: bool = True) -> str:
    """``value`` as text that a terminal or a log shows literally: control characters (escape
    sequences, carriage returns, bidi overrides) spelled out, and rich markup escaped (``markup``:
    the text goes to rich as markup; False for a `rich.text.Text`, which takes no markup)."""
    s = clean_text(value if isinstance(value, str) else str(value))
    if not newlines:
        s = s.replace("\n", "\\n")
    s = _spell_hidden(s.replace("\t", " ")) if newlines is False else "\n".join(
        _spell_hidden(line) for line in s.replace("\t", " ").split("\n"))
    if markup:
        from rich.markup import escape

        s = escape(s)
    return s


_MARKDOWN = re.compile(r"([\\`*_\[\]()#!|~>])")


def web_text(value: Any, limit: int = 500) -> str:
    """``value`` as text a web page (a Grafana annotation) shows literally: hidden characters and
    newlines spelled out as by `inert`, HTML escaped, Markdown's link and emphasis characters
    backslash-escaped; at most ``limit`` characters of the source."""
    s = inert(str(value)[:limit], markup=False)
    return _MARKDOWN.sub(r"\\\1", html.escape(s, quote=True))
