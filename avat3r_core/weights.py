"""Loading user-supplied weight files safely and strictly, in one place.

Weight files are untrusted input: they are read with ``torch.load(weights_only=True)`` (tensors and
plain containers only, plus an explicit allow-list of globals such as ``argparse.Namespace``), and
a state_dict must match the network exactly. Every failure is a :class:`FormatError` naming the
file and listing what is wrong (missing keys, unexpected keys, shapes).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avat3r_core.errors import FormatError


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allowed_globals: Sequence[type] = ()) -> Any:
    """``torch.load(weights_only=True)``; refused or corrupt files raise FormatError naming ``path``."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
        raise
    except pickle.UnpicklingError as exc:
        raise FormatError(path, None, refusal_message(str(exc))) from None
    except Exception as exc:  # a corrupt file surfaces as many exception types inside torch.load
        raise FormatError(path, None, f"not a readable weights-only torch file: {type(exc).__name__}: {exc}"[:500]) from None


def refusal_message(torch_message: str) -> str:
    """What the weights-only unpickler refused, from torch's message, without its advice: torch
    suggests re-running with ``weights_only=False``, which would run whatever the file holds."""
    blocked = re.search(r"GLOBAL ([\w.]+)", torch_message)
    if blocked:
        return (f"refused by the weights-only loader: the file would import {blocked.group(1)}, which a weights file "
                "never needs (only tensors and plain containers are read); it is not loaded")
    detail = next((line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
                   for line in torch_message.splitlines() if "WeightsUnpickler error:" in line), "")
    return ("refused by the weights-only loader: " + (detail or "the file holds more than tensors and plain "
                                                          "containers") + "; it is not loaded")[:500]


def short_list(keys: Sequence[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", … (+{len(keys) - n})" if len(keys) > n else "")


def check_state_dict(expected: Mapping[str, Tensor], state_dict: Mapping[str, Any], source: Any,
                     what: str = "the network", field: str | None = None, ignorable: Sequence[str] = (),
                     field_prefix: str = "") -> None:
    """Raise FormatError unless ``state_dict`` has exactly ``expected``'s keys, tensors and shapes.

    ``ignorable`` keys may be present without being expected (e.g. a classifier the network drops).
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - set(ignorable))
    if missing or unexpected:
        raise FormatError(source, field if field is not None else short_list(missing + unexpected, 6),
                          f"state_dict does not match {what}: missing keys [{short_list(missing)}]; "
                          f"unexpected keys [{short_list(unexpected)}]")
    for key, ref in expected.items():
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise FormatError(source, f"{field_prefix}{key}", f"expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(ref.shape):
            raise FormatError(source, f"{field_prefix}{key}",
                              f"shape {tuple(value.shape)} differs from the expected {tuple(ref.shape)}")
