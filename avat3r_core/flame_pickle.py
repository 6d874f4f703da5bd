"""Reading FLAME's pickles and ``.npy``/``.npz`` object payloads without running code from them.

Pickles execute code. :class:`RestrictedUnpickler` resolves only the handful of globals these files
need -- numpy array/scalar/dtype reconstruction, scipy.sparse compressed matrices (mapped to an inert
stand-in that keeps the arrays), chumpy ``Ch`` (mapped to an inert stand-in exposing ``'x'``) and,
for landmark embeddings only, torch tensor rebuilding through ``torch.load(weights_only=True)`` --
and refuses every other global with :class:`~avat3r_core.errors.FormatError`. chumpy is not needed.
``.npy`` payloads with objects are parsed by hand (header via ``numpy.lib.format``, payload via the
restricted unpickler); ``np.load(allow_pickle=True)`` is never called. What the files hold is read
in :mod:`avat3r_core.flame`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from avat3r_core.errors import FormatError

__all__ = ["RestrictedUnpickler", "read_npy_bytes", "safe_pickle_load", "unwrap"]


class ChStandIn:
    """Inert stand-in for ``chumpy.ch.Ch`` (and its subclasses): keeps the pickled state.

    The array lives under ``'x'`` in the state dict (``Ch.__setstate__``/``__dict__``).
    """

    def __init__(self, *args, **kwargs):  # never runs chumpy code
        self.__dict__["_state"] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slotstate)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_state"] = dict(state) if isinstance(state, dict) else {"_raw": state}

    @property
    def x(self) -> Any:
        return self.__dict__["_state"].get("x")

    @property
    def r(self) -> Any:
        return self.x


class SparseStandIn:
    """Inert stand-in for pickled scipy.sparse compressed matrices; converted by :func:`_to_sparse`."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_state"] = {}
        self.__dict__["_format"] = kwargs.get("_format", "csc")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_state"] = dict(state) if isinstance(state, dict) else {}


def _sparse_class(fmt: str) -> type:
    return type(f"{fmt.capitalize()}StandIn", (SparseStandIn,), {"_fmt": fmt})


_CSC_STANDIN = _sparse_class("csc")


_CSR_STANDIN = _sparse_class("csr")


