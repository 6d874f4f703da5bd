"""Parsing untrusted JSON and YAML: every failure is a :class:`FormatError` naming the file.

The parsers themselves raise more than their documented errors on hostile input: a file of 200k
``[`` makes ``json.loads`` (and PyYAML's composer) recurse until ``RecursionError``, and a huge
file can raise ``MemoryError``. Caught bare, those stop a scan of many subjects at the first bad
file; here they become one named problem for that file, and files larger than ``max_bytes`` are
refused before they are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avat3r_core.errors import FormatError

#: No metadata file the project reads (calibrations, library manifests, params) comes near this.
MAX_BYTES = 64 << 20


def _guarded(parse, text: str, path: str | Path | None, what: str) -> Any:
    try:
        return parse(text)
    except RecursionError:
        raise FormatError(path, None, f"{what} nested too deeply to parse") from None
    except MemoryError:
        raise FormatError(path, None, f"{what} too large to parse in memory") from None


def parse_json(text: str | bytes, path: str | Path | None) -> Any:
    """``json.loads`` of ``text`` (from ``path``, for messages)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(path, None, f"not UTF-8 text: {exc}") from None
    try:
        return _guarded(json.loads, text, path, "JSON")
    except json.JSONDecodeError as exc:
        raise FormatError(path, None, f"invalid JSON: {exc}") from None


def parse_yaml(text: str, path: str | Path | None) -> Any:
    """``yaml.safe_load`` of ``text`` (from ``path``, for messages)."""
    import yaml

    try:
        return _guarded(yaml.safe_load, text, path, "YAML")
    except yaml.YAMLError as exc:
        raise FormatError(path, None, f"invalid YAML: {exc}") from None


def read_text(path: str | Path, max_bytes: int = MAX_BYTES) -> str:
    """A metadata file's UTF-8 text, refusing files over ``max_bytes`` (checked before reading);
    ``path`` may be a URI (``s3://...``) or a UPath."""
    from avat3r_core import storage

    path = storage.as_path(path) if isinstance(path, str) else path
    size = path.stat().st_size
    if size > max_bytes:
        raise FormatError(path, None, f"{size} bytes, more than the {max_bytes} a metadata file may have")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, None, f"not UTF-8 text: {exc}") from None


def read_json(path: str | Path, max_bytes: int = MAX_BYTES) -> Any:
    return parse_json(read_text(path, max_bytes), path)


def read_yaml(path: str | Path, max_bytes: int = MAX_BYTES) -> Any:
    return parse_yaml(read_text(path, max_bytes), path)
