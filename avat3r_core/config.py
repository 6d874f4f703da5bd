"""Typed configuration: one dataclass per component, named presets, values from ``params.yaml``.

Each component defines a dataclass and (optionally) a ``PRESETS`` dict of named overrides
(``tiny`` for CPU and tests, ``paper`` for the published model, ...). :func:`build` resolves
``preset`` → dataclass defaults + preset + explicit values, rejecting unknown keys by name, so the
CLI, the Prefect flows and DVC (through ``params.yaml``) all build the very same objects. Nested
sections merge key by key: a preset's ``optim: {lr: ...}`` and a value ``optim: {grad_clip: ...}``
give both keys. A key a dataclass renamed (its ``RENAMED`` map) raises :class:`RenamedKeyError`
naming the new key.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from avat3r_core.errors import FormatError
from avat3r_core.formats.parsing import read_yaml

T = TypeVar("T")


class RenamedKeyError(FormatError):
    """A config key that moved (e.g. ``train.steps`` → ``train.schedule.steps``); the message names
    the new key."""


def _check_renamed(cls: type, keys: set[str], source: str) -> None:
    renamed = getattr(cls, "RENAMED", {})
    moved = sorted(k for k in keys if k in renamed)
    if moved:
        prefix = source.rsplit(":", 1)[1] + "." if ":" in source else ""
        raise RenamedKeyError(source, ", ".join(moved), "renamed: " + "; ".join(
            f"{prefix}{k} is now {prefix}{renamed[k]}" for k in moved))


def merge(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over ``base``, section by section: where both hold a mapping under one key, their
    keys merge (recursively) instead of the value replacing the base's whole section."""
    out = dict(base)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any] | None, source: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise FormatError naming them."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _check_renamed(cls, set(data) - names, source)
    unknown = sorted(set(data) - names - {"preset"})
    if unknown:
        raise FormatError(source, ", ".join(unknown), f"unknown key(s) for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        if name == "preset":
            continue
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = build(hint, value, source=f"{source}.{name}")  # a nested section may name a preset
        elif isinstance(value, list) and hint is not None and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FormatError:
        raise
    except (TypeError, ValueError) as exc:  # a value the dataclass rejects: name where it came from
        raise FormatError(source, None, f"invalid {cls.__name__}: {exc}") from exc


def build(cls: type[T], values: dict[str, Any] | None = None, preset: str | None = None, source: str = "config") -> T:
    """Defaults ← preset (``values['preset']`` or ``preset``) ← explicit ``values``."""
    values = dict(values or {})
    preset = values.pop("preset", None) or preset
    merged: dict[str, Any] = {}
    if preset:
        presets = getattr(cls, "PRESETS", {})
        if preset not in presets:
            raise FormatError(source, "preset", f"unknown preset {preset!r} for {cls.__name__}; known: {sorted(presets)}")
        merged = merge(merged, presets[preset])
    return from_dict(cls, merge(merged, values), source)


class Presets:
    """Mixin for config dataclasses: ``Cls.preset("tiny", key=value)`` = :func:`build` with a preset."""

    PRESETS: ClassVar[dict] = {}

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        return build(cls, overrides, preset=name, source=cls.__name__)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FormatError(path, None, "params file not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise FormatError(path, None, "top level must be a mapping of sections")
    return data


def section(params: dict[str, Any], name: str, cls: type[T], source: str = "params.yaml") -> T:
    return build(cls, params.get(name) or {}, source=f"{source}:{name}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def pick_device(device: str):
    """The torch device a config's ``device`` string names: ``auto`` (CUDA when this process sees a
    GPU, else CPU), ``cpu`` or ``cuda`` (an error when no GPU is visible: a silent CPU fallback
    would hide a misconfigured worker)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available to this worker")
    return torch.device(device)


def set_cpu_threads(n: int | None) -> None:
    """Limit torch's intra-op threads and numba's (the CPU renderer) to ``n``; ``0``/``None`` leaves
    both as they are (one per core unless the environment says otherwise). Both share the
    OpenMP runtime: numba's OpenMP layer resets the OpenMP thread count to its own at each parallel
    launch, so limiting torch alone does not hold. More threads than free cores costs far more than
    it gains: OpenMP's spinning threads made every torch op 20-45x slower on a shared 2-core machine."""
    if n is None or n <= 0:
        return
    import torch

    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency of the CPU renderer
        pass
    torch.set_num_threads(n)
