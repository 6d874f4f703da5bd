"""What a training run saves and restores: RNG states and checkpoints (model, optimiser,
scheduler, loader positions, config). Read back by the weights-only loader."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avat3r_core.inference.checkpoint import CHECKPOINT_FILE
from avat3r_core.train.collectives import unwrap
from avat3r_core.train.config import TrainConfig
from avat3r_core.weights import safe_torch_load


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """Torch/CUDA/NumPy/Python RNG states as tensors (loadable by the weights-only loader)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64), "python_version": int(py_state[0]),
        "python_gauss": None if py_state[2] is None else float(py_state[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(directory: str | Path, model, optimizer, step: int, extra: dict | None = None,
                    scheduler=None, rng: Any = None, config: TrainConfig | None = None) -> Path:
    """Write ``checkpoint.pt`` into ``directory``: model (unwrapped), optimiser, scheduler, step,
    ``extra`` (loader positions, counters), ``rng`` (per-rank RNG states) and the config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": int(step),
             "extra": extra or {}, "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng, "config": _plain(asdict(config)) if config is not None else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_checkpoint(directory: str | Path, model, optimizer=None, scheduler=None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``,
    ``scheduler`` when given); returns ``step``, ``extra``, ``rng`` and ``config``. A missing
    directory or file raises FileNotFoundError naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist "
                                "(the checkpoint directory to resume from is missing)")
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (the checkpoint directory {directory} holds no {CHECKPOINT_FILE})")
    state = safe_torch_load(path)
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {"step": int(state["step"]), "extra": state.get("extra", {}), "rng": state.get("rng"),
            "config": state.get("config")}
