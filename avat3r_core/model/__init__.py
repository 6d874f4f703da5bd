"""The Avat3r network (tokenizer → transformer with expression cross-attention → Gaussian head).

See :mod:`avat3r_core.model.avat3r` for the encode/decode animation cache and the ablation
switches, :mod:`avat3r_core.model.config` for the presets.
"""

from avat3r_core.model.avat3r import (
    Avat3r,
    Avat3rInputs,
    Avat3rOutput,
    EncodedAvatar,
    flops_estimate,
    model_info,
    parameter_breakdown,
    parameter_count,
)
from avat3r_core.model.config import Avat3rConfig
from avat3r_core.model.head import GaussianHead, PixelSkips
from avat3r_core.model.tokenizer import Tokenizer
from avat3r_core.model.transformer import Transformer

__all__ = [
    "Avat3r",
    "Avat3rConfig",
    "Avat3rInputs",
    "Avat3rOutput",
    "EncodedAvatar",
    "GaussianHead",
    "PixelSkips",
    "Tokenizer",
    "Transformer",
    "flops_estimate",
    "model_info",
    "parameter_breakdown",
    "parameter_count",
]
