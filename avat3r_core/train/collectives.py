"""Collective decisions across DDP ranks; no-ops without a process group. They use
``torch.distributed`` when a process group is up, so every rank takes the same branch."""

from __future__ import annotations

from typing import Any

import torch


# --------------------------------------------------------------------------- collectives (no-ops alone)
def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True iff ``flag`` holds on every rank (so all ranks skip a batch together, or none does)."""
    if not _dist():
        return bool(flag)
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, indexed by rank (``[obj]`` without a process group)."""
    if not _dist():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


def parameter_checksum(model: torch.nn.Module) -> str:
    """Hex digest of every parameter's bytes (identical across ranks iff the weights are)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
