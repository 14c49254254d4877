"""fastcl: fused contrastive (InfoNCE) losses that never materialize the N x M similarity matrix."""

from . import native  # noqa: F401 - loads the compiled extension (the CPU kernels of torch.ops.fastcl.*)
from .encoder import encode, load_encoder
from .loss import InfoNCELoss, draw_gaussian_negatives, info_nce
from .nt_xent import NTXentLoss, nt_xent
from .ops import operators  # noqa: F401 - registers torch.ops.fastcl.* (schemas, CUDA and fake kernels)
from .reference import info_nce_reference, nt_xent_reference
from .token_level import token_info_nce

__version__ = "0.1.0"

__all__ = [
    "InfoNCELoss", "info_nce", "NTXentLoss", "nt_xent", "token_info_nce",
    "info_nce_reference", "nt_xent_reference", "draw_gaussian_negatives", "encode", "load_encoder",
    "__version__",
]
