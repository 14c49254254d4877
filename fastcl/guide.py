"""The guide rule's arguments, checked, and what each direction's kernels receive.

A guide is a second model's view of the batch (GISTEmbed's guide model, DCLR's
complementary model): ``guide_anchors`` (one row per anchor) and ``guide_candidates``
(one row per gradient column: the positives, then the hard-negative blocks in the
candidates' order), both of any width Dg, and ``guide_threshold`` (a float, or one value
per anchor). An entry whose guide rows' cosine exceeds its row's threshold is dropped
from the softmax (:class:`~fastcl.ops.layout.ColumnLayout` states the rule); the target
entry and the constant columns (extra and Gaussian negatives) never are.

Each direction compares the guide rows of its own queries and candidates, with the
threshold of the pair its row belongs to (row i of every direction is pair i):

- query_to_doc: guide anchor i against every guide candidate;
- query_to_query: guide anchor i against every guide anchor;
- doc_to_query: guide candidate i (positive i) against every guide anchor;
- doc_to_doc: guide candidate i against every guide candidate.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .directions import DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_QUERY
from .ops.layout import GuideMask
from .ops.utils import SUPPORTED_DTYPES, accumulator_dtype

NAMES = ("guide_anchors", "guide_candidates", "guide_threshold")


def check_guide(anchors: torch.Tensor, guide_anchors, guide_candidates, guide_threshold, n_grad_cols: int, *,
                eps: float, check_finite: bool = True, groups=None) -> GuideMask | None:
    """The guide of a call with ``anchors`` (N x D, already checked) and ``n_grad_cols``
    gradient columns, as the kernels take it: unit rows in the anchors' accumulator
    dtype, detached (normalized as ``F.normalize(x, dim=-1, eps=eps)``), and N
    thresholds; None without a guide. A TypeError or ValueError names the argument
    (one device sync for the finiteness checks when ``check_finite``)."""
    given = [x is not None for x in (guide_anchors, guide_candidates, guide_threshold)]
    if not any(given):
        return None
    if not all(given):
        missing = [name for name, g in zip(NAMES, given) if not g]
        raise ValueError(f"guide_anchors, guide_candidates and guide_threshold go together: {', '.join(missing)} "
                         "missing")
    if groups is not None:
        raise ValueError("guide_anchors is not supported with groups: the guide scores sentence pairs, groups "
                         "score tokens within a sequence")
    n, device = anchors.shape[0], anchors.device
    for name, x, rows in (("guide_anchors", guide_anchors, n), ("guide_candidates", guide_candidates, n_grad_cols)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() != 2 or x.shape[0] != rows or x.shape[1] == 0:
            raise ValueError(f"{name} must be {rows} x Dg with Dg >= 1 (one row per "
                             f"{'anchor' if rows == n and name == 'guide_anchors' else 'positive and hard negative'})"
                             f", got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but anchors are on {device}")
    if guide_candidates.shape[1] != guide_anchors.shape[1]:
        raise ValueError(f"guide_candidates has dim {guide_candidates.shape[1]}, guide_anchors have "
                         f"{guide_anchors.shape[1]}: both come from the one guide model")
    acc = accumulator_dtype(anchors.dtype)
    thresholds = _thresholds(guide_threshold, n, acc, device)
    if check_finite and device.type != "meta" and not torch.compiler.is_compiling():
        finite = torch.stack([torch.isfinite(x).all() for x in (guide_anchors, guide_candidates, thresholds)]).tolist()
        for name, ok in zip(NAMES, finite):
            if not ok:
                raise ValueError(f"{name} contains NaN or infinite values")
    with torch.no_grad():
        rows, cols = (F.normalize(x.detach().to(acc), dim=-1, eps=eps) for x in (guide_anchors, guide_candidates))
    return GuideMask(rows, cols, thresholds)


def _thresholds(threshold, n: int, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"guide_threshold must be a float or a floating-point tensor, got {threshold.dtype}")
        if threshold.shape not in ((), (n,)):
            raise ValueError(f"guide_threshold must be a float or a tensor of one value per anchor ({n}), got shape "
                             f"{tuple(threshold.shape)}")
        if threshold.device != device:
            raise ValueError(f"guide_threshold is on {threshold.device} but anchors are on {device}")
        return threshold.detach().to(acc).expand(n).contiguous()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"guide_threshold must be a float or a tensor, got {type(threshold).__name__}")
    if not math.isfinite(threshold):
        raise ValueError(f"guide_threshold must be finite, got {threshold!r}")
    return torch.full((n,), float(threshold), dtype=acc, device=device)


def direction_guide(guide: GuideMask | None, direction: str, n: int, n_docs: int | None = None, *,
                    docs: torch.Tensor | None = None, anchors: torch.Tensor | None = None) -> GuideMask | None:
    """The guide of ``direction``'s term for a batch of ``n`` pairs (see the module
    docstring); ``guide`` is the query_to_doc one; doc_to_doc scores the first
    ``n_docs`` candidates (all by default). The distributed losses, whose candidates
    (``guide.cols``) are every rank's, pass this rank's guide positives as ``docs``
    (default: the first ``n`` candidates) and the anchors' guide rows that the
    same-tower and column terms score against as ``anchors`` (default ``guide.rows``)."""
    if guide is None:
        return None
    own_docs = guide.cols[:n] if docs is None else docs
    all_anchors = guide.rows if anchors is None else anchors
    rows, cols = {QUERY_TO_QUERY: (guide.rows, all_anchors), DOC_TO_QUERY: (own_docs, all_anchors),
                  DOC_TO_DOC: (own_docs, guide.cols[:n_docs])}[direction]
    return GuideMask(rows, cols, guide.thresholds)