def _reconstructor(cls, base, state):
    """Safe ``copyreg._reconstructor``: only builds our own stand-ins (Python 2 protocol 0/1 pickles)."""
    if not (isinstance(cls, type) and issubclass(cls, (ChStandIn, SparseStandIn))) or base is not object:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} from {base!r}")
    return cls.__new__(cls)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """Safe ``_codecs.encode``: protocol-2 pickles spell ``bytes`` as ``encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("refusing _codecs.encode on non-text or an unexpected codec")
    return text.encode(encoding, errors)


def _torch_load_from_bytes(data: bytes):
    """Stand-in for ``torch.storage._load_from_bytes``: a weights-only torch.load (no code runs)."""
    from avat3r_core.weights import refusal_message

    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:  # say what was refused, without torch's advice to load it unsafely
        raise pickle.UnpicklingError(refusal_message(str(exc))) from None


def _build_allowed() -> dict[tuple[str, str], Any]:
    from numpy.lib import format as _npformat  # noqa: F401  (ensures numpy core is importable)

    try:
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _ma._reconstruct
        allowed[(mod, "scalar")] = _ma.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = _numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # numpy >= 1.25 pickles dtypes of arrays as e.g. numpy.dtypes.Float64DType -> np.dtype handles it
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "UInt32DType", "UInt64DType",
                 "ObjectDType", "BoolDType"):
        allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name, None)
    # scipy.sparse compressed matrices, under every module path scipy has used
    for mod in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse"):
        allowed[(mod, "csc_matrix")] = _CSC_STANDIN
        allowed[(mod, "csc_array")] = _CSC_STANDIN
    for mod in ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse"):
        allowed[(mod, "csr_matrix")] = _CSR_STANDIN
        allowed[(mod, "csr_array")] = _CSR_STANDIN
    # chumpy
    allowed[("chumpy.ch", "Ch")] = ChStandIn
    allowed[("chumpy", "Ch")] = ChStandIn
    # Python 2 protocol 0/1 object reconstruction -- only for the stand-ins above
    allowed[("copy_reg", "_reconstructor")] = _reconstructor
    allowed[("copyreg", "_reconstructor")] = _reconstructor
    allowed[("__builtin__", "object")] = object
    allowed[("builtins", "object")] = object
    allowed[("_codecs", "encode")] = _codecs_encode
    # chumpy's pickled state holds bookkeeping sets (e.g. '_dirty_vars'); plain containers only
    allowed[("__builtin__", "set")] = set
    allowed[("builtins", "set")] = set
    return {k: v for k, v in allowed.items() if v is not None}


_ALLOWED_BASE = _build_allowed()


_ALLOWED_TORCH = {
    ("torch._utils", "_rebuild_tensor_v2"): None,  # resolved lazily (torch internals)
    ("torch.storage", "_load_from_bytes"): _torch_load_from_bytes,
    ("collections", "OrderedDict"): None,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an explicit allow-list of globals (see module docstring)."""

    def __init__(self, file, path: str | Path | None, allow_torch: bool = False):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allow_torch = allow_torch

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED_BASE:
            return _ALLOWED_BASE[key]
        if self._allow_torch and key in _ALLOWED_TORCH:
            if key == ("torch._utils", "_rebuild_tensor_v2"):
                from torch._utils import _rebuild_tensor_v2

                return _rebuild_tensor_v2
            if key == ("collections", "OrderedDict"):
                from collections import OrderedDict

                return OrderedDict
            return _ALLOWED_TORCH[key]
        raise FormatError(self._path, None, f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError(self._path, None, "refusing to unpickle a persistent id")


def safe_pickle_load(data: bytes | io.IOBase, path: str | Path | None = None, allow_torch: bool = False) -> Any:
    """Unpickle with :class:`RestrictedUnpickler`; any failure becomes a FormatError naming ``path``."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return RestrictedUnpickler(stream, path, allow_torch=allow_torch).load()
    except FormatError:
        raise
    except Exception as exc:  # truncated/corrupt pickle
        raise FormatError(path, None, f"not a readable pickle: {type(exc).__name__}: {exc}") from exc


def unwrap(value: Any) -> Any:
    """Ch stand-in -> its 'x' array; sparse stand-in -> scipy.sparse; torch tensor -> numpy."""
    if isinstance(value, ChStandIn):
        return value.x
    if isinstance(value, SparseStandIn):
        return _to_sparse(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _to_sparse(obj: SparseStandIn) -> sp.spmatrix:
    st = obj.__dict__["_state"]
    shape = st.get("_shape", st.get("shape"))
    data, indices, indptr = st.get("data"), st.get("indices"), st.get("indptr")
    if shape is None or data is None or indices is None or indptr is None:
        raise ValueError(f"sparse matrix state lacks data/indices/indptr/shape (has {sorted(st)})")
    cls = sp.csr_matrix if getattr(obj, "_fmt", "csc") == "csr" else sp.csc_matrix
    return cls((np.asarray(data), np.asarray(indices), np.asarray(indptr)), shape=tuple(int(s) for s in shape))


def read_npy_bytes(raw: bytes, path: Any) -> Any:
    """Parse one .npy payload; object arrays go through the restricted unpickler."""
    from numpy.lib import format as npf

    fh = io.BytesIO(raw)
    try:
        version = npf.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npf.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = npf.read_array_header_2_0(fh) if version == (2, 0) else \
                npf._read_array_header(fh, version)  # (3, 0)
    except Exception as exc:
        raise FormatError(path, None, f"not a .npy file: {exc}") from exc
    if dtype.hasobject:
        obj = safe_pickle_load(fh, path, allow_torch=True)
        return obj
    fh.seek(0)
    try:
        return np.load(fh, allow_pickle=False)
    except Exception as exc:
        raise FormatError(path, None, f"corrupt .npy payload: {exc}") from exc
