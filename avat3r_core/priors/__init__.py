"""Per-view priors for Avat3r: DUSt3R position maps (+ alignment into the calibrated world), Sapiens
feature maps, and the EfficientNet-Lite0 stand-in feature extractor used when Sapiens is absent.

Submodules are imported on demand by callers (``from avat3r_core.priors.dust3r_checkpoint import ...``); this
package re-exports the main entry points for convenience.
"""

from avat3r_core.priors.align import align_pairwise_to_world, similarity_align, solve_pair_scales
from avat3r_core.priors.backbone import (
    BACKBONE_SOURCE,
    EfficientNetLite0,
    extract_backbone_features,
    load_efficientnet_lite0,
)
from avat3r_core.priors.dust3r import PAPER_CONFIG, Dust3rConfig, Dust3rModel
from avat3r_core.priors.dust3r_checkpoint import load_dust3r
from avat3r_core.priors.dust3r_inference import Dust3rPairs, Dust3rTransform, dust3r_preprocess, pairwise_inference
from avat3r_core.priors.sapiens import (
    SapiensModel,
    apply_projection,
    bytes_per_frame,
    extract_features,
    fit_projection,
    load_sapiens,
    sapiens_preprocess,
)

__all__ = [
    "BACKBONE_SOURCE",
    "PAPER_CONFIG",
    "Dust3rConfig",
    "Dust3rModel",
    "Dust3rPairs",
    "Dust3rTransform",
    "EfficientNetLite0",
    "SapiensModel",
    "align_pairwise_to_world",
    "apply_projection",
    "bytes_per_frame",
    "dust3r_preprocess",
    "extract_backbone_features",
    "extract_features",
    "fit_projection",
    "load_dust3r",
    "load_efficientnet_lite0",
    "load_sapiens",
    "pairwise_inference",
    "sapiens_preprocess",
    "similarity_align",
    "solve_pair_scales",
]
