"""fastcl: fused contrastive (InfoNCE) losses that never materialize the N x M similarity matrix."""

from .loss import InfoNCELoss, draw_gaussian_negatives, info_nce
from .encoder import encode, load_encoder
from .reference import info_nce_reference

__version__ = "0.1.0"

__all__ = ["InfoNCELoss", "info_nce", "info_nce_reference", "draw_gaussian_negatives", "encode",
           "load_encoder", "__version__"]
