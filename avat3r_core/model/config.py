"""Configuration of the Avat3r network (:class:`Avat3rConfig`) with named presets.

Defaults are the published model where the paper fixes a value, and our documented choice where it
does not (width, patch size, upsampler, initialisation are unpublished):

=========  ======  =====  =====  ===========  ===========  ======================================
preset     views   image  patch  width (D)    SA + CA      features
=========  ======  =====  =====  ===========  ===========  ======================================
``paper``  4       512²   16     768 (12 h)   8 + 8        1024 (Sapiens-0.3b width)
``small``  4       256²   16     384 (6 h)    6 + 6        1024 (Sapiens-0.3b width)
``tiny``   4       64²    8      128 (2 h)    2 + 2        32 (stand-in backbone; set to match)
=========  ======  =====  =====  ===========  ===========  ======================================

``paper`` uses 1024 feature channels (Sapiens-0.3b) because that is the Sapiens model this project
can run by default; the paper used Sapiens-2B (1920 channels): pass ``feature_dim=1920`` for it.
The ``tiny`` feature width must equal the channel count of whatever stand-in feature backbone the
data pipeline uses; 32 is only our default.

Build with :func:`avat3r_core.config.build`: ``build(Avat3rConfig, {"dim": 256}, preset="tiny")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avat3r_core.errors import FormatError
from avat3r_core.geometry import FRAMES
from avat3r_core.tracking import EXPRESSION_DIM

__all__ = ["Avat3rConfig", "NUM_PLUCKER_CHANNELS", "NUM_INPUT_CHANNELS", "NUM_GAUSSIAN_CHANNELS"]

#: Plücker ray coordinates per pixel (direction 3 + moment 3).
NUM_PLUCKER_CHANNELS = 6
#: Per-pixel input channels of the patch embedding: RGB 3 + position map 3 + Plücker 6.
NUM_INPUT_CHANNELS = 3 + 3 + NUM_PLUCKER_CHANNELS
#: Per-pixel raw outputs of the head: offset 3, log-scale 3, quaternion 4, colour residual 3,
#: opacity logit 1.
NUM_GAUSSIAN_CHANNELS = 3 + 3 + 4 + 3 + 1

_SOURCE = "Avat3rConfig"


@dataclass
class Avat3rConfig:
    # ---------------------------------------------------------------- inputs
    image_size: int = 512  #: square input crops (H = W); any multiple of patch_size also runs
    num_views: int = 4  #: V, input views per sample (bookkeeping + FLOPs; the net takes any V)
    expr_dim: int = EXPRESSION_DIM  #: D_exp: FLAME expr 100 + eyes 12 + eyelids 2 + neck 6 + jaw 6 + pose 9
    feature_dim: int = 1024  #: channels of the feature map (Sapiens); 0 = no feature input
    # ---------------------------------------------------------------- transformer
    patch_size: int = 16
    dim: int = 768  #: token width D
    head_dim: int = 64  #: heads = dim / head_dim (GRM convention)
    depth: int = 8  #: dense self-attention blocks over all views' tokens
    cross_attn_layers: int = 8  #: expression cross-attention layers, one after each of the last ones
    mlp_ratio: float = 4.0
    num_expr_tokens: int = 4  #: S, expression tokens the MLP maps z_exp to
    expr_hidden_dim: int = 0  #: hidden width of the expression MLP (0 = dim)
    #: how z_exp enters the expression MLP (:class:`~avat3r_core.model.transformer.ExpressionEncoder`):
    #: "none" = the raw code; "layout" = relative to the rest code, 6D rotation dims × ``expr_rotation_gain``
    #: (a jaw opening of 0.1 rad then moves its dims by about as much as one sigma of a FLAME
    #: expression coefficient), and with ``frame="head"`` the head-pose dims dropped (the inputs and
    #: cameras are already in the head's frame: they carry no appearance there)
    expr_normalization: str = "none"
    expr_rotation_gain: float = 10.0
    # ---------------------------------------------------------------- upsampler / head
    upsample_dim: int = 32  #: channels per pixel after linear + pixel-shuffle
    refine_layers: int = 1  #: 3x3 conv layers at full resolution (they also see the input RGB)
    refine_dim: int = 32
    # ---------------------------------------------------------------- Gaussians
    confidence_threshold: float = 0.5  #: keep pixels with confidence > threshold
    init_opacity: float = 0.9  #: opacity of every Gaussian when the output layer is zero
    scale_footprint: float = 1.0  #: init scale = scale_footprint · depth / focal (pixel footprint)
    init_depth: float = 1.0  #: ray depth when the mean comes from ray × depth (no position skip)
    offset_scale: float = 0.05  #: world units per raw unit of the position offset / ray log-depth
    #: std of the output layer's weights (0 = exactly zero). 0.02, the std of every other layer, not
    #: 1e-3: upstream changes reach the Gaussians from the first step (demo: held-out +0.5 dB)
    head_init_std: float = 0.02
    min_depth: float = 1e-3  #: camera depth clamp when computing the pixel footprint
    # ---------------------------------------------------------------- ablations (paper Table)
    use_position_map: bool = True  #: False: zeros replace the position map, mean = ray × depth
    use_features: bool = True  #: False: no feature map input (needs none)
    position_skip: bool = True  #: mean = position map + offset (else ray × predicted depth)
    color_skip: bool = True  #: colour = input RGB + residual (else 0.5 + residual)
    random_timestep_inputs: bool = True  #: data-sampler switch; bookkeeping only here
    #: the frame of the cameras and position maps it was trained on (the loader's ``frame``:
    #: "head" = each view in its timestep's tracked head frame, "world" = the capture's frame);
    #: reconstruction and evaluation feed it the same. Its home is the data's setting
    #: (``LoaderConfig.frame``, default "head"): training on shards copies it here. The default is
    #: "world" because checkpoints from before the setting existed hold no ``frame`` and were
    #: trained in the world frame (and in-memory sources, e.g. the synthetic one, have no head frame).
    frame: str = "world"

    PRESETS: ClassVar[dict] = {
        "paper": dict(
            image_size=512, num_views=4, patch_size=16, dim=768, depth=8, cross_attn_layers=8,
            feature_dim=1024, upsample_dim=32, refine_layers=1, refine_dim=32,
        ),
        "small": dict(
            image_size=256, num_views=4, patch_size=16, dim=384, depth=6, cross_attn_layers=6,
            feature_dim=1024, upsample_dim=32, refine_layers=1, refine_dim=32,
        ),
        "tiny": dict(
            image_size=64, num_views=4, patch_size=8, dim=128, depth=2, cross_attn_layers=2,
            feature_dim=32, upsample_dim=16, refine_layers=1, refine_dim=16,
        ),
    }

    def __post_init__(self) -> None:
        positive = ("image_size", "num_views", "expr_dim", "patch_size", "dim", "head_dim", "depth",
                    "num_expr_tokens", "upsample_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FormatError(_SOURCE, name, f"expected a positive integer, got {value!r}")
        for name in ("feature_dim", "expr_hidden_dim", "refine_layers", "cross_attn_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError(_SOURCE, name, f"expected a non-negative integer, got {value!r}")
        if self.refine_layers and self.refine_dim <= 0:
            raise FormatError(_SOURCE, "refine_dim", f"must be positive, got {self.refine_dim}")
        if self.expr_normalization not in ("none", "layout"):
            raise FormatError(_SOURCE, "expr_normalization", f"must be none or layout, got {self.expr_normalization!r}")
        if self.frame not in FRAMES:
            raise FormatError(_SOURCE, "frame", f"must be head or world, got {self.frame!r}")
        if self.image_size % self.patch_size:
            raise FormatError(_SOURCE, "image_size",
                              f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.head_dim:
            raise FormatError(_SOURCE, "dim", f"{self.dim} is not a multiple of head_dim {self.head_dim}")
        if self.cross_attn_layers > self.depth:
            raise FormatError(_SOURCE, "cross_attn_layers",
                              f"{self.cross_attn_layers} > depth {self.depth}: at most one per SA block")
        if not 0.0 <= self.confidence_threshold:
            raise FormatError(_SOURCE, "confidence_threshold", "must be >= 0")
        if not 0.0 < self.init_opacity < 1.0:
            raise FormatError(_SOURCE, "init_opacity", f"must lie in (0, 1), got {self.init_opacity}")
        for name in ("scale_footprint", "init_depth", "offset_scale", "min_depth", "mlp_ratio"):
            if not getattr(self, name) > 0:
                raise FormatError(_SOURCE, name, f"must be positive, got {getattr(self, name)}")
        if self.head_init_std < 0:
            raise FormatError(_SOURCE, "head_init_std", "must be >= 0")

    # ---------------------------------------------------------------- derived
    @property
    def num_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def grid_size(self) -> int:
        """Tokens per image side."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Tokens the transformer sees per sample (all views jointly)."""
        return self.num_views * self.tokens_per_view

    @property
    def features_enabled(self) -> bool:
        return self.use_features and self.feature_dim > 0

    @property
    def encoder_blocks(self) -> int:
        """Self-attention blocks that run before the first cross-attention layer (the cache)."""
        return self.depth - self.cross_attn_layers + (1 if self.cross_attn_layers else 0)

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def expr_hidden(self) -> int:
        return self.expr_hidden_dim or self.dim

    @property
    def cross_after(self) -> tuple[int, ...]:
        """Indices of the SA blocks followed by a cross-attention layer (the last ones)."""
        return tuple(range(self.depth - self.cross_attn_layers, self.depth))
