"""Config sections as frozen dataclasses, built from plain mappings (no ml_collections
here, so the library imports without it)."""

from __future__ import annotations

import dataclasses
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
