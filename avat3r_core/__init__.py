"""avat3r_core: the science of Avat3r (cameras, Gaussians, rendering, FLAME, priors, model).

Pure torch/numpy. Never imports ray or prefect, so every piece is testable on one item.
"""

__version__ = "0.1.0"
