"""Config sections as frozen dataclasses, built from plain mappings and checked
against their annotations (no ml_collections here, so the library imports
without it)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any


def from_mapping(
    cls: type, d: Mapping, section: str, nested: Mapping[str, Callable[[Any], Any]] | None = None
) -> Any:
    """``cls(**d)``, naming unknown keys (and the valid ones) and missing fields in a
    ValueError; ``nested`` builds sub-sections (key -> builder) first."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {section} key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        )
    for key, build in (nested or {}).items():
        if key in d:
            d[key] = build(d[key])
    try:
        return cls(**d)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{section}: {e}") from None


def check_types(cls: type, values: Mapping[str, Any], section: str) -> None:
    """ValueError naming the first field of ``values`` whose value does not have the
    type annotated on the dataclass ``cls`` (an int is a valid float; nested
    dataclasses given as mappings are checked field by field). Unknown fields are
    left to ``from_mapping``, which names them."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints:
            _check_type(hints[name], value, f"{section}.{name}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_type(tp: Any, value: Any, path: str) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(option, value, path)
            except ValueError:
                pass
        raise ValueError(f"{path}={value!r}: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return check_types(tp, value, path)
        ok = isinstance(value, tp)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (tuple, list):
        ok = isinstance(value, tuple | list)
    else:
        return
    if not ok:
        raise ValueError(f"{path}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
