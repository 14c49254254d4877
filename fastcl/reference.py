"""Dense PyTorch implementation of the InfoNCE contract (docs/design.md section 1).

This is the oracle every fused backend is tested against, and the path fastcl takes
for tiny batches, where one small matrix product is cheaper than any kernel launch
sequence. It is written for clarity, not memory: it materializes the full N x M logit
matrix, so do not call it on large batches.

Every argument means exactly what it means in :func:`fastcl.info_nce`, except that
Gaussian negatives are passed as the already drawn G x D matrix ``gaussian_negatives``
(so a test can hand the same draw to two implementations).

float16 and bfloat16 inputs are computed in float32 (norms, cosines, the log-sum-exp
and their gradients, which autograd casts back to the input dtype), as every fused
backend does: a half-precision norm overflows above 65504 (fp16), and half-precision
logits and softmax lose what the fused kernels keep. The result is float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops.layout import HARDNESS_HARD, HARDNESS_IN_BATCH, ColumnLayout, GuideMask

_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor | None) -> torch.Tensor | None:
    """Half-precision rows in float32 (differentiable: the gradient comes back in the
    input dtype); other dtypes unchanged."""
    return x.float() if x is not None and x.dtype in _HALF else x


DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")


def info_nce_reference(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    gaussian_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    hard_negative_weight: float = 1.0,
    gaussian_weight: float = 1.0,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    groups: torch.Tensor | None = None,
    directions: tuple[str, ...] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    guide_anchors: torch.Tensor | None = None,
    guide_candidates: torch.Tensor | None = None,
    guide_threshold: float | torch.Tensor | None = None,
    doc_to_doc_negatives: bool = True,
) -> torch.Tensor:
    """InfoNCE with in-batch, hard, extra and Gaussian negatives, computed densely.

    ``logit[i, j] = cos(a_i, c_j) / temperature + w[i, j]`` over the query_to_doc
    candidates ``c = [positives; hard_negatives[:, 0]; ...; hard_negatives[:, K-1];
    extra_negatives; gaussian_negatives]`` (``hard_negatives`` N x D is K = 1), with
    ``w = log(hard_negative_weight)`` at row i's own hard negatives ``N + k N + i`` and
    ``log(gaussian_weight)`` on every Gaussian column; ``loss_i = log_z_i - logit[i,
    t_i]`` with ``t_i = labels[i]`` (``i`` by default) and ``log_z_i`` the log-sum-exp of
    row i's entries in the chosen ``directions`` (``partition_mode="joint"``: one softmax
    over all of them; ``"per_direction"``: the mean of each direction's log-sum-exp):

    - query_to_doc: the row above;
    - query_to_query: a_i against every a_j, j != i;
    - doc_to_query: p_i against every a_j;
    - doc_to_doc: p_i against ``[positives; hard negatives]`` but row i's own ones
      (against the positives alone when ``doc_to_doc_negatives`` is False).

    ``hardness_mode`` adds ``hardness_strength * cos`` (no gradient, not divided by the
    temperature) to query_to_doc entries other than the target: ``"in_batch_negatives"``
    those that are not row i's own hard negatives (nor its target), ``"hard_negatives"``
    its own hard negatives, ``"all_negatives"`` all of them. ``false_negative_margin`` m drops, in
    every direction, each entry of row i (other than its positive) whose cosine exceeds
    ``cos(a_i, c_{t_i}) + m`` (no gradient through the decision). The guide
    (``guide_anchors`` N x Dg, ``guide_candidates`` one row per positive and hard
    negative, ``guide_threshold`` a float or N values) drops, in every direction, each
    entry of row i (other than its positive) between a row and a positive or hard
    negative whose guide rows' cosine exceeds ``guide_threshold[i]``: query_to_doc
    compares guide anchor i with guide candidate j, query_to_query guide anchors with
    guide anchors, doc_to_query guide candidate i with guide anchor j, doc_to_doc guide
    candidate i with guide candidate j. ``symmetric`` is
    ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``.
    Extra and Gaussian negatives receive no gradient. With ``groups`` (one id per
    anchor, shared by its positive and hard negative), a row's positives, hard
    negatives and (doc_to_query) anchors are only those of its own group; extra and
    Gaussian negatives stay visible to every group.
    """
    n = anchors.shape[0]
    anchors, positives, hard_negatives, extra_negatives, gaussian_negatives = map(
        _upcast, (anchors, positives, hard_negatives, extra_negatives, gaussian_negatives))
    if symmetric:
        directions, partition_mode = ("query_to_doc", "doc_to_query"), "per_direction"
    if normalize:
        unit = lambda x: F.normalize(x, dim=-1, eps=eps)  # noqa: E731
    else:
        unit = lambda x: x  # noqa: E731

    a, p = unit(anchors), unit(positives)
    if isinstance(temperature, torch.Tensor):
        # Widened once: every direction divides by it, and a half-precision temperature
        # must receive one gradient formed in the wide dtype, not a half-precision sum.
        temperature = temperature.to(torch.promote_types(temperature.dtype, a.dtype))
    n_blocks = 0
    docs = [p]
    if hard_negatives is not None:
        hard = hard_negatives if hard_negatives.dim() == 3 else hard_negatives[:, None]
        n_blocks = hard.shape[1]
        docs.append(unit(hard).transpose(0, 1).reshape(n_blocks * n, -1))
    docs = torch.cat(docs)  # the columns with a gradient: [p; h[:, 0]; ...; h[:, K-1]]
    blocks = [docs]
    if extra_negatives is not None:
        blocks.append(unit(extra_negatives.detach()))
    if gaussian_negatives is not None:
        blocks.append(unit(gaussian_negatives.detach()))
    candidates = torch.cat(blocks, dim=0)
    m_total, device = candidates.shape[0], anchors.device
    rows, cols = torch.arange(n, device=device), torch.arange(m_total, device=device)
    # Row i's own documents: its positive (column i) and its K hard negatives.
    own_hard = (cols[None, :] >= n) & (cols[None, :] < docs.shape[0]) & ((cols[None, :] - rows[:, None]) % n == 0)
    own_docs = own_hard | (cols[None, :] == rows[:, None])

    sim = a @ candidates.T
    logits = sim / temperature
    if hard_negatives is not None and hard_negative_weight != 1.0:
        logits = torch.where(own_hard, logits + math.log(hard_negative_weight), logits)
    if gaussian_negatives is not None and gaussian_weight != 1.0:
        gauss = cols[None, :] >= m_total - gaussian_negatives.shape[0]
        logits = torch.where(gauss, logits + math.log(gaussian_weight), logits)
    # int64: gather takes no other index dtype (int8 / uint8 labels are valid input).
    targets = labels.to(torch.int64) if labels is not None else rows
    is_target = cols[None, :] == targets[:, None]
    if hardness_mode is not None and hardness_strength != 0.0:
        # With labels the target takes the place of the own positive (column i).
        penalized = {"in_batch_negatives": ~own_hard, "hard_negatives": own_hard,
                     "all_negatives": torch.ones_like(own_docs)}[hardness_mode] & ~is_target
        logits = logits + torch.where(penalized, hardness_strength * sim.detach(), torch.zeros_like(sim))
    masked = torch.zeros_like(logits, dtype=torch.bool)
    if groups is not None:
        candidate_groups = groups.repeat(1 + n_blocks)
        masked[:, : candidate_groups.shape[0]] = groups[:, None] != candidate_groups[None, :]
    threshold = None
    if false_negative_margin is not None:
        threshold = sim.detach().gather(1, targets[:, None]) + false_negative_margin  # N x 1
        masked |= (sim.detach() > threshold) & ~is_target
    d2d_docs = docs if doc_to_doc_negatives else p
    guide = None
    if guide_anchors is not None:
        ga = F.normalize(guide_anchors.detach().to(a.dtype), dim=-1, eps=eps)
        gd = F.normalize(guide_candidates.detach().to(a.dtype), dim=-1, eps=eps)
        guide_thr = torch.as_tensor(guide_threshold, dtype=a.dtype, device=device).expand(n)[:, None]
        guide = {"query_to_doc": ga @ gd.T, "query_to_query": ga @ ga.T, "doc_to_query": gd[:n] @ ga.T,
                 "doc_to_doc": gd[:n] @ gd[: d2d_docs.shape[0]].T}
        over = torch.zeros_like(masked)
        over[:, : docs.shape[0]] = guide["query_to_doc"] > guide_thr
        masked |= over & ~is_target
    terms = {"query_to_doc": logits.masked_fill(masked, float("-inf"))}
    positive_logit = terms["query_to_doc"].gather(1, targets[:, None])[:, 0]

    def term(direction: str, sim_d: torch.Tensor, masked_d: torch.Tensor,
             keep: torch.Tensor | None = None) -> torch.Tensor:
        dropped = torch.zeros_like(masked_d)
        if threshold is not None:
            dropped |= sim_d.detach() > threshold
        if guide is not None:
            dropped |= guide[direction] > guide_thr
        masked_d = masked_d | (dropped if keep is None else dropped & ~keep)
        return (sim_d / temperature).masked_fill(masked_d, float("-inf"))

    eye = rows[:, None] == rows[None, :]
    if "query_to_query" in directions:
        terms["query_to_query"] = term("query_to_query", a @ a.T, eye)
    if "doc_to_query" in directions:
        other_group = groups[:, None] != groups[None, :] if groups is not None else torch.zeros_like(eye)
        terms["doc_to_query"] = term("doc_to_query", p @ a.T, other_group, keep=eye)  # (p_i, a_i) is the positive pair
    if "doc_to_doc" in directions:
        terms["doc_to_doc"] = term("doc_to_doc", p @ d2d_docs.T, own_docs[:, : d2d_docs.shape[0]])
    if partition_mode == "joint":
        log_z = _logsumexp_rows(torch.cat(list(terms.values()), dim=1))
    else:
        log_z = sum(_logsumexp_rows(t) for t in terms.values()) / len(terms)
    per_row = log_z - positive_logit

    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def _logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over dim 1, -inf for a row whose every entry is -inf, with no
    gradient to it (autograd's exp(-inf - -inf) would be NaN)."""
    empty = torch.isneginf(logits).all(dim=1)
    lse = torch.logsumexp(logits.masked_fill(empty[:, None], 0.0), dim=1)
    return torch.where(empty, torch.full_like(lse, float("-inf")), lse)


