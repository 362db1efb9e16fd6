"""Read typed fields out of parsed JSON, with errors that name the field (`a.b[2].c`)."""

from __future__ import annotations

from typing import Any

from .engine_errors import EnginePlanError

_MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def check_type(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    """`value` if it is a `kind` (a bool is never an int here); EnginePlanError otherwise."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    is_bool_as_number = isinstance(value, bool) and bool not in kinds
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if is_bool_as_number or not isinstance(value, kinds):
        raise EnginePlanError(f"{where}: expected {_type_name(kind)}, got {value!r}")
    return value


def field(
    d: Any, key: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING
) -> Any:
    """`d[key]` checked to be a `kind`; a missing key is an error unless `default` is given.

    `kind` may include `type(None)` for nullable fields.
    """
    if not isinstance(d, dict):
        raise EnginePlanError(f"{where}: expected an object, got {d!r}")
    if key not in d:
        if default is _MISSING:
            raise EnginePlanError(f"{where}.{key}: missing")
        return default
    return check_type(d[key], kind, f"{where}.{key}")


def str_tuple(d: Any, key: str, where: str) -> tuple[str, ...]:
    """`d[key]` as a tuple of strings (a JSON list of strings)."""
    items = field(d, key, list, where)
    return tuple(check_type(v, str, f"{where}.{key}[{i}]") for i, v in enumerate(items))


def int_tuple(value: Any, where: str) -> tuple[int, ...]:
    """A JSON list of integers as a tuple."""
    items = check_type(value, list, where)
    return tuple(check_type(v, int, f"{where}[{i}]") for i, v in enumerate(items))
