"""fastcl: fused contrastive (InfoNCE) losses that never materialize the N x M similarity matrix."""

from . import native  # loads the compiled extension and registers torch.ops.fastcl.*
from .loss import InfoNCELoss, draw_gaussian_negatives, info_nce
from .reference import info_nce_reference

__version__ = "0.1.0"

__all__ = ["InfoNCELoss", "info_nce", "info_nce_reference", "draw_gaussian_negatives", "__version__"]
