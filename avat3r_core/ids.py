"""Deterministic item ids.

WebDataset keys end at the first dot, and ids become file names and shard keys, so an id is
built only from ``[A-Za-z0-9-]`` parts joined by ``_``. The same inputs always give the same id.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


def id_part(value: object) -> str:
    """One id component: ints are zero-padded to 6 digits, other values sanitised."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:06d}"
    text = _UNSAFE.sub("-", str(value)).strip("-")
    if not text:
        raise ValueError(f"id component {value!r} has no usable characters")
    return text


def make_id(*parts: object) -> str:
    """``make_id("001", "EXP-1.head", 12)`` → ``"001_EXP-1-head_000012"``."""
    if not parts:
        raise ValueError("an id needs at least one part")
    return "_".join(id_part(p) for p in parts)