def layout_loss_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    inv_tau: float | torch.Tensor,
    layout: ColumnLayout,
    targets: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    thresholds: torch.Tensor | None = None,
    normalize_eps: float | None = None,
    guide: GuideMask | None = None,
) -> torch.Tensor:
    """The per-row values the fused kernels return, densely: ``lse_i - logit[i, t_i]``
    (``lse_i`` alone where ``t_i`` is -1; -inf for a row with no unmasked entry) for
    queries ``q`` (N x D) against the columns ``k`` (M x D) under ``layout``, with the
    arguments of the fused kernels (:class:`~fastcl.ops.layout.ColumnLayout` states every
    rule): ``targets`` (None: row i's target is column i; -1: none), ``groups`` (row ids,
    column ids of the first ``n_grad_cols`` columns), ``thresholds`` (the false-negative
    margin's per-row thresholds), ``normalize_eps`` (None: rows as given, else
    normalized as ``F.normalize(x, dim=-1, eps=normalize_eps)``) and ``guide`` (the guide
    rule's :class:`~fastcl.ops.layout.GuideMask`). Differentiable with
    respect to ``q``, the first ``layout.n_grad_cols`` rows of ``k`` and a tensor
    ``inv_tau`` (the columns after those are constants): what every backend's gradients
    are tested against. Half-precision rows are computed in float32."""
    q, k = _upcast(q), _upcast(k)
    k = torch.cat([k[: layout.n_grad_cols], k[layout.n_grad_cols:].detach()])
    if normalize_eps is not None:
        q, k = F.normalize(q, dim=-1, eps=normalize_eps), F.normalize(k, dim=-1, eps=normalize_eps)
    sim = q @ k.T
    n, m = sim.shape
    rows, cols = torch.arange(n, device=q.device), torch.arange(m, device=q.device)
    logits = sim * inv_tau
    own_hard = layout.own_hard(rows, cols)
    if layout.hard_weighted:
        logits = torch.where(own_hard, logits + layout.log_hard_weight, logits)
    if layout.gauss_weighted:
        logits = torch.where(cols[None, :] >= layout.gauss_start, logits + layout.log_gauss_weight, logits)
    targets = rows if targets is None else targets.to(torch.int64)
    is_target = cols[None, :] == targets[:, None]
    if layout.penalized:
        mode = layout.hardness_mode
        penalized = ~is_target & (own_hard if mode == HARDNESS_HARD else
                                  ~own_hard if mode == HARDNESS_IN_BATCH else torch.ones_like(is_target))
        logits = logits + torch.where(penalized, layout.hardness_strength * sim.detach(), torch.zeros_like(sim))
    masked = (cols[None, :] == layout.self_start + rows[:, None]) & (rows[:, None] < layout.n_self)
    if groups is not None:
        row_groups, key_groups = groups
        other = row_groups[:, None] != key_groups[None, : layout.n_grad_cols]
        masked = masked | torch.cat([other, torch.zeros_like(masked[:, layout.n_grad_cols:])], dim=1)
    if thresholds is not None:
        masked = masked | ((sim.detach() > thresholds.detach()[:, None]) & ~is_target)
    if guide is not None:
        over = torch.zeros_like(masked)
        over[:, : layout.n_grad_cols] = guide.rows @ guide.cols.T > guide.thresholds[:, None]
        masked = masked | (over & ~is_target)
    logits = logits.masked_fill(masked, float("-inf"))
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    target_logit = torch.where(targets >= 0, picked, torch.zeros_like(picked))
    return _logsumexp_rows(logits) - target_logit


def nt_xent_reference(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.1,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    false_negative_margin: float | None = None,
) -> torch.Tensor:
    """NT-Xent (SimCLR), densely: all 2N rows of ``[z1; z2]`` are anchors, each scored
    against the other 2N - 1 rows (itself excluded); the target of row i is its other
    view, ``(i + N) mod 2N``. ``"mean"`` averages over the 2N rows. With
    ``false_negative_margin`` m, row i's entries other than its target whose cosine
    exceeds the target's plus m are dropped."""
    n = z1.shape[0]
    z = torch.cat([_upcast(z1), _upcast(z2)])
    if normalize:
        z = F.normalize(z, dim=-1, eps=eps)
    sim = z @ z.T
    logits = sim / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    if false_negative_margin is not None:
        sim = sim.detach()
        threshold = sim.gather(1, targets[:, None]) + false_negative_margin
        is_target = torch.arange(2 * n, device=z.device)[None, :] == targets[:, None]
        self_mask = self_mask | ((sim > threshold) & ~is_target)
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, targets, reduction=reduction)
