"""Deterministic item ids.

WebDataset keys end at the first dot, and ids become file names and shard keys, so an id is
built only from ``[A-Za-z0-9-]`` parts joined by ``_``. The same inputs always give the same id.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")

#: Longest id: ids become file names (``<id>.parquet``, ``.tmp-<32 hex>-<id>.parquet`` while being
#: written, ``<id>/`` directories), and file names stop at 255 bytes on common filesystems.
MAX_ID_LENGTH = 128


def check_id_length(value: str) -> str:
    """``value`` if it is at most :data:`MAX_ID_LENGTH` characters, else ValueError saying so."""
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"id {value[:40]!r}... is {len(value)} characters, longer than {MAX_ID_LENGTH} (ids become "
                         "file names)")
    return value


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
    return check_id_length("_".join(id_part(p) for p in parts))
