"""Check a dataclass's values against its field types, generically (``FitConfig`` from JSON files).

JSON gives strings, floats and bools where a field wants something else (``"steps": "5"``,
``"loglik_features": "false"``, ``"seed": 1e308``); :func:`check_fields` refuses them with the key and
the bad value, from the annotations alone, so a new field is covered as soon as it is declared.
Accepted: ``bool`` only for ``bool``; ``int`` (not bool) for ``int``, within ``INT_RANGE``; ``int``
or ``float`` (finite; converted) for ``float``; ``str`` for ``str``; ``None`` where the type allows it.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import fields

from .errors import ConfigError

INT_RANGE = (-(2**31), 2**31 - 1)  # no count, seed or size of a run is larger; beyond it torch overflows


def _allowed(annotation) -> tuple[set, bool]:
    """``({base types}, None allowed)`` of ``int``, ``float | None``, ``Optional[str]``, ..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return {a for a in args if a is not type(None)}, type(None) in args
    return {annotation}, False


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def checked_value(name: str, annotation, value):
    """``value`` (an int made float for a float field) or a :class:`ConfigError` naming ``name``."""
    kinds, optional = _allowed(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"key {name!r}: expected {_names(kinds)}, got null")
    if bool in kinds and isinstance(value, bool):
        return value
    if int in kinds and isinstance(value, int) and not isinstance(value, bool):
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise ConfigError(f"key {name!r}: {value} is out of range [{INT_RANGE[0]}, {INT_RANGE[1]}]")
        return value
    if float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"key {name!r}: expected a finite number, got {value!r}")
        return float(value)
    if str in kinds and isinstance(value, str):
        return value
    if not kinds & {bool, int, float, str}:  # a type this checker does not know: leave it to validate()
        return value
    raise ConfigError(f"key {name!r}: expected {_names(kinds)}{' or null' if optional else ''}, "
                      f"got {_describe(value)}")


def _names(kinds: set) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return " or ".join(words.get(k, getattr(k, "__name__", str(k))) for k in sorted(kinds, key=str))


def check_fields(instance) -> None:
    """Check (and normalise, int -> float) every field of dataclass ``instance`` against its annotation."""
    hints = typing.get_type_hints(type(instance))
    for f in fields(instance):
        setattr(instance, f.name, checked_value(f.name, hints[f.name], getattr(instance, f.name)))
