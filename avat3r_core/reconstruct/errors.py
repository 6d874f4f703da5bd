"""The named failures of one avatar's inputs; each carries the path at fault and the reason, so
the error manifest says which file of which avatar was at fault."""

from __future__ import annotations

from pathlib import Path

from avat3r_core.errors import Avat3rError


class AvatarInputError(Avat3rError):
    """An avatar's input cannot be used; ``path`` is the file at fault, ``reason`` says why."""

    kind = "bad input"

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path or '<input>'}: {self.kind}: {reason}")

    def __init_subclass__(cls, kind: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if kind:
            cls.kind = kind


# the named failures: one line each, the kind their message names
class NoFaceError(AvatarInputError, kind="no face detected"): pass
class UnreadableInputError(AvatarInputError, kind="unreadable"): pass
class TooFewFramesError(AvatarInputError, kind="too few frames"): pass
class FitFailedError(AvatarInputError, kind="face-model fit failed"): pass
class FaceTooSmallError(AvatarInputError, kind="face too small"): pass
class ExtremePoseError(AvatarInputError, kind="head turned too far"): pass
