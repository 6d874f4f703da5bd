"""Library manifests: which avatars to build from what (one row per avatar; CSV, YAML or Parquet).

See :mod:`avat3r_core.reconstruct` for the columns. Relative paths are relative to the library file;
errors name the file, the row and the field."""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.formats.parsing import parse_json, read_yaml
from avat3r_core.ids import check_id_length, id_part
from avat3r_core.reconstruct.errors import UnreadableInputError

log = logging.getLogger("avat3r.reconstruct")


MODES = ("capture", "photos", "image", "video")


LIBRARY_COLUMNS = ("avatar_id", "mode", "source", "subject", "sequence", "frame", "expressions", "priors", "tracking")


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class LibraryEntry:
    """One avatar to build (paths absolute after :func:`read_library`)."""

    avatar_id: str
    mode: str
    source: str
    subject: str | None = None
    sequence: str | None = None
    frame: int | None = None
    expressions: str | None = None
    priors: str | None = None
    tracking: str | None = None
    library: str = ""  # the library file it came from (for messages)
    row: int = 0  # 1-based row in that file

    def to_item(self) -> dict:
        """The stage item: JSON-able, with the runner's ``id``."""
        return {"id": self.avatar_id, **asdict(self)}

    @classmethod
    def from_item(cls, item: dict) -> "LibraryEntry":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in item.items() if k in names})

    def where(self) -> str:
        return f"{self.library} row {self.row} (avatar {self.avatar_id})"

    def image_paths(self) -> list[str]:
        """Photos mode: the images of the folder (sorted) or the ``;``-separated list."""
        if ";" in self.source:
            return [p for p in self.source.split(";") if p]
        path = Path(self.source)
        if path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise UnreadableInputError(path, f"no images ({', '.join(IMAGE_EXTS)}) in the folder")
            return files
        return [self.source]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _resolve(base: Path, value: str) -> str:
    """Library paths are relative to the library file; ``;`` lists and ``#`` selectors survive."""
    if "://" in value:
        return value
    if ";" in value:
        return ";".join(_resolve(base, v) for v in value.split(";") if v)
    path, sep, selector = value.partition("#")
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve()) + (sep + selector if sep else "")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise FormatError(path, None, "library file not found")
    try:
        if suffix == ".csv":
            with path.open(newline="") as f:
                return [dict(r) for r in csv.DictReader(f)]
        if suffix in (".yaml", ".yml"):
            data = read_yaml(path) or []
            if isinstance(data, dict):
                if "avatars" not in data:
                    raise FormatError(path, "avatars", "a YAML mapping needs an 'avatars' list")
                data = data["avatars"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise FormatError(path, None, "expected a list of mappings (one per avatar)")
            return data
        if suffix == ".parquet":
            return storage.read_parquet(str(path)).to_pylist()
    except FormatError:
        raise
    except Exception as exc:  # csv/yaml/parquet errors of many types
        raise FormatError(path, None, f"unreadable library file: {type(exc).__name__}: {exc}") from None
    raise FormatError(path, None, f"unknown library format {suffix!r} (use .csv, .yaml/.yml or .parquet)")


def read_library(path: str | Path) -> list[LibraryEntry]:
    """Read and validate a library manifest (see the module docstring); raises FormatError naming
    the file, the row and the field."""
    path = storage.absolute(path)  # a local path or a URI
    base = path.parent
    entries: list[LibraryEntry] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(_read_rows(path), start=1):
        def field_(name: str) -> str:
            return f"row {i}: {name}"

        unknown = sorted(set(raw) - set(LIBRARY_COLUMNS))
        if unknown:
            raise FormatError(path, field_(", ".join(unknown)), f"unknown column(s); known: {', '.join(LIBRARY_COLUMNS)}")
        row = {k: (None if _blank(raw.get(k)) else raw.get(k)) for k in LIBRARY_COLUMNS}
        mode = str(row["mode"] or "").strip().lower()
        if mode not in MODES:
            raise FormatError(path, field_("mode"), f"expected one of {', '.join(MODES)}, got {row['mode']!r}")
        if row["source"] is None:
            raise FormatError(path, field_("source"), "missing (the frames manifest, folder, image or video)")
        source = _resolve(base, str(row["source"]).strip())
        subject = None if row["subject"] is None else str(row["subject"]).strip()
        sequence = None if row["sequence"] is None else str(row["sequence"]).strip()
        frame = row["frame"]
        if frame is not None:
            try:
                frame = int(str(frame).strip())
            except ValueError:
                raise FormatError(path, field_("frame"), f"expected an integer frame index, got {frame!r}") from None
        if mode == "capture" and subject is None:
            raise FormatError(path, field_("subject"), "capture mode needs the subject to build")
        if mode != "capture":
            for name in ("subject", "sequence", "frame", "priors", "tracking"):
                if row[name] is not None:
                    raise FormatError(path, field_(name), f"only used in capture mode, not in {mode!r} mode")
        avatar_id = row["avatar_id"]
        if avatar_id is None:
            name = subject if mode == "capture" else Path(source.split(";")[0]).stem
            parts = [mode, name] + ([sequence] if sequence else []) + ([frame] if frame is not None else [])
            try:
                avatar_id = "_".join(id_part(p) for p in parts)
            except ValueError as exc:
                raise FormatError(path, field_("avatar_id"), f"cannot derive an id ({exc}); give avatar_id") from None
        avatar_id = str(avatar_id).strip()
        if not _ID_OK.match(avatar_id):
            raise FormatError(path, field_("avatar_id"),
                              f"{avatar_id!r} is not a dot-free id of [A-Za-z0-9_-] starting with a letter or digit")
        try:
            check_id_length(avatar_id)
        except ValueError as exc:
            raise FormatError(path, field_("avatar_id"), str(exc)) from None
        if avatar_id in seen:
            raise FormatError(path, field_("avatar_id"), f"duplicate id {avatar_id!r} (also row {seen[avatar_id]})")
        seen[avatar_id] = i
        expressions = None if row["expressions"] is None else str(row["expressions"]).strip()
        if expressions and expressions != "builtin":
            expressions = _resolve(base, expressions)
        entries.append(LibraryEntry(
            avatar_id=avatar_id, mode=mode, source=source, subject=subject, sequence=sequence, frame=frame,
            expressions=expressions,
            priors=_resolve(base, str(row["priors"])) if row["priors"] is not None else None,
            tracking=_resolve(base, str(row["tracking"])) if row["tracking"] is not None else None,
            library=str(path), row=i))
    return entries


def write_library(rows: Sequence[dict | LibraryEntry], path: str | Path) -> str:
    """Write a library manifest (format by extension: .csv, .yaml/.yml or .parquet)."""
    import pyarrow as pa

    path = storage.as_path(path)
    plain = []
    for r in rows:
        d = asdict(r) if isinstance(r, LibraryEntry) else dict(r)
        plain.append({k: d.get(k) for k in LIBRARY_COLUMNS if d.get(k) is not None})
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        schema = pa.schema([(k, pa.int64() if k == "frame" else pa.string()) for k in LIBRARY_COLUMNS])
        table = pa.Table.from_pylist([{k: r.get(k) for k in LIBRARY_COLUMNS} for r in plain], schema=schema)
        storage.write_parquet(table, str(path))
    elif suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(LIBRARY_COLUMNS))
        writer.writeheader()
        for r in plain:
            writer.writerow(r)
        storage.atomic_write_bytes(str(path), buf.getvalue().encode())
    elif suffix in (".yaml", ".yml"):
        import yaml

        storage.atomic_write_bytes(str(path), yaml.safe_dump({"avatars": plain}, sort_keys=False).encode())
    else:
        raise ValueError(f"unknown library format {suffix!r} (use .csv, .yaml/.yml or .parquet)")
    return str(path)


