"""DUSt3R (CroCo ViT encoder + two asymmetric decoders + two DPT heads), written from the public
description of the official ``naver/dust3r`` code so that the released checkpoint
``DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth`` loads with ``load_state_dict(strict=True)``.

Why our own network rather than the official package: the official loader ``eval``s a string taken
from the checkpoint and unpickles arbitrary objects; it also pulls in a CUDA RoPE extension,
huggingface_hub and einops. Here the checkpoint is read with ``weights_only=True`` (only
``argparse.Namespace`` allow-listed) and the constructor string is *parsed* (``ast``), never run.

Layout facts this module reproduces (all checked against the public code):

* Encoder: ``patch_embed.proj`` (Conv 16x16 stride 16), ``enc_blocks.{i}`` pre-norm ViT blocks
  (``norm1 → attn(qkv, proj) → +``, ``norm2 → mlp(fc1, GELU, fc2) → +``), ``enc_norm``. LayerNorm
  eps 1e-6. ``qkv`` output is laid out ``[3][heads][head_dim]``.
* Positions: RoPE2D (``RoPE100`` = base frequency 100) on q and k of every self- and cross-attention;
  no learned or sine position embedding. Token positions are (row, col); the first half of each
  head's channels is rotated by the row index, the second half by the column index; within a half
  the rotation pairs channel ``k`` with ``k + D/4`` (rotate-half layout) with inverse frequencies
  ``base ** (-2m / (D/2))``.
* ``mask_token`` (1, 1, dec_dim) exists in the checkpoint (CroCo pre-training leftover, unused at
  inference). There is no ``prediction_head``.
* ``decoder_embed`` (enc_dim → dec_dim), then ``dec_blocks`` (view 1) and ``dec_blocks2`` (view 2),
  each block: self-attention (``norm1``), cross-attention to the *other view's previous-layer
  tokens* (``norm2`` on the query, ``norm_y`` on the memory; ``cross_attn.projq/projk/projv/proj``),
  MLP (``norm3``). ``dec_norm`` is applied to the last layer's output only.
* DPT heads ``downstream_head{1,2}.dpt``: hooks ``[0, L/2, 3L/4, L]`` (integer division, L = decoder
  depth) into ``[encoder output, decoder block 1 … L outputs]``; ``act_postprocess.{0..3}`` (1x1 conv
  to [96, 192, 384, 768] then ConvTranspose 4/4, ConvTranspose 2/2, nothing, Conv 3x3 stride 2);
  ``scratch.layer{1..4}_rn`` 3x3 convs without bias to 256 channels, *also* registered as
  ``scratch.layer_rn.{0..3}`` (the same modules: the official state_dict holds both names);
  ``scratch.refinenet{1..4}`` fusion blocks (``resConfUnit1/2.conv1/conv2``, ``out_conv``, bilinear
  x2 with align_corners=True); ``head.{0,2,4}`` (conv 256→128, bilinear x2, conv 128→32, ReLU,
  conv 32→4).
* Output: channels-last ``(B, H, W, 4)``; ``pts3d = xyz/|xyz| * expm1(|xyz|)`` for depth mode
  ('exp', -inf, inf); ``conf = 1 + exp(x)`` for conf mode ('exp', 1, inf).

Orientation: the official ``ManyAR_PatchEmbed`` lets a batch mix landscape and portrait images by
storing portrait ones transposed and transposing them back (patches, positions and head outputs).
The network therefore always sees each image in its *true* orientation, exactly what the official
inference loader does when it swaps in ``PatchEmbedDust3R``/``landscape_only=False``. This module
processes images in their true orientation directly and batches only images of one shape, which is
numerically the same computation.
"""

from __future__ import annotations

import argparse
import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avat3r_core.cameras import Cameras
from avat3r_core.errors import FormatError
from avat3r_core.weights import check_state_dict, safe_torch_load

__all__ = [
    "Dust3rConfig",
    "Dust3rModel",
    "Dust3rPairs",
    "Dust3rTransform",
    "PAPER_CONFIG",
    "build_dust3r",
    "config_to_model_string",
    "dust3r_preprocess",
    "load_dust3r",
    "pairwise_inference",
    "parse_model_string",
]

