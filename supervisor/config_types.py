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

import json
import typing
from typing import Annotated, Any

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
