"""The loss family's options, composed above the kernels: K hard negatives per anchor,
directions and partition modes, the hardness penalty and the false-negative margin.

Each chosen direction is one application of the fused Function
(:class:`~fastcl.ops.function.InfoNCEFunction`) with its own queries, candidate rows and
column layout; each returns one value per row, and the loss of row i combines them:

- query_to_doc (the usual InfoNCE row, target: the positive) and doc_to_query (p_i
  against the anchors, target: a_i, the same pair) return ``lse - positive_logit``;
- query_to_query and doc_to_doc have no target of their own (target -1): they return
  their log-sum-exp, and the positive logit (an O(N D) row-wise product) is subtracted
  here;
- ``joint``: the log-sum-exp of those terms (the softmax over the union of the
  directions' entries); ``per_direction``: their mean.

Autograd carries each term's gradient through its Function's own backward, so memory
stays O((N + M) D) and every backend that computes the layout gets every direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .numerics import check_real
from .ops.function import InfoNCEFunction
from .ops.layout import HARDNESS_MODES, ColumnLayout
from .ops.utils import accumulator_dtype
from .reference import DIRECTIONS, PARTITION_MODES

QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC = DIRECTIONS
#: The directions whose candidates never hold the positive.
SAME_TOWER = (QUERY_TO_QUERY, DOC_TO_DOC)
DEFAULT_DIRECTIONS = (QUERY_TO_DOC,)


def check_family_options(directions, partition_mode, hardness_mode, hardness_strength, false_negative_margin,
                         symmetric: bool) -> tuple[tuple[str, ...], str]:
    """The directions (deduplicated, in :data:`DIRECTIONS` order) and the partition mode
    a call computes, once the family's options have passed their checks (TypeError /
    ValueError naming the argument). ``symmetric=True`` is ``(query_to_doc,
    doc_to_query)`` per direction."""
    if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
        raise TypeError(f"directions must be a tuple of direction names from {DIRECTIONS}, got {directions!r}")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"directions must be names from {DIRECTIONS}, got {unknown[0]!r}")
    if QUERY_TO_DOC not in directions:
        raise ValueError("directions must include 'query_to_doc': it holds the positive pair")
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {partition_mode!r}")
    chosen = tuple(d for d in DIRECTIONS if d in directions)
    if symmetric:
        if chosen != DEFAULT_DIRECTIONS:
            raise ValueError("symmetric=True is directions=('query_to_doc', 'doc_to_query') with "
                             f"partition_mode='per_direction'; it cannot be combined with directions={tuple(directions)}")
        chosen, partition_mode = (QUERY_TO_DOC, DOC_TO_QUERY), "per_direction"
    if partition_mode == "per_direction" and set(chosen) & set(SAME_TOWER):
        raise ValueError("partition_mode='per_direction' needs every direction's candidates to hold the positive "
                         "pair; 'query_to_query' and 'doc_to_doc' never do (their per-direction loss is ill-defined): "
                         "use partition_mode='joint'")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be None or one of {tuple(HARDNESS_MODES)}, got {hardness_mode!r}")
    strength = check_real("hardness_strength", hardness_strength)
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"hardness_strength must be a finite number >= 0, got {hardness_strength!r}")
    if false_negative_margin is not None:
        margin = check_real("false_negative_margin", false_negative_margin)
        if not math.isfinite(margin):
            raise ValueError(f"false_negative_margin must be None or a finite number, got {false_negative_margin!r}")
    return chosen, partition_mode


def hardness_fields(hardness_mode: str | None, hardness_strength: float) -> dict:
    """The layout fields of the hardness penalty (none when it adds nothing)."""
    if hardness_mode is None or hardness_strength == 0:
        return {}
    return dict(hardness_mode=HARDNESS_MODES[hardness_mode], hardness_strength=float(hardness_strength))


def n_hard_blocks(hard_negatives: torch.Tensor | None) -> int:
    """K: hard negatives per anchor (0 without, 1 for N x D, K for N x K x D)."""
    if hard_negatives is None:
        return 0
    return hard_negatives.shape[1] if hard_negatives.dim() == 3 else 1


def hard_blocks(hard_negatives: torch.Tensor) -> torch.Tensor:
    """N x D or N x K x D hard negatives as the K N x D blocks ``[h[:, 0]; ...; h[:, K-1]]``
    (sentence-transformers' column order), one (K N) x D matrix."""
    if hard_negatives.dim() == 2:
        return hard_negatives
    n, k, d = hard_negatives.shape
    return hard_negatives.transpose(0, 1).reshape(k * n, d)


def query_to_query_layout(n_queries: int, n_all: int, offset: int = 0) -> ColumnLayout:
    """Queries (rows ``offset`` .. of ``n_all`` anchors) against all anchors, each row's
    own column masked."""
    return ColumnLayout(n_cols=n_all, n_grad_cols=n_all, gauss_start=n_all, self_start=offset, n_self=n_queries)


def doc_to_doc_layout(n_queries: int, n_all: int, k_blocks: int, offset: int = 0) -> ColumnLayout:
    """Positives (rows ``offset`` .. of ``n_all``) against ``[positives; hard blocks]``,
    where each block holds every rank's hard negatives in rank order with this rank's
    ``k_blocks`` blocks of ``n_queries`` rows together at ``n_all + k_blocks * offset``;
    each row's own positive and own hard negatives masked."""
    n_cols = n_all * (1 + k_blocks)
    return ColumnLayout(n_cols=n_cols, n_grad_cols=n_cols, hard_start=n_all + k_blocks * offset,
                        n_hard=n_queries if k_blocks else 0, n_hard_blocks=max(k_blocks, 1), gauss_start=n_cols,
                        log_hard_weight=float("-inf") if k_blocks else 0.0, self_start=offset, n_self=n_queries)


def candidate_rows(k_grad: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """The rows that labels index: ``[positives; hard blocks; extra negatives]``."""
    return k_grad if extra is None else torch.cat([k_grad, extra.detach().to(k_grad.dtype)])


def _unit(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    x = x.to(accumulator_dtype(x.dtype))
    return x if eps is None else F.normalize(x, dim=-1, eps=eps)


def positive_logits(anchors: torch.Tensor, targets: torch.Tensor, inv_tau: torch.Tensor,
                    normalize_eps: float | None) -> torch.Tensor:
    """``sim(a_i, c_{t_i}) / tau`` for each row, differentiable (an O(N D) row-wise
    product; ``targets`` holds each row's target candidate row)."""
    return (_unit(anchors, normalize_eps) * _unit(targets, normalize_eps)).sum(dim=-1) * inv_tau


def margin_thresholds(anchors: torch.Tensor, targets: torch.Tensor, margin: float | None,
                      normalize_eps: float | None) -> torch.Tensor | None:
    """The false-negative margin's per-row thresholds ``sim(a_i, c_{t_i}) + margin``
    (detached, in the accumulator dtype), or None without a margin."""
    if margin is None:
        return None
    with torch.no_grad():
        return (_unit(anchors.detach(), normalize_eps) * _unit(targets.detach(), normalize_eps)).sum(dim=-1) + margin


def combine(terms: list[torch.Tensor], partition_mode: str) -> torch.Tensor:
    """Row losses from the directions' terms, each ``lse_direction - positive_logit``:
    ``joint`` is their log-sum-exp, ``per_direction`` their mean."""
    if len(terms) == 1:
        return terms[0]
    if partition_mode == "per_direction":
        return sum(terms) / len(terms)
    return torch.logsumexp(torch.stack(terms), dim=0)


def per_row_losses(rows, with_target=(), without_target=(), positive=None, partition_mode="joint") -> torch.Tensor:
    """Each row's loss: the Function applied to ``rows`` (query_to_doc) and to every
    argument tuple of ``with_target`` (terms ``lse - positive``) and of ``without_target``
    (target -1: ``lse``, from which ``positive`` is subtracted), combined per
    ``partition_mode``."""
    terms = [InfoNCEFunction.apply(*rows)] + [InfoNCEFunction.apply(*args) for args in with_target]
    terms += [InfoNCEFunction.apply(*args) - positive for args in without_target]
    return combine(terms, partition_mode)