_INF = float("inf")
_CLASS_NAME = "AsymmetricCroCo3DStereo"


# ====================================================================== configuration


@dataclass(frozen=True)
class Dust3rConfig:
    """Constructor arguments of the official ``AsymmetricCroCo3DStereo`` that shape the network.

    Defaults are the official class defaults merged with CroCo's, except where the released 512 DPT
    checkpoint differs (see :data:`PAPER_CONFIG`). ``mask_ratio``, ``freeze`` and
    ``landscape_only`` are accepted for fidelity to the constructor string but do not change
    inference (see the module docstring on orientation).
    """

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    enc_embed_dim: int = 768
    enc_depth: int = 12
    enc_num_heads: int = 12
    dec_embed_dim: int = 512
    dec_depth: int = 8
    dec_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_im2_in_dec: bool = True
    pos_embed: str = "RoPE100"
    patch_embed_cls: str = "PatchEmbedDust3R"
    head_type: str = "dpt"
    output_mode: str = "pts3d"
    depth_mode: tuple[str, float, float] = ("exp", -_INF, _INF)
    conf_mode: tuple[str, float, float] = ("exp", 1.0, _INF)
    mask_ratio: float = 0.9
    freeze: str = "none"
    landscape_only: bool = True

    @property
    def rope_base(self) -> float:
        return float(self.pos_embed[len("RoPE") :])

    @property
    def long_side(self) -> int:
        """The image size preprocessing resizes the long side to (512 for the 512 models)."""
        return int(max(self.img_size))

    @property
    def dpt_hooks(self) -> list[int]:
        L = self.dec_depth
        return [0, L * 2 // 4, L * 3 // 4, L]


#: The released ``DUSt3R_ViTLarge_BaseDecoder_512_dpt`` configuration.
PAPER_CONFIG = Dust3rConfig(
    img_size=(512, 512),
    patch_size=16,
    enc_embed_dim=1024,
    enc_depth=24,
    enc_num_heads=16,
    dec_embed_dim=768,
    dec_depth=12,
    dec_num_heads=12,
    pos_embed="RoPE100",
    patch_embed_cls="ManyAR_PatchEmbed",
    head_type="dpt",
    output_mode="pts3d",
    depth_mode=("exp", -_INF, _INF),
    conf_mode=("exp", 1.0, _INF),
)

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


# ====================================================================== network pieces


def _rope_cos_sin(positions: Tensor, half_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for 1-D rotary embedding of ``half_dim`` channels at integer ``positions``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, half_dim, 2, device=positions.device, dtype=torch.float32) / half_dim))
    ang = positions.to(torch.float32)[..., None] * inv_freq  # (B, N, half/2)
    ang = torch.cat((ang, ang), dim=-1)  # (B, N, half)
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]  # (B, 1, N, half)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope2d(tokens: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE2D on (B, heads, N, D) tokens with (B, N, 2) integer (row, col) positions.

    The first D/2 channels encode the row, the last D/2 the column (the official layout).
    """
    half = tokens.shape[-1] // 2
    ty, tx = tokens[..., :half], tokens[..., half:]
    cy, sy = _rope_cos_sin(positions[..., 0], half, base, tokens.dtype)
    cx, sx = _rope_cos_sin(positions[..., 1], half, base, tokens.dtype)
    ty = ty * cy + _rotate_half(ty) * sy
    tx = tx * cx + _rotate_half(tx) * sx
    return torch.cat((ty, tx), dim=-1)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rope_base: float):
        super().__init__()
        self.heads = heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d)
        q = apply_rope2d(q, pos, self.rope_base)
        k = apply_rope2d(k, pos, self.rope_base)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rope_base: float):
        super().__init__()
        self.heads = heads
        self.rope_base = rope_base
        self.projq = nn.Linear(dim, dim, bias=True)
        self.projk = nn.Linear(dim, dim, bias=True)
        self.projv = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, mem: Tensor, qpos: Tensor, kpos: Tensor) -> Tensor:
        B, Nq, C = query.shape
        Nk = mem.shape[1]
        h, d = self.heads, C // self.heads
        q = self.projq(query).reshape(B, Nq, h, d).transpose(1, 2)
        k = self.projk(mem).reshape(B, Nk, h, d).transpose(1, 2)
        v = self.projv(mem).reshape(B, Nk, h, d).transpose(1, 2)
        q = apply_rope2d(q, qpos, self.rope_base)
        k = apply_rope2d(k, kpos, self.rope_base)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, rope_base: float):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = _SelfAttention(dim, heads, rope_base)
        self.norm2 = _layer_norm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x))


class _DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, rope_base: float, norm_mem: bool):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = _SelfAttention(dim, heads, rope_base)
        self.cross_attn = _CrossAttention(dim, heads, rope_base)
        self.norm2 = _layer_norm(dim)
        self.norm3 = _layer_norm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = _layer_norm(dim) if norm_mem else nn.Identity()

    def forward(self, x: Tensor, y: Tensor, xpos: Tensor, ypos: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), xpos)
        y_ = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), y_, xpos, ypos)
        return x + self.mlp(self.norm3(x))


class _PatchEmbed(nn.Module):
    """Conv patchify + (row, col) token positions. Images are taken in their true orientation."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor]:
        B, _, H, W = img.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch}")
        x = self.proj(img)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        rows = torch.arange(h, device=img.device).repeat_interleave(w)
        cols = torch.arange(w, device=img.device).repeat(h)
        pos = torch.stack((rows, cols), dim=-1)[None].expand(B, -1, -1)
        return x, pos