def write_capture_library(frames_manifest: str, splits: str, split: str = "test", out_path: str = "library.parquet",
                          expressions: str | None = None) -> str:
    """A library of one ``capture`` avatar per subject of ``split`` (held-out subjects by default).

    ``splits``: ``splits.json`` (subjects per split, written by the pack stage) or the shards
    directory holding it. Each avatar is built from the subject's first sequence; its animation is
    driven by the subject's *last* tracked sequence (a novel expression sequence when it has
    several) when ``<frames dir>/../tracking/tracking.parquet`` exists, else by the built-in set.
    ``expressions`` overrides that for every row. Ids: ``capture_<subject>``.
    """
    spath = storage.join(splits, "splits.json") if not str(splits).endswith(".json") else str(splits)
    try:
        table = parse_json(storage.read_bytes(spath), spath)
    except FileNotFoundError:
        raise FormatError(spath, None, "splits file not found (run the pack stage first)") from None
    if split not in table:
        raise FormatError(spath, split, f"no such split; known: {sorted(table)}")
    wanted = set(table[split])
    frames_manifest = str(storage.absolute(frames_manifest))
    frames = storage.read_parquet(frames_manifest).select(["subject", "sequence"]).to_pylist()
    sequences: dict[str, set[str]] = {}
    for r in frames:
        if r["subject"] in wanted:
            sequences.setdefault(r["subject"], set()).add(r["sequence"])
    tracking = storage.as_path(frames_manifest).parent.parent / "tracking" / "tracking.parquet"
    tracked: dict[str, set[str]] = {}
    if tracking.exists():
        for r in storage.read_parquet(str(tracking)).select(["subject", "sequence"]).to_pylist():
            tracked.setdefault(r["subject"], set()).add(r["sequence"])
    rows = []
    for subject in sorted(sequences):
        seqs = sorted(sequences[subject])
        expr = expressions
        if expr is None:
            drive = sorted(tracked.get(subject, ()))
            expr = f"{tracking}#{subject}/{drive[-1]}" if drive else "builtin"
        rows.append({"avatar_id": f"capture_{id_part(subject)}", "mode": "capture", "source": frames_manifest,
                     "subject": subject, "sequence": seqs[0], "expressions": expr})
    if not rows:
        log.warning("write_capture_library: no subject of split %r (%s) has frames in %s", split, sorted(wanted),
                    frames_manifest)
    return write_library(rows, out_path)
