"""Finding and loading a trained network: the one checkpoint reader of evaluation, reconstruction
and ``avat3r animate``. Weights-only (no code is unpickled) and strict (key by key). It imports
nothing of :mod:`avat3r_core.train`: the network is rebuilt from the checkpoint's stored model
settings alone."""

from __future__ import annotations

from pathlib import Path

import torch

from avat3r_core import storage
from avat3r_core.config import build
from avat3r_core.errors import FormatError
from avat3r_core.model.avat3r import Avat3r
from avat3r_core.model.config import Avat3rConfig
from avat3r_core.weights import check_state_dict, safe_torch_load

CHECKPOINT_FILE = "checkpoint.pt"


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The ``checkpoint.pt`` meant by ``checkpoint``: the file itself, a directory holding it, or the
    newest ``checkpoint_*`` sub-directory of a run's output (directly, under ``checkpoints/``, or
    under ``ray/train/``: Ray Train's default storage path and name). Raises FormatError naming it."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FormatError(path, None, "checkpoint directory does not exist")
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    for base in (path, path / "checkpoints", path / "ray" / "train"):
        found = sorted(p for p in base.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
        if found:
            return found[-1] / CHECKPOINT_FILE
    raise FormatError(path, None, f"no {CHECKPOINT_FILE} in this checkpoint directory "
                      "(nor in a checkpoint_* sub-directory of it, of its checkpoints/ or of its ray/train/)")


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[Avat3r, Avat3rConfig, dict]:
    """(network in eval mode on ``device``, its Avat3rConfig, info) from a checkpoint written by
    :func:`avat3r_core.train.state.save_checkpoint`: rebuilt from the stored config's model settings
    (``model_preset`` + ``model`` overrides, as :meth:`TrainConfig.model_config` builds them), weights
    read with the weights-only loader (no code is unpickled) and matched key by key. ``info``:
    checkpoint path, step, sha256 (avatars built with another checkpoint are rebuilt). Every problem
    raises FormatError naming the file."""
    path = resolve_checkpoint(checkpoint)
    state = safe_torch_load(path, map_location=device)
    if not isinstance(state, dict) or "model" not in state:
        raise FormatError(path, "model", "not an avat3r training checkpoint (no 'model' state dict)")
    if not isinstance(state.get("config"), dict):
        raise FormatError(path, "config", "the checkpoint holds no training config; cannot rebuild the network")
    stored = state["config"]
    if not isinstance(stored.get("model_preset"), str):
        raise FormatError(path, "config.model_preset", "missing or not a string; cannot rebuild the network")
    overrides = stored.get("model") or {}
    if not isinstance(overrides, dict):
        raise FormatError(path, "config.model", f"expected a mapping of Avat3rConfig overrides, got {type(overrides).__name__}")
    model_config = build(Avat3rConfig, dict(overrides), preset=stored["model_preset"], source=f"{path} [config.model]")
    model = Avat3r(model_config)
    check_state_dict(model.state_dict(), state["model"], path, "the Avat3r network", field_prefix="model.")
    model.load_state_dict(state["model"], strict=True)
    info = {"checkpoint": str(path), "step": int(state.get("step", 0)), "sha256": storage.sha256(path),
            "model_preset": stored["model_preset"], "image_size": int(model_config.image_size)}
    return model.to(device).eval(), model_config, info
