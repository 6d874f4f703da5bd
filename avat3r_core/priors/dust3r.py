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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Dust3rConfig", "Dust3rModel", "PAPER_CONFIG", "apply_rope2d", "build_dust3r"]

_INF = float("inf")


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
