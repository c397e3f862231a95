"""Render a `Settings` tree as TOML with each field's doc as a comment (`titan-supervisor config`).

Why: users copy the printed defaults into their run file, so the output must be the whole tree,
valid TOML that loads back to the same settings, with the documentation next to every field.
Unset optional fields (None has no TOML spelling) are printed commented out.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from supervisor.config_types import field_doc


def children(node: Any) -> Iterator[tuple[str, Any, str]]:
    """(name, value, doc) of each field of a settings section or component Config."""
    if isinstance(node, BaseModel):
        for name, info in type(node).model_fields.items():
            yield name, getattr(node, name), info.description or ""
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield f.name, getattr(node, f.name), field_doc(type(node), f.name)


def is_table(value: Any) -> bool:
    return isinstance(value, BaseModel) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def toml_string(s: str) -> str:
    """A TOML basic string: quotes and backslashes escaped, every control or hidden character
    and every character beyond the BMP as a \\u / \\U escape (json.dumps wrote a surrogate pair
    for an emoji, which TOML refuses, so the printed config did not load back)."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif unicodedata.category(ch) == "Cs":
            raise ValueError(f"{s[:64]!r} holds a lone surrogate, which TOML cannot hold")
        elif o < 0x20 or 0x7F <= o < 0xA0 or unicodedata.category(ch) in ("Cf", "Zl", "Zp", "Co"):
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
        elif o > 0xFFFF:
            out.append(f"\\U{o:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} has no place in a config")
        return repr(v)
    if isinstance(v, (str, Path)):
        return toml_string(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(str(k))} = {value(x)}" for k, x in v.items()) + "}"
    if is_table(v):
        return value({k: x for k, x, _ in children(v) if x is not None})
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in text.splitlines()] if text else []


def to_toml(node: Any, prefix: str = "") -> str:
    lines: list[str] = []
    tables = []
    for name, v, doc in children(node):
        if is_table(v):
            tables.append((name, v, doc))
            continue
        lines += _comment(doc)
        lines.append(f"# {name} =   (unset)" if v is None else f"{name} = {value(v)}")
    for name, v, doc in tables:
        path = f"{prefix}{name}"
        lines += ["", *_comment(doc), f"[{path}]"]
        lines.append(to_toml(v, path + ".").rstrip("\n"))
    return "\n".join(line for line in lines) + "\n"
