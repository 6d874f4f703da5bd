"""Reading an official DUSt3R checkpoint without running anything from it.

The checkpoint is ``{'model': state_dict, 'args': Namespace(model="AsymmetricCroCo3DStereo(...)")}``:
it is read with ``weights_only=True`` (only ``argparse.Namespace`` allow-listed), and the
constructor string is *parsed* with ``ast`` into a :class:`~avat3r_core.priors.dust3r.Dust3rConfig`,
never evaluated (the official loader ``eval``s it). The network itself is in
:mod:`avat3r_core.priors.dust3r`.
"""

from __future__ import annotations

import argparse
import ast
import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from avat3r_core.errors import FormatError
from avat3r_core.priors.dust3r import Dust3rConfig, Dust3rModel
from avat3r_core.weights import check_state_dict, safe_torch_load

__all__ = ["config_to_model_string", "load_dust3r", "parse_model_string"]

_INF = float("inf")
_CLASS_NAME = "AsymmetricCroCo3DStereo"


_FIELD_NAMES = {f.name for f in fields(Dust3rConfig)}


def _literal(node: ast.AST, where: str, key: str) -> Any:
    """Evaluate a constructor-argument AST node that may only be a plain literal.

    Accepts numbers, strings, booleans, None, tuples/lists of those, unary +/- and the names
    ``inf``/``nan`` (the official module defines ``inf = float('inf')`` and the checkpoint string
    uses it). Anything else (calls, attributes, other names, operators) is refused: the string
    comes from a downloaded file and must never be executed.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, where, key) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, where, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormatError(where, key, "unary sign applied to a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
        return float(node.id)
    raise FormatError(where, key, f"only literal values are accepted, got {ast.dump(node)[:80]}")


def parse_model_string(text: str, where: str = "args.model") -> Dust3rConfig:
    """Parse ``"AsymmetricCroCo3DStereo(k=v, ...)"`` into a :class:`Dust3rConfig` without eval.

    Unknown keyword arguments raise :class:`FormatError` naming the key, and so do supported keys
    with values this implementation cannot honour (e.g. ``head_type='linear'``), so a checkpoint we
    cannot reproduce exactly is refused rather than silently run with a different network.
    """
    if not isinstance(text, str):
        raise FormatError(where, None, f"expected a string, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormatError(where, None, f"not a constructor call: {exc.msg}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise FormatError(where, None, "expected a call like AsymmetricCroCo3DStereo(...)")
    if call.func.id != _CLASS_NAME:
        raise FormatError(where, None, f"unsupported model class {call.func.id!r} (expected {_CLASS_NAME})")
    if call.args:
        raise FormatError(where, None, "positional arguments are not supported")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise FormatError(where, "**", "keyword unpacking is not supported")
        if kw.arg not in _FIELD_NAMES:
            raise FormatError(where, kw.arg, "unknown or unsupported constructor argument")
        kwargs[kw.arg] = _literal(kw.value, where, kw.arg)
    return _validated_config(kwargs, where)


def _validated_config(kwargs: Mapping[str, Any], where: str) -> Dust3rConfig:
    kw = dict(kwargs)
    if "img_size" in kw:
        v = kw["img_size"]
        kw["img_size"] = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    for key in ("img_size",):
        v = kw.get(key)
        if v is not None and (
            not isinstance(v, tuple) or len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v)
        ):
            raise FormatError(where, key, f"expected an int or a pair of positive ints, got {v!r}")
    for key in ("patch_size", "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth",
                "dec_num_heads"):
        v = kw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise FormatError(where, key, f"expected a positive integer, got {v!r}")
    for key in ("pos_embed", "patch_embed_cls", "head_type", "output_mode", "freeze"):
        if key in kw and not isinstance(kw[key], str):
            raise FormatError(where, key, f"expected a string, got {kw[key]!r}")
    for key in ("norm_im2_in_dec", "landscape_only"):
        if key in kw and not isinstance(kw[key], bool):
            raise FormatError(where, key, f"expected True or False, got {kw[key]!r}")
    for key in ("mlp_ratio", "mask_ratio"):
        v = kw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise FormatError(where, key, f"expected a non-negative number, got {v!r}")
    cfg = Dust3rConfig(**kw)
    if not cfg.pos_embed.startswith("RoPE"):
        raise FormatError(where, "pos_embed", f"only RoPE position encodings are supported, got {cfg.pos_embed!r}")
    try:
        base = cfg.rope_base
    except ValueError:
        raise FormatError(where, "pos_embed", f"bad RoPE frequency in {cfg.pos_embed!r}") from None
    if not base > 0:
        raise FormatError(where, "pos_embed", f"RoPE frequency must be positive, got {base}")
    if cfg.patch_embed_cls not in ("PatchEmbedDust3R", "ManyAR_PatchEmbed"):
        raise FormatError(where, "patch_embed_cls", f"unsupported {cfg.patch_embed_cls!r}")
    if cfg.head_type != "dpt":
        raise FormatError(where, "head_type", f"only the 'dpt' head is implemented, got {cfg.head_type!r}")
    if cfg.output_mode != "pts3d":
        raise FormatError(where, "output_mode", f"only 'pts3d' is implemented, got {cfg.output_mode!r}")
    dm = cfg.depth_mode
    if not (isinstance(dm, tuple) and len(dm) == 3 and dm[0] in ("exp", "linear", "square")):
        raise FormatError(where, "depth_mode", f"expected ('exp'|'linear'|'square', lo, hi), got {dm!r}")
    if not (dm[1] == -_INF and dm[2] == _INF):
        raise FormatError(where, "depth_mode", f"only unbounded depth (-inf, inf) is supported, got {dm!r}")
    cm = cfg.conf_mode
    if not (isinstance(cm, tuple) and len(cm) == 3 and cm[0] in ("exp", "sigmoid")):
        raise FormatError(where, "conf_mode", f"expected ('exp'|'sigmoid', lo, hi), got {cm!r}")
    for key, dim, heads in (("enc_num_heads", cfg.enc_embed_dim, cfg.enc_num_heads),
                            ("dec_num_heads", cfg.dec_embed_dim, cfg.dec_num_heads)):
        if dim % heads or (dim // heads) % 4:
            msg = f"embed dim {dim} / {heads} heads must give a head dim divisible by 4 (RoPE2D)"
            raise FormatError(where, key, msg)
    if any(s % cfg.patch_size for s in cfg.img_size):
        raise FormatError(where, "img_size", f"{cfg.img_size} must be a multiple of patch_size {cfg.patch_size}")
    return cfg


def config_to_model_string(cfg: Dust3rConfig) -> str:
    """The constructor string the official training script stores in ``args.model``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, tuple):
            return "(" + ", ".join(fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        return repr(v)

    always = ("pos_embed", "patch_embed_cls", "img_size", "head_type", "output_mode", "depth_mode", "conf_mode",
              "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads")
    defaults = Dust3rConfig()
    names = list(always) + [f.name for f in fields(cfg)
                            if f.name not in always and getattr(cfg, f.name) != getattr(defaults, f.name)]
    parts = [f"{name}={fmt(getattr(cfg, name))}" for name in names]
    return f"{_CLASS_NAME}({', '.join(parts)})"


def _load_strict(model: nn.Module, sd: Mapping[str, Any], path: Any) -> None:
    check_state_dict(model.state_dict(), sd, path, what="the network", field="model", field_prefix="model.")
    # assign=True: the module (built on the meta device) takes the loaded tensors as its
    # parameters, so the 2.3 GB ViT-L model is not allocated twice.
    model.load_state_dict(sd, strict=True, assign=True)


def load_dust3r(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    config: Dust3rConfig | None = None,
) -> Dust3rModel:
    """Load an official DUSt3R checkpoint (or a bare state_dict with an explicit ``config``).

    The checkpoint ``{'model': state_dict, 'args': Namespace(model="AsymmetricCroCo3DStereo(...)")}``
    is read with ``weights_only=True``; the constructor string is parsed, never evaluated. An
    explicit ``config`` overrides ``args.model``. As in the official ``load_state_dict``, a
    checkpoint without any ``dec_blocks2`` keys gets them copied from ``dec_blocks`` (older CroCo
    style files); otherwise the load is strict and a mismatch raises FormatError listing missing and
    unexpected keys. The model is returned in eval mode.
    """
    where: Any = path if path is not None else "<state_dict>"
    if state_dict is None:
        if path is None:
            raise ValueError("load_dust3r: give a path or a state_dict")
        path = Path(path)
        ckpt = safe_torch_load(path, device, allowed_globals=[argparse.Namespace])
        if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
            state_dict = ckpt["model"]
            if config is None:
                args = ckpt.get("args")
                if args is None:
                    raise FormatError(path, "args", "missing; pass config= explicitly")
                model_str = getattr(args, "model", None) if not isinstance(args, Mapping) else args.get("model")
                if model_str is None:
                    raise FormatError(path, "args.model", "missing; pass config= explicitly")
                config = parse_model_string(model_str, f"{path} args.model")
        elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            state_dict = ckpt
        else:
            raise FormatError(path, "model", "expected {'model': state_dict, 'args': Namespace} or a bare state_dict")
    else:
        # the caller keeps its tensors: do not alias them into the new model's parameters
        state_dict = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in state_dict.items()}
    if config is None:
        raise FormatError(where, "args", "a bare state_dict needs an explicit config")
    sd = dict(state_dict)
    if not any(k.startswith("dec_blocks2.") for k in sd):
        for k, v in list(sd.items()):
            if k.startswith("dec_blocks."):
                sd["dec_blocks2." + k[len("dec_blocks."):]] = v.clone()
    with torch.device("meta"):
        model = Dust3rModel(config)
    _load_strict(model, sd, where)
    return model.to(device=device, dtype=torch.float32).eval()
