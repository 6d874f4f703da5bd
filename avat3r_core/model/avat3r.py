"""The Avat3r network: few posed images (+ position maps, features) and an expression → 3D Gaussians.

``Avat3r.forward(inputs, z_exp) == Avat3r.decode(Avat3r.encode(inputs), z_exp)``.

Animation cache (:class:`EncodedAvatar`)
----------------------------------------
:meth:`Avat3r.encode` runs everything that does not depend on the expression and stores exactly:

* ``tokens`` (B, V·T, D): the token sequence after the tokenizer (patch embedding + feature fusion
  + positional embedding) and the first ``config.encoder_blocks`` self-attention blocks, i.e. the
  input of the first cross-attention layer. With the paper's 8 SA + 8 CA (one CA after each SA
  block) that is the output of SA block 1; with ``tiny`` (2 + 2) likewise.
* ``skips`` (:class:`~avat3r_core.model.head.PixelSkips`, N = B·V views): the input RGB (colour
  skip and the upsampler's full-resolution RGB input), the position map as base means (position
  skip) *or* the pixel rays (origins, unit directions) when the mean comes from ray × depth, and the
  per-pixel log-scale base ``log(scale_footprint · z / f)``.
* ``valid`` (B, V, H, W): ``confidence > confidence_threshold`` (all True without a confidence).

:meth:`Avat3r.decode` maps ``z_exp`` to S expression tokens and runs the first CA layer, the
remaining (SA block, CA layer) pairs, the final LayerNorm and the upsampler/head. A cache of batch
1 can be decoded with a batch of n expressions (it is broadcast), which is how an avatar is
driven.

Validity: the dense per-pixel maps keep every pixel (fixed shapes for batched training) with a
``valid`` mask; :meth:`Avat3rOutput.gaussians` returns only valid pixels of one sample, and
:meth:`Avat3rOutput.masked_opacity_logits` gives invalid pixels zero opacity for renderers that
take the dense set. The confidence is used whenever it is given, also with
``use_position_map=False`` (pass ``confidence=None`` to keep every pixel).

Ablations (config): ``use_position_map=False`` feeds zeros instead of the position map, and the
mean is ``camera centre + t · ray`` (see :mod:`avat3r_core.model.head`); ``position_skip=False``
uses the same ray × depth mean while still feeding the position map; ``color_skip=False`` predicts
``colour = 0.5 + residual``; ``use_features=False`` builds no feature projection and takes no
features; ``random_timestep_inputs`` is bookkeeping for the data sampler.

:func:`parameter_count` and :func:`flops_estimate` back ``avat3r model info`` (:func:`model_info`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from avat3r_core.cameras import Cameras
from avat3r_core.gaussians import Gaussians, rgb_to_sh_dc
from avat3r_core.model.config import NUM_GAUSSIAN_CHANNELS, NUM_INPUT_CHANNELS, Avat3rConfig
from avat3r_core.model.head import GaussianHead, PixelSkips
from avat3r_core.model.tokenizer import Tokenizer
from avat3r_core.model.transformer import Transformer

__all__ = [
    "Avat3r",
    "Avat3rInputs",
    "Avat3rOutput",
    "EncodedAvatar",
    "parameter_count",
    "parameter_breakdown",
    "flops_estimate",
    "model_info",
]

#: Opacity logit given to invalid pixels by :meth:`Avat3rOutput.masked_opacity_logits`
#: (sigmoid underflows to exactly 0 in float32).
INVALID_OPACITY_LOGIT = -1e4


@dataclass
class Avat3rInputs:
    """One batch of B samples with V input views each (all views share H × W).

    ``images`` (B, V, 3, H, W) RGB in [0, 1]; ``cameras``: B·V cameras, sample-major (camera
    ``b·V + v``), or a sequence of B ``Cameras`` of V each; ``position_maps`` (B, V, 3, H, W)
    world-space points per pixel; ``confidence`` (B, V, H, W); ``features`` (B, V, Cf, h, w).
    """

    images: Tensor
    cameras: Cameras | Sequence[Cameras]
    position_maps: Tensor | None = None
    confidence: Tensor | None = None
    features: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cameras, Cameras):
            self.cameras = Cameras.cat(list(self.cameras))
        if self.images.ndim != 5 or self.images.shape[2] != 3:
            raise ValueError(f"images: expected (B, V, 3, H, W), got {tuple(self.images.shape)}")
        b, v, _, h, w = self.images.shape
        if len(self.cameras) != b * v:
            raise ValueError(f"{len(self.cameras)} cameras for {b} samples × {v} views")
        if (self.cameras.width, self.cameras.height) != (w, h):
            raise ValueError(f"cameras are {self.cameras.width}x{self.cameras.height}, images {w}x{h}")
        if self.position_maps is not None and tuple(self.position_maps.shape) != (b, v, 3, h, w):
            raise ValueError(f"position_maps: expected {(b, v, 3, h, w)}, got {tuple(self.position_maps.shape)}")
        if self.confidence is not None and tuple(self.confidence.shape) != (b, v, h, w):
            raise ValueError(f"confidence: expected {(b, v, h, w)}, got {tuple(self.confidence.shape)}")
        if self.features is not None and (self.features.ndim != 5 or tuple(self.features.shape[:2]) != (b, v)):
            raise ValueError(f"features: expected ({b}, {v}, Cf, h, w), got {tuple(self.features.shape)}")

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def num_views(self) -> int:
        return self.images.shape[1]


@dataclass
class EncodedAvatar:
    """The expression-independent part of a forward pass (see the module docstring)."""

    tokens: Tensor  # (B, V·T, D) input of the first cross-attention layer
    skips: PixelSkips  # per view (B·V, ...)
    valid: Tensor  # (B, V, H, W) bool

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_views(self) -> int:
        return self.valid.shape[1]

    def expand(self, n: int) -> "EncodedAvatar":
        """Repeat a batch-1 cache n times (to decode n expressions at once)."""
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot broadcast an encoded batch of {self.batch_size} to {n} expressions")

        def rep(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.unsqueeze(0).expand(n, *t.shape).reshape(n * t.shape[0], *t.shape[1:])

        skips = PixelSkips(**{f.name: rep(getattr(self.skips, f.name)) for f in dataclasses.fields(PixelSkips)})
        return EncodedAvatar(self.tokens.expand(n, -1, -1), skips, self.valid.expand(n, -1, -1, -1))


@dataclass
class Avat3rOutput:
    """Dense per-pixel Gaussians: ``(B, V, H, W, ·)``; ``valid`` (B, V, H, W) bool.

    ``quats`` are unit (w, x, y, z); ``colors`` are RGB (unclamped); ``log_scales`` and
    ``opacity_logits`` are raw, as :class:`Gaussians` stores them.
    """

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    colors: Tensor
    valid: Tensor

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    def masked_opacity_logits(self, fill: float = INVALID_OPACITY_LOGIT) -> Tensor:
        """Opacity logits with invalid pixels set to ``fill`` (zero opacity)."""
        return torch.where(self.valid, self.opacity_logits, self.opacity_logits.new_tensor(fill))

    def _gaussians(self, b: int, mask: Tensor | None, opacity_logits: Tensor) -> Gaussians:
        def pick(t: Tensor) -> Tensor:
            t = t[b].reshape(-1, *t.shape[4:])
            return t if mask is None else t[mask]

        return Gaussians(
            means=pick(self.means),
            quats=pick(self.quats),
            log_scales=pick(self.log_scales),
            opacity_logits=pick(opacity_logits),
            sh=rgb_to_sh_dc(pick(self.colors))[:, None, :],
        )

    def gaussians(self, b: int) -> Gaussians:
        """The valid Gaussians of sample ``b`` (degree-0 SH), differentiable."""
        return self._gaussians(b, self.valid[b].reshape(-1), self.opacity_logits)

    def dense_gaussians(self, b: int) -> Gaussians:
        """All V·H·W Gaussians of sample ``b``; invalid ones get zero opacity (fixed count)."""
        return self._gaussians(b, None, self.masked_opacity_logits())


class Avat3r(nn.Module):
    def __init__(self, config: Avat3rConfig | None = None):
        super().__init__()
        self.config = config = config or Avat3rConfig()
        self.tokenizer = Tokenizer(config)
        self.transformer = Transformer(config)
        self.head = GaussianHead(config)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.tokenizer.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.transformer.expression.token_embed, std=0.02)
        self.head.reset_output(config.head_init_std)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, inputs: Avat3rInputs) -> EncodedAvatar:
        c = self.config
        dtype = self.tokenizer.patch_embed.weight.dtype
        b, v, _, h, w = inputs.images.shape
        n = b * v
        cams = inputs.cameras.to(dtype=dtype)
        rgb = inputs.images.reshape(n, 3, h, w).to(dtype)
        if c.use_position_map:
            if inputs.position_maps is None:
                raise ValueError("use_position_map=True: pass position_maps")
            pos = inputs.position_maps.reshape(n, 3, h, w).to(dtype)
        else:
            pos = rgb.new_zeros(n, 3, h, w)
        pixels = torch.cat([rgb * 2 - 1, pos, cams.plucker()], dim=1)
        features = None
        if c.features_enabled:
            if inputs.features is None:
                raise ValueError("use_features=True and feature_dim > 0: pass features (or set use_features=False)")
            features = inputs.features.reshape(n, *inputs.features.shape[2:])
        tokens = self.tokenizer(pixels, features)  # (N, T, D)
        tokens = self.transformer.encode(tokens.reshape(b, -1, c.dim))

        pos_hw = pos.permute(0, 2, 3, 1)
        focal = 0.5 * (cams.fx + cams.fy)  # (N,)
        if c.use_position_map:
            z = cams.world_to_camera(pos_hw)[..., 2:3].clamp_min(c.min_depth)
        else:
            z = pos_hw.new_full((n, h, w, 1), c.init_depth)
        log_scale_base = torch.log(c.scale_footprint * z / focal[:, None, None, None]).expand(-1, -1, -1, 3)
        if c.use_position_map and c.position_skip:
            skips = PixelSkips(rgb, pos_hw, None, None, log_scale_base)
        else:
            origins, dirs = cams.rays()
            skips = PixelSkips(rgb, None, origins, dirs, log_scale_base)

        if inputs.confidence is not None:
            valid = inputs.confidence > c.confidence_threshold
        else:
            valid = torch.ones(b, v, h, w, dtype=torch.bool, device=rgb.device)
        return EncodedAvatar(tokens, skips, valid)

    def decode(self, encoded: EncodedAvatar, z_exp: Tensor) -> Avat3rOutput:
        c = self.config
        if z_exp.ndim == 1:
            z_exp = z_exp.unsqueeze(0).expand(encoded.batch_size, -1)
        if z_exp.ndim != 2 or z_exp.shape[1] != c.expr_dim:
            raise ValueError(f"z_exp: expected (B, {c.expr_dim}), got {tuple(z_exp.shape)}")
        encoded = encoded.expand(z_exp.shape[0])
        b, v, h, w = encoded.valid.shape
        x = self.transformer.decode(encoded.tokens, z_exp)
        maps = self.head(x.reshape(b * v, -1, c.dim), encoded.skips)
        maps = {k: t.reshape(b, v, h, w, *t.shape[3:]) for k, t in maps.items()}
        return Avat3rOutput(valid=encoded.valid, **maps)

    def forward(self, inputs: Avat3rInputs, z_exp: Tensor) -> Avat3rOutput:
        return self.decode(self.encode(inputs), z_exp)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# -------------------------------------------------------------------- model info
def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(model: Avat3r) -> dict[str, int]:
    """Parameters per component (tokenizer, self_attention, cross_attention, expression, head)."""
    t = model.transformer
    return {
        "tokenizer": parameter_count(model.tokenizer),
        "self_attention_blocks": parameter_count(t.blocks),
        "cross_attention_layers": parameter_count(t.cross),
        "expression_mlp": parameter_count(t.expression),
        "final_norm": parameter_count(t.norm),
        "upsampler_head": parameter_count(model.head),
        "total": parameter_count(model),
    }


def flops_estimate(config: Avat3rConfig, num_views: int | None = None, image_size: int | None = None) -> dict:
    """Analytical FLOPs of one forward pass of one sample (multiply-adds × 2).

    Counted: patch-embed conv, feature projection, SA QKV + output projections
    (``4·N·D²`` MACs per block), SA matmuls (``QKᵀ`` and ``AV``: ``2·N²·D``), MLP
    (``2·N·D·hidden``), CA projections (q, out on N tokens; k, v on S tokens) and matmuls
    (``2·N·S·D``), the expression MLP, the upsampler linear, refine convs and output conv. Not
    counted: norms, activations, softmax, grid-sample, Plücker rays, the Gaussian activation.
    ``encode``/``decode`` split the total at the animation cache.
    """
    c = config
    v = num_views or c.num_views
    s = image_size or c.image_size
    p, d, hid = c.patch_size, c.dim, c.mlp_hidden
    n_tok = v * (s // p) ** 2
    pixels = v * s * s
    se = c.num_expr_tokens
    L, C = c.depth, c.cross_attn_layers
    patch = 2 * n_tok * NUM_INPUT_CHANNELS * p * p * d
    feature = 2 * n_tok * c.feature_dim * d if c.features_enabled else 0
    sa_proj_blk = 2 * 4 * n_tok * d * d
    sa_mm_blk = 2 * 2 * n_tok * n_tok * d
    mlp_blk = 2 * 2 * n_tok * d * hid
    ca_proj = C * 2 * (2 * n_tok * d * d + 2 * se * d * d)
    ca_mm = C * 2 * 2 * n_tok * se * d
    expr = 2 * (c.expr_dim * c.expr_hidden + c.expr_hidden * se * d)
    up_linear = 2 * n_tok * d * p * p * c.upsample_dim
    refine, width = 0, c.upsample_dim + 3
    for _ in range(c.refine_layers):
        refine += 2 * pixels * 9 * width * c.refine_dim
        width = c.refine_dim
    out = 2 * pixels * width * NUM_GAUSSIAN_CHANNELS
    out_dict = {
        "tokens": n_tok,
        "patch_embed": patch,
        "feature_proj": feature,
        "self_attn_proj": L * sa_proj_blk,
        "self_attn_matmul": L * sa_mm_blk,
        "mlp": L * mlp_blk,
        "cross_attn_proj": ca_proj,
        "cross_attn_matmul": ca_mm,
        "expr_mlp": expr,
        "upsampler": up_linear + refine + out,
    }
    out_dict["attention"] = out_dict["self_attn_proj"] + out_dict["self_attn_matmul"]
    total = patch + feature + L * (sa_proj_blk + sa_mm_blk + mlp_blk) + ca_proj + ca_mm + expr + up_linear + refine + out
    encode = patch + feature + c.encoder_blocks * (sa_proj_blk + sa_mm_blk + mlp_blk)
    out_dict.update(total=total, encode=encode, decode=total - encode)
    return out_dict


def model_info(config: Avat3rConfig) -> dict:
    """Parameter counts (built on the meta device: no memory, no init cost) and FLOPs."""
    with torch.device("meta"):
        model = Avat3r(config)
    flops = flops_estimate(config)
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items()},
        "heads": config.num_heads,
        "tokens": config.num_tokens,
        "parameters": parameter_breakdown(model),
        "flops": flops,
        "gflops": {k: round(v / 1e9, 3) for k, v in flops.items() if k != "tokens"},
        "max_gaussians": config.num_views * config.image_size**2,
        "encoder_blocks_cached": config.encoder_blocks,
    }

