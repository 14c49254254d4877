"""Negatives across ranks over torch.distributed.

Nothing here runs unless called: fastcl never turns distributed behaviour on by itself
because a process group happens to exist.

:func:`all_gather_with_grad` concatenates every rank's rows, and its backward returns to
each rank the sum, over all ranks, of the gradient that reached its own rows. With it,
each rank can compute the loss of its local anchors against the global candidates, and
the sum over ranks of those losses has exactly the gradients of one process computing
the whole batch.

:func:`ring_info_nce` computes the same loss without ever holding more than a few
ranks' worth of rows: the candidate blocks travel around the ring of ranks with
point-to-point messages, and their gradients travel with them (fastcl/ops/ring.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .directions import (
    DEFAULT_DIRECTIONS, DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_QUERY, doc_to_doc_layout, hard_blocks, margin_thresholds,
    n_hard_blocks, per_row_losses, positive_logits, query_to_query_layout,
)
from .guide import NAMES as GUIDE_NAMES
from .guide import check_guide, direction_guide
from .ops import dispatch
from .ops.layout import ColumnLayout, GuideMask
from .ops.ring import RingInfoNCEFunction, world_and_rank
from .plan import (
    LossOptions, candidate_layout, check_call, constant_rows, inverse_temperature, kernel_plan, needs_gradient,
    reduce_for_ddp, uniform_row_gradients,
)


def _gather_sizes(rows: int, device: torch.device, group) -> list[int]:
    world, _ = world_and_rank(group)
    local = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def _checked_call(function: str, anchors, positives, hard_negatives, extra_negatives, options: dict, group):
    """The checked options, inputs and Gaussian negatives of a distributed loss call, and
    (world size, rank, every rank's number of anchors)."""
    generator = options.pop("generator", None)
    options = LossOptions.from_keywords(function, options)
    x, gaussian = check_call(options, anchors, positives, hard_negatives, extra_negatives, generator=generator)
    world, rank = world_and_rank(group)
    return options, x, gaussian, (world, rank, _gather_sizes(x.anchors.shape[0], x.anchors.device, group))


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        sizes = _gather_sizes(x.shape[0], x.device, group)
        widest = max(sizes)
        # all_gather needs equal shapes: pad every rank's rows to the widest, then trim.
        padded = x.new_zeros((widest,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes = group, sizes
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # Every rank's loss may depend on every rank's rows: sum the gradients over ranks
        # (all_reduce, which gloo supports, unlike reduce_scatter), keep our own slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        _, rank = world_and_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Rows of ``x`` from every rank of ``group``, in rank order, differentiable.

    Ranks may hold different numbers of rows. Each rank's gradient is the sum over ranks
    of the gradients flowing into its rows, so ``sum over ranks of loss_rank`` is
    differentiated exactly as if one process held the whole batch.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_gather_with_grad needs an initialized torch.distributed process group")
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Rows of ``x`` from every rank, in rank order, as constants (e.g. MoCo keys)."""
    with torch.no_grad():
        return _AllGatherWithGrad.apply(x.detach(), group)


def gathered_info_nce(anchors: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor | None = None,
                      extra_negatives: torch.Tensor | None = None, *, group=None, gather_anchors: bool = True,
                      guide_anchors: torch.Tensor | None = None, guide_candidates: torch.Tensor | None = None,
                      guide_threshold: float | torch.Tensor | None = None, **options) -> torch.Tensor:
    """InfoNCE of this rank's anchors against every rank's positives and hard negatives.

    The positives and hard negatives of all ranks are gathered with their gradients
    (:func:`all_gather_with_grad`), so every one of them is a negative for every anchor
    and receives the gradient of every rank's loss: the global-batch loss, as one process
    would compute it on the whole batch. Anchor i of rank r targets its own positive at
    global row ``offset_r + i``; ``extra_negatives`` and Gaussian negatives are local and
    get no gradient (pass the same generator seed on every rank for identical draws).
    With ``symmetric`` (doc_to_query) or query_to_query the anchors are gathered too:
    each local positive is scored against all anchors, each local anchor against all
    other anchors; doc_to_doc scores each local positive against every rank's positives
    and hard negatives but its own. ``hard_negatives`` may hold K per anchor (N x K x D).

    ``gather_anchors=False`` keeps the anchors on their rank: query_to_query scores each
    local anchor against this rank's other anchors only, as sentence-transformers'
    GISTEmbedLoss does under ``gather_across_devices`` (then the sum over ranks is no
    longer the one-process loss of the whole batch); doc_to_query needs every rank's
    anchors and is refused with it.

    The guide (``guide_anchors``, ``guide_candidates``, ``guide_threshold``; see
    :func:`fastcl.info_nce`) is given per rank, for this rank's rows:
    ``guide_candidates`` holds the guide rows of this rank's positives and hard
    negatives in the candidates' order; they are gathered (without gradient) beside the
    candidates, so every direction compares the guide rows of the entries it scores.
    Every rank passes a guide, or none.

    Keyword arguments: ``group`` (the process group, default the whole world) and every
    keyword of :func:`fastcl.info_nce` but ``labels`` and ``groups`` (temperature,
    weights, Gaussian negatives and their generator, symmetric, reduction, normalize,
    eps, backend, backward_strategy, check_finite, directions, partition_mode,
    hardness_mode, hardness_strength, false_negative_margin, doc_to_doc_negatives and
    the guide), with the same meaning and defaults; ``backend="dense"`` (or ``"auto"``
    on a tiny batch) takes the chunked PyTorch path here: the dense loss knows no ranks.

    The value is scaled for DistributedDataParallel, which averages gradients over the W
    ranks: ``"mean"`` returns ``W / N_global`` times the sum of the local rows' losses
    (the local mean when every rank holds N_global / W rows), ``"sum"`` returns W times
    the local sum, so that DDP's average is the gradient of the global mean (sum) loss.
    ``"none"`` returns the local per-row losses unscaled.
    """
    options, x, gaussian, (world, rank, sizes) = _checked_call(
        "gathered_info_nce", anchors, positives, hard_negatives, extra_negatives, options, group)
    n_local, n_global, offset = sizes[rank], sum(sizes), sum(sizes[:rank])
    k_blocks = n_hard_blocks(x.hard_negatives)
    directions = set(options.directions)
    if not gather_anchors and DOC_TO_QUERY in directions:
        raise ValueError("gather_anchors=False with doc_to_query (symmetric): the column direction scores each "
                         "positive against every rank's anchors; drop one of them")
    guide = check_guide(x.anchors, guide_anchors, guide_candidates, guide_threshold, n_local * (1 + k_blocks),
                        eps=options.eps, check_finite=options.check_finite)
    n_extra = x.extra_negatives.shape[0] if x.extra_negatives is not None else 0
    # Columns [every rank's positives; every rank's hard blocks], each rank's K blocks
    # together (its own N_r rows per block): row i's own hard negatives then sit at
    # n_global + K offset + k n_local + i.
    layout = candidate_layout(options, n_global * (1 + k_blocks), n_global + k_blocks * offset,
                              n_local if k_blocks else 0, n_extra, k_blocks)
    # The anchors a query_to_query row scores: every rank's, or this rank's.
    n_peers, peer_offset = (n_global, offset) if gather_anchors else (n_local, 0)
    same_tower = [d for d in (QUERY_TO_QUERY, DOC_TO_DOC)
                  if d in directions and (n_peers if d == QUERY_TO_QUERY else n_global) > 1]
    d2d_blocks = k_blocks if options.doc_to_doc_negatives else 0  # doc_to_doc against hard negatives too
    others = [query_to_query_layout(n_local, n_peers, peer_offset) if d == QUERY_TO_QUERY
              else doc_to_doc_layout(n_local, n_global, d2d_blocks, offset) for d in same_tower]
    needed = frozenset().union(*(dispatch.layout_features(o, guide=guide is not None) for o in [layout, *others]))
    plan = kernel_plan(options, layout, x.anchors, n_local * layout.n_cols, dense=False, needed=needed,
                       reduced=uniform_row_gradients(options, 1 + (DOC_TO_QUERY in directions) + len(others)),
                       needs_grad=needs_gradient(x.anchors, x.positives, x.hard_negatives, options.temperature))

    # Raw rows travel: the kernels normalize them (the gather's backward is the same).
    q = x.anchors.contiguous()
    p_all = all_gather_with_grad(x.positives.contiguous(), group)
    k_grad = p_all
    if k_blocks:
        k_grad = torch.cat([p_all, all_gather_with_grad(hard_blocks(x.hard_negatives).contiguous(), group)])
    inv_tau = inverse_temperature(options.temperature, x.anchors)
    targets = torch.arange(offset, offset + n_local, device=x.anchors.device)
    thresholds = margin_thresholds(q, x.positives, options.margin, plan.normalize_eps)
    peers_gathered = gather_anchors and bool(directions & {QUERY_TO_QUERY, DOC_TO_QUERY})
    a_all = all_gather_with_grad(q, group) if peers_gathered else q
    guides = _gathered_guides(guide, n_local, n_global * (1 + d2d_blocks), k_blocks, peers_gathered, group)
    rows = (q, k_grad, constant_rows(x.extra_negatives, gaussian), inv_tau, targets, None, plan, thresholds,
            guides[None])
    p_local = p_all[offset:offset + n_local]
    with_target = []
    if DOC_TO_QUERY in directions:  # local positives against every rank's anchors
        with_target.append((p_local, a_all, None, inv_tau, targets, None,
                            plan._replace(layout=ColumnLayout.plain(n_global)), thresholds, guides[DOC_TO_QUERY]))
    no_target = torch.full((n_local,), -1, dtype=torch.int64, device=q.device)
    without_target = [(q, a_all, None, inv_tau, no_target, None, plan._replace(layout=o), thresholds, guides[d])
                      if d == QUERY_TO_QUERY else
                      (p_local, k_grad[:n_global * (1 + d2d_blocks)], None, inv_tau, no_target, None,
                       plan._replace(layout=o), thresholds, guides[d])
                      for d, o in zip(same_tower, others)]
    positive = positive_logits(q, x.positives, inv_tau, plan.normalize_eps) if without_target else None
    per_row = per_row_losses(rows, with_target, without_target, positive, options.partition_mode)
    return reduce_for_ddp(per_row, options.reduction, x.anchors.dtype, world, n_global)


def _gathered_guides(guide: GuideMask | None, n_local: int, n_d2d: int, k_blocks: int, gather_anchors: bool,
                     group) -> dict:
    """Each direction's guide (None: query_to_doc) when the candidates, and with
    ``gather_anchors`` the anchors, are every rank's: this rank's guide rows for its
    queries, every rank's (gathered as constants, in the candidates' order) for the
    columns. A dict of Nones without a guide."""
    if guide is None:
        return dict.fromkeys((None, DOC_TO_QUERY, QUERY_TO_QUERY, DOC_TO_DOC))
    own_docs = guide.cols[:n_local]
    docs = all_gather_no_grad(own_docs, group)
    if k_blocks:
        docs = torch.cat([docs, all_gather_no_grad(guide.cols[n_local:], group)])
    anchors = all_gather_no_grad(guide.rows, group) if gather_anchors else guide.rows
    query_to_doc = GuideMask(guide.rows, docs, guide.thresholds)
    return {None: query_to_doc, **{d: direction_guide(query_to_doc, d, n_local, n_d2d, docs=own_docs, anchors=anchors)
                                   for d in (DOC_TO_QUERY, QUERY_TO_QUERY, DOC_TO_DOC)}}


def _refuse_on_the_ring(options, hard_negatives) -> None:
    """The ring computes SimCSE's shape (one hard negative per anchor, query_to_doc and
    the symmetric pair): the other options are refused, naming the one to drop."""
    refused = []
    symmetric = (("query_to_doc", DOC_TO_QUERY), "per_direction")
    if options.directions != DEFAULT_DIRECTIONS and (options.directions, options.partition_mode) != symmetric:
        refused.append(f"directions={options.directions} with partition_mode={options.partition_mode!r}")
    if hard_negatives is not None and hard_negatives.dim() == 3 and hard_negatives.shape[1] > 1:
        refused.append("hard_negatives with K > 1 per anchor (N x K x D)")
    if options.hardness_mode is not None and options.hardness_strength != 0:
        refused.append("hardness_mode")
    if options.false_negative_margin is not None:
        refused.append("false_negative_margin")
    if refused:
        raise ValueError(f"ring_info_nce does not compute {', '.join(refused)}: its blocks travel one rank at a time "
                         "and carry one hard negative per anchor; use gathered_info_nce for these options")


def ring_info_nce(anchors: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor | None = None,
                  extra_negatives: torch.Tensor | None = None, *, group=None, **options) -> torch.Tensor:
    """The global-batch loss of :func:`gathered_info_nce`, without gathering the batch.

    Same arguments, same value, same gradients, same reduction scaling for DDP (see
    :func:`gathered_info_nce`: ``"mean"`` returns ``W / N_global`` times the local sum
    of per-row losses, ``"sum"`` W times it, ``"none"`` the local rows unscaled), but
    every rank's positives and hard negatives travel around the ring of ranks one block
    at a time (torch.distributed point-to-point), and their gradients come back the same
    way: per-rank memory stays O(local_batch * D) whatever the number of ranks, at the
    price of 2(W - 1) + W block transfers per step instead of the all-gathers.

    Anchor i's own hard negative (weighted by ``hard_negative_weight``) lives in its
    rank's block; every other rank's positives and hard negatives are plain negatives.
    ``extra_negatives`` and Gaussian negatives are local to each rank and get no
    gradient (pass the same ones, or the same generator seed, on every rank to match
    one process). ``symmetric`` adds the column direction (each positive against every
    rank's anchors, which travel the same way). A learnable ``temperature`` gets this
    rank's share of its gradient (DDP's average makes it the global one).

    The ring computes one hard negative per anchor, the query_to_doc direction and the
    symmetric pair; K > 1 hard negatives, the other directions, ``hardness_mode``,
    ``false_negative_margin`` and the guide are refused (use :func:`gathered_info_nce`).

    Every rank must call it, in the same order as its other collectives, with inputs of
    the same dtype, D and requires_grad (local batch sizes may differ); ``backward``
    is collective too. The keyword arguments are those of :func:`gathered_info_nce`;
    the backward strategy is one that recomputes in the backward (the ring needs the
    global log-sum-exp before any gradient).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_info_nce needs an initialized torch.distributed process group")
    guided = [name for name in GUIDE_NAMES if name in options]
    if guided:
        raise ValueError(f"ring_info_nce does not compute the guide ({', '.join(guided)}): its blocks travel without "
                         "their guide rows; use gathered_info_nce")
    options, x, gaussian, (world, rank, sizes) = _checked_call(
        "ring_info_nce", anchors, positives, hard_negatives, extra_negatives, options, group)
    _refuse_on_the_ring(options, x.hard_negatives)
    n_local, n_global = sizes[rank], sum(sizes)
    hard = x.hard_negatives is not None
    block_rows = [n * (2 if hard else 1) for n in sizes]
    n_extra = x.extra_negatives.shape[0] if x.extra_negatives is not None else 0
    home_layout = candidate_layout(options, block_rows[rank], n_local, n_local if hard else 0, n_extra)
    # The ring recomputes block by block in its backward: no strategy that forms the
    # gradients in the forward (reduced=False).
    plan = kernel_plan(options, home_layout, x.anchors, n_local * max(block_rows), dense=False, reduced=False)
    q, p = x.anchors.contiguous(), x.positives.contiguous()
    k_home = torch.cat([p, hard_blocks(x.hard_negatives).contiguous()]) if hard else p
    inv_tau = inverse_temperature(options.temperature, x.anchors)

    per_row = RingInfoNCEFunction.apply(q, k_home, constant_rows(x.extra_negatives, gaussian), inv_tau, plan,
                                        block_rows, group)
    if DOC_TO_QUERY in options.directions:  # symmetric
        # Column direction of the in-batch block: local positives against every rank's
        # anchors, which now travel the ring in the positives' place.
        columns = plan._replace(layout=ColumnLayout.plain(n_local))
        per_row = (per_row + RingInfoNCEFunction.apply(p, q, None, inv_tau, columns, sizes, group)) / 2
    return reduce_for_ddp(per_row, options.reduction, x.anchors.dtype, world, n_global)
