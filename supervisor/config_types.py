"""Field types for the components' ``Config`` dataclasses: the validation rules of the settings.

Why: every tunable number lives in its own component's stdlib ``@dataclass Config`` (detectors,
policy, preflight, journal, catalog, launcher) so the component stays pure and constructible
without any settings. ``supervisor.settings.Settings`` holds those very dataclasses; pydantic
validates them from TOML, environment and flags using the ``Annotated`` metadata here, and
``titan-supervisor config --defaults`` prints each field's ``doc``.

Failure model: a value outside a field's range (nan, inf, a negative or zero duration, a
boolean where a number is meant, a float where an integer is meant) is rejected with the
field's dotted name; nothing here clamps or coerces silently. Cross-field rules (floor <=
ceiling, ...) live in each Config's ``__post_init__``, which pydantic runs too.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    return v


def _json_list(v: Any) -> Any:
    """Lists from the environment arrive as JSON text: ``TITAN_SUPERVISOR_DETECT__STALL__SLOW_PHASES='["a"]'``."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError(f"expected a list (JSON in the environment), got {v!r}") from None
    return v


def doc(text: str):
    """The field's documentation (printed as a comment by ``config --defaults``)."""
    return Field(description=text)


_finite = {"allow_inf_nan": False}
#: a duration in seconds: finite and > 0
Seconds = Annotated[float, BeforeValidator(_no_bool), Field(gt=0, **_finite)]
#: a duration in seconds where 0 means "at once"
SecondsOrZero = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, **_finite)]
PositiveFloat = Annotated[float, BeforeValidator(_no_bool), Field(gt=0, **_finite)]
NonNegativeFloat = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, **_finite)]
Fraction = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, le=1, **_finite)]
PositiveInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
NonNegativeInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_json_list)]
StringPairs = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_json_list)]
#: [low, high] of non-negative numbers (order checked by the owning Config)
Range = Annotated[tuple[NonNegativeFloat, NonNegativeFloat], BeforeValidator(_json_list)]
PositivePairs = Annotated[tuple[tuple[PositiveFloat, PositiveFloat], ...], BeforeValidator(_json_list)]


def field_doc(cls: type, name: str) -> str:
    """The ``doc(...)`` text of dataclass field ``name`` ('' when it has none)."""
    hint = typing.get_type_hints(cls, include_extras=True).get(name)
    for meta in reversed(getattr(hint, "__metadata__", ())):
        text = getattr(meta, "description", None)
        if text:
            return text
    return ""


def check_regexes(patterns) -> None:
    """Compile each pattern once so a bad regex is a config error, not a crash mid-run."""
    import re

    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{p!r} is not a valid regex: {e}") from None


def _scalar_types(tp: Any) -> set:
    """The plain types an annotation admits: Annotated and Optional/Union unwrapped; a Literal
    admits the types of its values."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _scalar_types(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in typing.get_args(tp)))
    if origin is Literal:
        return {type(v) for v in typing.get_args(tp)}
    return {tp} if isinstance(tp, type) else {object}


def _table_fields(cls: type) -> dict[str, Any] | None:
    """Field name -> annotation of a settings table (a pydantic model or a dataclass), else None."""
    model_fields = getattr(cls, "model_fields", None)
    if isinstance(model_fields, dict):
        return {name: info.annotation for name, info in model_fields.items()}
    if dataclasses.is_dataclass(cls):
        return typing.get_type_hints(cls, include_extras=True)
    return None


def quoted_scalars(data: dict, cls: type, prefix: str = "") -> list[str]:
    """Numbers and booleans written as TOML strings ("9000", "false") in a settings file, one
    message per field. pydantic's lax mode takes them (it must, for the environment, where
    everything is text), but in a file they are a typo or a template that quoted a value, and
    "0" becomes False. Pure: judged on the table classes' annotations; unknown keys are left to
    the validator, which names them."""
    fields = _table_fields(cls) or {}
    out = []
    for key, val in data.items():
        if key not in fields:
            continue
        dotted, kinds = f"{prefix}{key}", _scalar_types(fields[key])
        tables = [t for t in kinds if _table_fields(t) is not None]
        if isinstance(val, dict) and tables:
            out += quoted_scalars(val, tables[0], dotted + ".")
        elif isinstance(val, str) and not kinds & {str, object, Path} and kinds & {bool, int, float}:
            kind = "true or false" if kinds <= {bool, type(None)} else "a number"
            out.append(f"{dotted}: expected {kind}, got the string {val[:40]!r} (write it without quotes)")
    return out
