"""Errors that name what was wrong and where.

Every reader of an external file raises :class:`FormatError` with the path and the field at
fault, so a log line points a data engineer straight at the broken input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Avat3rError(Exception):
    """Base class of the project's own errors."""


class FormatError(Avat3rError, ValueError):
    """An input file (or in-memory record) does not have the expected layout.

    ``path`` is the file (or a description of the object), ``field`` the key/column/property at
    fault (``None`` when the whole file is unreadable).
    """

    def __init__(self, path: str | Path | None, field: str | None, message: str):
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message
        where = self.path or "<in-memory>"
        if field:
            where = f"{where} [{field}]"
        super().__init__(f"{where}: {message}")


class NonFiniteError(FormatError):
    """A tensor that must be finite holds NaN or Inf."""


def check_finite(value, path: str | Path | None, field: str) -> None:
    """Raise :class:`NonFiniteError` naming ``field`` if ``value`` (tensor/array) is not finite."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        bad = (~torch.isfinite(value)).sum().item() if value.is_floating_point() else 0
        total = value.numel()
    else:
        arr = np.asarray(value)
        bad = int((~np.isfinite(arr)).sum()) if np.issubdtype(arr.dtype, np.floating) else 0
        total = arr.size
    if bad:
        raise NonFiniteError(path, field, f"{bad} of {total} values are NaN or Inf")


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_size(value: Any, path: Any, field: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise FormatError(path, field, f"expected a positive integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise FormatError(path, field, f"expected a positive integer, got {value}")
    return int(value)
