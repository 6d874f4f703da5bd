"""One filesystem layer for local paths and remote URIs (``s3://``, ``gs://``, ``memory://`` ...).

Everything that writes a manifest or a media file goes through here, so a run works unchanged
against object storage once data outgrows a disk. Writes are atomic: locally, write to a
temporary name in the same directory, then rename (a killed writer leaves at worst a ``.tmp-*``
file that no reader looks at); on an object store, one upload under the final key (see
:func:`atomic_write_bytes`).

Object storage: ``s3://bucket/prefix`` through s3fs. Endpoint and credentials come from the
standard variables: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile,
``AWS_PROFILE``), ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server,
and fsspec's ``FSSPEC_S3_<ARGUMENT>`` for any s3fs argument (``FSSPEC_S3_ENDPOINT_URL`` ...).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def url_to_fs(uri: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def as_path(uri: str | Path):
    """A pathlib-style handle on ``uri``: a :class:`~pathlib.Path` for a local path, a ``UPath``
    (universal_pathlib: the same API over fsspec, ``str()`` keeps the ``s3://``) for a URI, so
    code that walks a directory tree (capture layouts) walks a bucket the same way."""
    text = str(uri)
    if "://" in text and not text.startswith("file://"):
        from upath import UPath

        return UPath(text)
    return Path(text.removeprefix("file://"))


def absolute(uri: str | Path):
    """:func:`as_path`, made absolute when local (a URI is absolute already)."""
    path = as_path(uri)
    return path.resolve() if isinstance(path, Path) and "://" not in str(uri) else path


def join(base: str | Path, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts if p]])


def exists(uri: str | Path) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def makedirs(uri: str | Path) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def atomic_write_bytes(uri: str | Path, data: bytes) -> int:
    """Write ``data`` to ``uri`` atomically; returns the byte count.

    A local file: temp file in the same directory, then rename. An object store (``s3://`` ...)
    has no rename (s3fs's ``mv`` is copy + delete), but an object appears only when its upload
    completes, whole, under its final key: so the object is written once, under its own name, and
    a killed writer leaves nothing (an unfinished upload is never listed). The runner's commit
    protocol (media first, then the item's fragment as the completion marker) holds on both.
    """
    fs, path = url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return len(data)
    name = path.rsplit("/", 1)[-1]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}" if parent else f".tmp-{uuid.uuid4().hex}-{name}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)
    return len(data)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def sha256(uri: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (shards, checkpoints, cache inputs)."""
    fs, path = url_to_fs(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(uri: str | Path) -> bytes:
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_parquet(table: pa.Table, uri: str | Path) -> int:
    """Write a parquet table atomically; returns the byte count."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return atomic_write_bytes(uri, buffer.getvalue())


def read_parquet(uri: str | Path) -> pa.Table:
    fs, path = url_to_fs(uri)
    return pq.read_table(path, filesystem=fs)


def list_files(uri: str | Path, suffix: str = "") -> list[str]:
    """Full URIs/paths of the files directly under ``uri`` ending in ``suffix`` (skips temp files)."""
    fs, path = url_to_fs(uri)
    # an object store's listing is cached per process (s3fs): what other processes committed since
    # (workers, an earlier run) must be seen
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    out = []
    for entry in fs.ls(path, detail=False):
        name = entry.rsplit("/", 1)[-1]
        if name.startswith(".tmp-") or not name.endswith(suffix):
            continue
        out.append(prefix + entry)
    return sorted(out)


def remove(uri: str | Path) -> None:
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def local_path(uri: str | Path) -> str | None:
    """The operating-system path of ``uri`` when it is on the local filesystem, else None (for
    readers that let a library open local files themselves, reading only what they need)."""
    fs, path = url_to_fs(uri)
    return path if _is_local(fs) else None


def local_files_named_in(value) -> list[str]:
    """Existing local files that a config or work item names (strings anywhere inside dicts and
    lists that are paths of files): their content is an input too."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in local_files_named_in(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in local_files_named_in(v)]
    if isinstance(value, str) and value and len(value) < 4096 and "://" not in value:
        try:
            return [value] if Path(value).is_file() else []
        except OSError:
            return []
    return []


def read_image(uri: str | Path, gray: bool = False) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3), or (H, W) with ``gray``. A missing file raises
    FileNotFoundError, one that does not decode a FormatError; both name the file."""
    import cv2

    from avat3r_core.errors import FormatError

    data = read_bytes(uri)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise FormatError(uri, None, "cannot decode the image (corrupt, empty or not an image)")
    return image if gray else np.ascontiguousarray(image[..., ::-1])
