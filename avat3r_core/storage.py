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

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from avat3r_core.errors import Avat3rError

log = logging.getLogger("avat3r.storage")


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
    try:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    except BaseException:  # a full disk, a kill: leave no half-written temp behind
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass
        raise
    return len(data)


def is_disk_full(exc: BaseException) -> bool:
    """``exc`` is the filesystem saying it has no room (no space, or over quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


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


# --------------------------------------------------------------------------- one writer per output
LOCK_NAME = ".lock"


class OutputLocked(Avat3rError):
    """Another run holds the output's lock; ``holder`` is what it recorded (host, pid, start, command)."""

    def __init__(self, out_dir: str, holder: dict):
        self.out_dir, self.holder = out_dir, holder
        super().__init__(
            f"{out_dir} is being written by another run (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}, command {holder.get('command', '?')!r}); two runs on one output "
            f"would mix their items: wait for it to finish or write elsewhere")


def _holder_record(command: str | None) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "command": (command or " ".join(sys.argv))[:500], "heartbeat": now}


def _parse_holder(data: bytes) -> dict:
    try:
        holder = json.loads(data.decode()) if data else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {"command": "<unreadable lock record>"}
    return holder if isinstance(holder, dict) else {"command": "<unreadable lock record>"}


def _process_gone(holder: dict) -> bool:
    """The holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class OutputLock:
    """One writer per output directory, held for a whole stage run.

    Local outputs: ``flock`` on ``<out>/.lock``; the kernel drops it when the holder dies (even by
    ``kill -9``), so a lock left by a killed run is simply taken over. The file records the
    holder (host, pid, start, command) for the refusal message. Other filesystems (object
    storage has no locks): an exclusive-create marker ``<out>/.lock`` with the same record and a
    heartbeat refreshed every ``heartbeat_s``; a marker whose heartbeat is older than
    ``stale_after_s`` (or whose process is gone, on this host) is a killed run's and is taken
    over. Re-entrant per thread: a run holding ``<out>`` already owns everything below it (the
    extract stage's ``head_centers/`` pass).
    """

    _held = threading.local()

    def __init__(self, out_dir: str | Path, command: str | None = None, heartbeat_s: float = 15.0,
                 stale_after_s: float = 120.0):
        self.out_dir = str(out_dir).rstrip("/")
        self.command = command
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.local = local_path(self.out_dir)
        self._key = str(Path(self.local).resolve()) if self.local is not None else self.out_dir
        self._fd: int | None = None
        self._record: dict | None = None
        self._stop = None
        self.nested = False
        self.took_over: dict | None = None  # the record of the killed run whose lock this one took over

    @classmethod
    def _held_keys(cls) -> list[str]:
        if not hasattr(cls._held, "keys"):
            cls._held.keys = []
        return cls._held.keys

    def __enter__(self) -> "OutputLock":
        held = self._held_keys()
        if any(self._key == k or self._key.startswith(k.rstrip("/") + "/") for k in held):
            self.nested = True
            return self
        makedirs(self.out_dir)
        self._acquire_local() if self.local is not None else self._acquire_remote()
        held.append(self._key)
        if self.took_over:
            log.warning("%s: took over the lock of a run that was killed (host %s, pid %s, started %s, command %r)",
                        self.out_dir, self.took_over.get("host", "?"), self.took_over.get("pid", "?"),
                        self.took_over.get("started", "?"), self.took_over.get("command", "?"))
        return self

    def __exit__(self, *exc) -> None:
        if self.nested:
            return
        self._held_keys().remove(self._key)
        self._release_local() if self.local is not None else self._release_remote()

    # local: flock
    def _acquire_local(self) -> None:
        path = os.path.join(self.local, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_holder(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            raise OutputLocked(self.out_dir, holder) from None
        previous = os.pread(fd, 1 << 16, 0)
        if previous:  # released locks are emptied: a record here is a run that died holding it
            self.took_over = _parse_holder(previous)
        self._record = _holder_record(self.command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._record).encode(), 0)
        self._fd = fd

    def _release_local(self) -> None:
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    # other filesystems: exclusive-create marker + heartbeat
    def _marker(self) -> str:
        return join(self.out_dir, LOCK_NAME)

    def _acquire_remote(self) -> None:
        fs, path = url_to_fs(self._marker())
        self._record = _holder_record(self.command)
        for _ in range(2):  # the second try follows the removal of a stale marker
            try:
                with fs.open(path, "xb") as handle:
                    handle.write(json.dumps(self._record).encode())
                break
            except FileExistsError:
                try:
                    holder = _parse_holder(read_bytes(self._marker()))
                except FileNotFoundError:  # released between the two calls
                    continue
                age = time.time() - float(holder.get("heartbeat", 0) or 0)
                if age <= self.stale_after_s and not _process_gone(holder):
                    raise OutputLocked(self.out_dir, holder) from None
                self.took_over = holder
                remove(self._marker())
        else:
            raise OutputLocked(self.out_dir, _parse_holder(read_bytes(self._marker())))
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name=f"output-lock {self.out_dir}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if _parse_holder(read_bytes(self._marker())).get("token") != self._record["token"]:
                    log.error("the lock of %s was taken by another run", self.out_dir)
                    return
                self._record["heartbeat"] = time.time()
                atomic_write_bytes(self._marker(), json.dumps(self._record).encode())
            except OSError as exc:  # a transient storage error; the next beat retries
                log.warning("lock heartbeat of %s failed: %s", self.out_dir, exc)

    def _release_remote(self) -> None:
        self._stop.set()
        try:
            if _parse_holder(read_bytes(self._marker())).get("token") == self._record["token"]:
                remove(self._marker())
        except FileNotFoundError:
            pass


def output_lock(out_dir: str | Path, command: str | None = None, **kwargs) -> OutputLock:
    """``with output_lock(out): ...``: hold ``out`` for one run (see :class:`OutputLock`)."""
    return OutputLock(out_dir, command, **kwargs)