class _ResidualConvUnit(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class _FusionBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.out_conv = nn.Conv2d(ch, ch, 1, bias=True)
        self.resConfUnit1 = _ResidualConvUnit(ch)
        self.resConfUnit2 = _ResidualConvUnit(ch)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Interpolate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _DPTAdapter(nn.Module):
    """The ``dpt`` module of one head (key names as in the official checkpoint)."""

    LAYER_DIMS = (96, 192, 384, 768)
    FEATURE_DIM = 256

    def __init__(self, token_dims: Sequence[int], hooks: Sequence[int], patch: int, out_channels: int):
        super().__init__()
        self.hooks = list(hooks)
        self.patch = patch
        ld, fd = self.LAYER_DIMS, self.FEATURE_DIM
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(token_dims[0], ld[0], 1), nn.ConvTranspose2d(ld[0], ld[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(token_dims[1], ld[1], 1), nn.ConvTranspose2d(ld[1], ld[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(token_dims[2], ld[2], 1)),
            nn.Sequential(nn.Conv2d(token_dims[3], ld[3], 1), nn.Conv2d(ld[3], ld[3], 3, stride=2, padding=1)),
        ])
        scratch = nn.Module()
        for i in range(4):
            setattr(scratch, f"layer{i + 1}_rn", nn.Conv2d(ld[i], fd, 3, padding=1, bias=False))
        # The same four convs again under a ModuleList: the official state_dict stores both names.
        scratch.layer_rn = nn.ModuleList([getattr(scratch, f"layer{i + 1}_rn") for i in range(4)])
        for i in range(4):
            setattr(scratch, f"refinenet{i + 1}", _FusionBlock(fd))
        self.scratch = scratch
        self.head = nn.Sequential(
            nn.Conv2d(fd, fd // 2, 3, padding=1),
            _Interpolate(),
            nn.Conv2d(fd // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, out_channels, 1),
        )

    def forward(self, tokens: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
        H, W = image_size
        nh, nw = H // self.patch, W // self.patch
        layers = []
        for idx, hook in enumerate(self.hooks):
            t = tokens[hook]
            t = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], nh, nw)
            layers.append(self.scratch.layer_rn[idx](self.act_postprocess[idx](t)))
        s = self.scratch
        path4 = s.refinenet4(layers[3])[:, :, : layers[2].shape[2], : layers[2].shape[3]]
        path3 = s.refinenet3(path4, layers[2])
        path2 = s.refinenet2(path3, layers[1])
        path1 = s.refinenet1(path2, layers[0])
        return self.head(path1)


class _DPTHead(nn.Module):
    def __init__(self, cfg: Dust3rConfig):
        super().__init__()
        ed, dd = cfg.enc_embed_dim, cfg.dec_embed_dim
        self.dpt = _DPTAdapter([ed, dd, dd, dd], cfg.dpt_hooks, cfg.patch_size, 3 + 1)

    def forward(self, tokens: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
        return self.dpt(tokens, image_size)


def _postprocess(out: Tensor, depth_mode: tuple, conf_mode: tuple) -> tuple[Tensor, Tensor]:
    """(B, 4, H, W) head output → pts3d (B, H, W, 3), conf (B, H, W)."""
    fmap = out.permute(0, 2, 3, 1)
    xyz = fmap[..., :3]
    mode = depth_mode[0]
    if mode == "linear":
        pts = xyz
    else:
        d = xyz.norm(dim=-1, keepdim=True)
        unit = xyz / d.clip(min=1e-8)
        pts = unit * (d.square() if mode == "square" else torch.expm1(d))
    x = fmap[..., 3]
    cmode, lo, hi = conf_mode
    if cmode == "exp":
        conf = lo + x.exp().clip(max=hi - lo)
    else:
        conf = (hi - lo) * torch.sigmoid(x) + lo
    return pts, conf


class Dust3rModel(nn.Module):
    """``AsymmetricCroCo3DStereo`` for inference, with the official parameter names."""

    def __init__(self, cfg: Dust3rConfig):
        super().__init__()
        self.config = cfg
        base = cfg.rope_base
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(
            [_EncoderBlock(cfg.enc_embed_dim, cfg.enc_num_heads, cfg.mlp_ratio, base) for _ in range(cfg.enc_depth)]
        )
        self.enc_norm = _layer_norm(cfg.enc_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_embed_dim))
        self.decoder_embed = nn.Linear(cfg.enc_embed_dim, cfg.dec_embed_dim)

        def decoder() -> nn.ModuleList:
            return nn.ModuleList([
                _DecoderBlock(cfg.dec_embed_dim, cfg.dec_num_heads, cfg.mlp_ratio, base, cfg.norm_im2_in_dec)
                for _ in range(cfg.dec_depth)
            ])

        self.dec_blocks = decoder()
        self.dec_blocks2 = decoder()
        self.dec_norm = _layer_norm(cfg.dec_embed_dim)
        self.downstream_head1 = _DPTHead(cfg)
        self.downstream_head2 = _DPTHead(cfg)

    # ------------------------------------------------------------------ stages
    def encode(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) normalised images → tokens (B, N, enc_dim), positions (B, N, 2).

        The encoder is per image (siamese), so callers may encode each view once and reuse the
        tokens in every pair, which is what :func:`pairwise_inference` does.
        """
        x, pos = self.patch_embed(img)
        for blk in self.enc_blocks:
            x = blk(x, pos)
        return self.enc_norm(x), pos

    def decode(self, f1: Tensor, pos1: Tensor, f2: Tensor, pos2: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Both decoders; returns per view [encoder tokens, block 1 … block L outputs (last normed)]."""
        out1, out2 = [f1], [f2]
        x1, x2 = self.decoder_embed(f1), self.decoder_embed(f2)
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            x1, x2 = blk1(x1, x2, pos1, pos2), blk2(x2, x1, pos2, pos1)
            out1.append(x1)
            out2.append(x2)
        out1[-1] = self.dec_norm(out1[-1])
        out2[-1] = self.dec_norm(out2[-1])
        return out1, out2

    def heads(self, dec1: list[Tensor], dec2: list[Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        cfg = self.config
        out1 = self.downstream_head1([t.float() for t in dec1], size).float()
        out2 = self.downstream_head2([t.float() for t in dec2], size).float()
        p1, c1 = _postprocess(out1, cfg.depth_mode, cfg.conf_mode)
        p2, c2 = _postprocess(out2, cfg.depth_mode, cfg.conf_mode)
        return {"pts3d": p1, "conf": c1, "pts3d_in_other_view": p2, "conf2": c2}

    def forward(self, img1: Tensor, img2: Tensor) -> dict[str, Tensor]:
        """One batch of pairs (same image size within the batch).

        Returns ``pts3d`` (B,H,W,3) of view 1 in view 1's camera frame, ``conf`` (B,H,W),
        ``pts3d_in_other_view`` (B,H,W,3) of view 2 in view 1's frame, ``conf2`` (B,H,W).
        """
        if img1.shape[-2:] != img2.shape[-2:]:
            raise ValueError(f"pair images differ in size: {tuple(img1.shape[-2:])} vs {tuple(img2.shape[-2:])}")
        f, pos = self.encode(torch.cat((img1, img2)))
        f1, f2 = f.chunk(2)
        pos1, pos2 = pos.chunk(2)
        dec1, dec2 = self.decode(f1, pos1, f2, pos2)
        return self.heads(dec1, dec2, tuple(img1.shape[-2:]))


def build_dust3r(cfg: Dust3rConfig, device: torch.device | str | None = None) -> Dust3rModel:
    """Allocate the network for ``cfg`` (``device="meta"`` builds it without memory)."""
    with torch.device(device if device is not None else "cpu"):
        return Dust3rModel(cfg)


# ====================================================================== checkpoint loading


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


# ====================================================================== preprocessing


@dataclass(frozen=True)
class Dust3rTransform:
    """How one input image became the network input: resize, then crop.

    ``in_size``/``resized_size``/``out_size`` are (width, height); ``crop_xy`` is the top-left corner
    of the crop in the resized image. Continuous pixel coordinates map as
    ``u_out = u_in * rw/W - x0`` (and likewise v), the pixel-centre convention of
    :mod:`avat3r_core.cameras`.
    """

    in_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_xy: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        return self.resized_size[0] / self.in_size[0], self.resized_size[1] / self.in_size[1]

    def to_input_pixels(self, uv: Tensor) -> Tensor:
        """(…, 2) continuous (u, v) in the DUSt3R grid → the input image's pixel grid."""
        sx, sy = self.scale
        u = (uv[..., 0] + self.crop_xy[0]) / sx
        v = (uv[..., 1] + self.crop_xy[1]) / sy
        return torch.stack((u, v), dim=-1)

    def to_output_pixels(self, uv: Tensor) -> Tensor:
        sx, sy = self.scale
        return torch.stack((uv[..., 0] * sx - self.crop_xy[0], uv[..., 1] * sy - self.crop_xy[1]), dim=-1)

    def cameras(self, cams: Cameras) -> Cameras:
        """Cameras of the input images (their pixel grid) → cameras of the DUSt3R input."""
        if (cams.width, cams.height) != self.in_size:
            w, h = self.in_size
            raise ValueError(f"cameras are {cams.width}x{cams.height}, the images were {w}x{h}")
        r = cams.resize(*self.resized_size)
        return r.crop(self.crop_xy[0], self.crop_xy[1], *self.out_size)


def _resize_crop_box(
    W1: int, H1: int, long_side: int, square_ok: bool
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Official ``load_images`` geometry for size != 224: resize long side, centre-crop to /16."""
    S = max(W1, H1)
    W, H = (int(round(W1 * long_side / S)), int(round(H1 * long_side / S)))
    cx, cy = W // 2, H // 2
    halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
    if not square_ok and W == H:
        halfh = 3 * halfw // 4  # integer: halfw is a multiple of 8
    return (W, H), (cx - halfw, cy - halfh, cx + halfw, cy + halfh)


def dust3r_preprocess(
    images: np.ndarray | Tensor,
    long_side: int = 512,
    square_ok: bool = False,
) -> tuple[Tensor, Tensor, list[Dust3rTransform]]:
    """uint8 RGB images (N, H, W, 3) → (N, 3, h, w) float in [-1, 1], true shapes (N, 2) as (h, w),
    and one :class:`Dust3rTransform` per image.

    Follows the official ``load_images`` for the 512 models: PIL resize of the long side to
    ``long_side`` (LANCZOS when shrinking, BICUBIC otherwise), centre crop of each side to a multiple
    of 16 (square images become 4:3 unless ``square_ok``), then ``(x / 255 - 0.5) / 0.5``.
    """
    from PIL import Image

    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    outs, shapes, transforms = [], [], []
    for img in arr:
        H1, W1 = img.shape[:2]
        (W, H), box = _resize_crop_box(W1, H1, long_side, square_ok)
        pil = Image.fromarray(np.ascontiguousarray(img), mode="RGB")
        interp = Image.LANCZOS if max(W1, H1) > long_side else Image.BICUBIC
        pil = pil.resize((W, H), interp).crop(box)
        out = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        outs.append((out - 0.5) / 0.5)
        shapes.append((pil.size[1], pil.size[0]))
        transforms.append(Dust3rTransform((W1, H1), (W, H), (box[0], box[1]), (box[2] - box[0], box[3] - box[1])))
    return torch.stack(outs), torch.tensor(shapes, dtype=torch.int64), transforms


# ====================================================================== pairwise inference


@dataclass
class Dust3rPairs:
    """Raw DUSt3R predictions for ordered pairs ``(i, j)`` (P pairs, each map H x W).

    ``pts3d_i[p]`` is view i's point map in view i's camera frame; ``pts3d_j_in_i[p]`` view j's in
    view i's frame; both share one unknown per-pair scale. ``conf_*`` are DUSt3R confidences (≥ 1
    for conf mode ('exp', 1, inf)).
    """

    pairs: list[tuple[int, int]]
    pts3d_i: Tensor  # (P, H, W, 3)
    pts3d_j_in_i: Tensor  # (P, H, W, 3)
    conf_i: Tensor  # (P, H, W)
    conf_j: Tensor  # (P, H, W)
    num_views: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)


def all_ordered_pairs(n: int) -> list[tuple[int, int]]:
    """Every ordered pair (i, j), i != j: the official 'complete' scene graph, symmetrised."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


@torch.no_grad()
def pairwise_inference(
    model: Dust3rModel,
    images: Tensor,
    pairs: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 4,
) -> Dust3rPairs:
    """Run DUSt3R on ordered pairs of preprocessed views (N, 3, h, w) (default: all N·(N−1)).

    Each view is encoded once (the encoder is siamese and sees one image at a time, so this equals
    the official per-pair encoding) and the decoders + heads run on batches of ``batch_size``
    pairs. Outputs are float32 on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, h, w) images, got {tuple(images.shape)}")
    n = images.shape[0]
    pairs = list(all_ordered_pairs(n) if pairs is None else pairs)
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"bad pair ({i}, {j}) for {n} views")
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    feats, poss = [], []
    for s in range(0, n, max(1, batch_size)):
        f, p = model.encode(images[s : s + batch_size].to(dev, dtype))
        feats.append(f)
        poss.append(p)
    feat, pos = torch.cat(feats), torch.cat(poss)
    size = tuple(images.shape[-2:])
    out: dict[str, list[Tensor]] = {"pts3d": [], "conf": [], "pts3d_in_other_view": [], "conf2": []}
    for s in range(0, len(pairs), max(1, batch_size)):
        chunk = pairs[s : s + batch_size]
        ii = torch.tensor([p[0] for p in chunk], device=dev)
        jj = torch.tensor([p[1] for p in chunk], device=dev)
        dec1, dec2 = model.decode(feat[ii], pos[ii], feat[jj], pos[jj])
        res = model.heads(dec1, dec2, size)  # type: ignore[arg-type]
        for k in out:
            out[k].append(res[k].float().cpu())
    if not pairs:
        H, W = size
        empty3, empty1 = torch.zeros(0, H, W, 3), torch.zeros(0, H, W)
        return Dust3rPairs([], empty3, empty3.clone(), empty1, empty1.clone(), n)
    return Dust3rPairs(
        pairs=pairs,
        pts3d_i=torch.cat(out["pts3d"]),
        pts3d_j_in_i=torch.cat(out["pts3d_in_other_view"]),
        conf_i=torch.cat(out["conf"]),
        conf_j=torch.cat(out["conf2"]),
        num_views=n,
        meta={"source": "dust3r", "image_size": size},
    )
