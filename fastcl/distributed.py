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
point-to-point messages, and their gradients travel with them (see the section below).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_sizes(rows: int, device: torch.device, group) -> list[int]:
    world, _ = _world(group)
    local = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


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
        _, rank = _world(ctx.group)
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


def gathered_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    hard_negative_weight: float = 1.0,
    gaussian_negatives: int = 0,
    gaussian_weight: float = 1.0,
    generator: torch.Generator | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    check_finite: bool = True,
    group=None,
) -> torch.Tensor:
    """InfoNCE of this rank's anchors against every rank's positives and hard negatives.

    The positives and hard negatives of all ranks are gathered with their gradients
    (:func:`all_gather_with_grad`), so every one of them is a negative for every anchor
    and receives the gradient of every rank's loss: the global-batch loss, as one process
    would compute it on the whole batch. Anchor i of rank r targets its own positive at
    global row ``offset_r + i``; ``extra_negatives`` and Gaussian negatives are local and
    get no gradient (pass the same generator seed on every rank for identical draws).
    With ``symmetric`` the anchors are gathered too and each local positive is also
    scored against all anchors.

    The value is scaled for DistributedDataParallel, which averages gradients over the W
    ranks: ``"mean"`` returns ``W / N_global`` times the sum of the local rows' losses
    (the local mean when every rank holds N_global / W rows), ``"sum"`` returns W times
    the local sum, so that DDP's average is the gradient of the global mean (sum) loss.
    ``"none"`` returns the local per-row losses unscaled.
    """
    from .loss import (
        _check_options, _check_tensors, _choose_backend, _gaussian, constant_rows, inverse_temperature,
        reduce_rows, split_normalization, unit_rows,
    )
    from .ops.infonce import InfoNCEFunction
    from .ops.layout import ColumnLayout

    _check_options(temperature, hard_negative_weight, gaussian_negatives, gaussian_weight, reduction, backend, eps,
                   symmetric=symmetric, normalize=normalize, check_finite=check_finite)
    rescaled = _check_tensors(anchors, positives, hard_negatives, extra_negatives, None, temperature, symmetric,
                              check_finite, normalize=normalize, eps=eps)
    anchors, positives = rescaled.get("anchors", anchors), rescaled.get("positives", positives)
    hard_negatives = rescaled.get("hard_negatives", hard_negatives)
    extra_negatives = rescaled.get("extra_negatives", extra_negatives)
    import math

    world, rank = _world(group)
    sizes = _gather_sizes(anchors.shape[0], anchors.device, group)
    n_local, n_global, offset = sizes[rank], sum(sizes), sum(sizes[:rank])
    gaussian = _gaussian(gaussian_negatives, anchors, generator)

    n_extra = extra_negatives.shape[0] if extra_negatives is not None else 0
    n_grad_cols = n_global * (2 if hard_negatives is not None else 1)
    n_cols = n_grad_cols + n_extra + gaussian_negatives
    chosen = _choose_backend(backend, anchors.device, n_local * n_cols)
    if chosen == "reference":
        chosen = "torch"  # the dense reference knows no rank offsets; the chunked path does
    # Raw rows travel when the kernels normalize (the gather's backward is the same).
    normalize_here, fused_eps = split_normalization(normalize, eps, chosen)

    q = unit_rows(anchors, normalize_here, eps)
    p_all = all_gather_with_grad(unit_rows(positives, normalize_here, eps), group)
    blocks = [p_all]
    n_hard = 0
    if hard_negatives is not None:
        blocks.append(all_gather_with_grad(unit_rows(hard_negatives, normalize_here, eps), group))
        n_hard = n_local
    k_grad = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    k_const = constant_rows(extra_negatives, gaussian, normalize_here, eps)
    layout = ColumnLayout(
        n_cols=n_cols, n_grad_cols=n_grad_cols, hard_start=n_global + offset, n_hard=n_hard,
        gauss_start=n_grad_cols + n_extra, log_hard_weight=math.log(hard_negative_weight),
        log_gauss_weight=math.log(gaussian_weight))
    inv_tau = inverse_temperature(temperature, anchors)
    targets = torch.arange(offset, offset + n_local, device=anchors.device)

    per_row = InfoNCEFunction.apply(q, k_grad, k_const, inv_tau, targets, layout, chosen, None, fused_eps)
    if symmetric:
        a_all = all_gather_with_grad(q, group)
        p_local = p_all[offset:offset + n_local]
        per_col = InfoNCEFunction.apply(p_local, a_all, None, inv_tau, targets, ColumnLayout.plain(n_global), chosen,
                                        None, fused_eps)
        per_row = (per_row + per_col) / 2
    if reduction == "none":
        return reduce_rows(per_row, "none", anchors.dtype)
    scale = world / n_global if reduction == "mean" else world
    return reduce_rows(per_row, "sum", anchors.dtype) * scale


# ------------------------------------------------------------------ ring-distributed loss
#
# The gathered loss above holds every rank's positives (and hard negatives) at once:
# O(N_global * D) per rank. The ring loss below never does. Each rank's block of
# candidates, B_r = [positives_r; hard_negatives_r] (what needs a gradient), travels
# around the ring r -> r + 1 -> ... while every rank scores its own anchors against the
# block it holds, one block at a time:
#
#   forward   W steps. Step s: rank r holds B_{r-s}; it starts sending it to r + 1 and
#             receiving B_{r-s-1} from r - 1, and meanwhile runs the backend's forward
#             of its queries against B_{r-s}: a per-row partial log-sum-exp, merged into
#             the running one with logaddexp. The target column (positive i) lives in
#             the home block B_r, so step 0 (home, with the local extra and Gaussian
#             negatives appended and the hard-negative weight on the diagonal) gives the
#             target logit; visiting blocks are scored with target -1 (matches nothing).
#   backward  the same W steps again, now with the global per-row log-sum-exp: step s
#             adds B_{r-s}'s share to this rank's dq and row_dot (temperature gradient),
#             and adds this rank's rows' contribution to the visiting block's dk, an
#             accumulator that travels with the block. After the last step each dk is
#             sent on once more, which brings it home after a full turn: rank r then
#             holds the gradient of every rank's loss with respect to its own block.
#
# Memory per rank, in embeddings: its queries, its home block (plus its constants), the
# block being scored, the block being received, and in the backward the two blocks'
# dk accumulators and dq: O(local_batch * D), whatever the number of ranks, plus the
# backend's own bounded workspace (none for Triton; a fixed chunk budget for "torch").
# Measured (tests/test_ring.py, live tensor bytes over forward + backward, 16 x 512
# float64 rows with hard negatives per rank): 9.1 local blocks at 3 and at 4 ranks
# (8.1 at 2, where no step holds a visiting block and an incoming one at once), while
# the gathered loss holds 7.3, 10.4, 13.5 blocks at 2, 3, 4 ranks (+3.1 per rank).
# Communication: 2(W - 1) block transfers forward + backward, W dk transfers.
#
# Precision: dq and the travelling dk accumulate in fp32 (fp64 for fp64 inputs) and the
# dk accumulators travel in that dtype; each block's share comes from the backend in the
# input dtype, so for fp16 / bf16 inputs it is rounded once per block before being
# added (one process rounds once at the end). Tested with gloo on CPU (chunked PyTorch
# and interpreted Triton backends); not yet run with NCCL on GPUs.

_TAG_BLOCK, _TAG_GRAD = 17, 18


def _ring_exchange(send: list[torch.Tensor], recv: list[torch.Tensor], group, tag: int) -> list:
    """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous
    one; returns the requests to wait on. Every rank posts in the same order, so the
    point-to-point messages pair up (gloo matches by peer and tag, NCCL by order)."""
    world, rank = _world(group)
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    ops = [dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=nxt) for t in send]
    ops += [dist.P2POp(dist.irecv, t, group=group, tag=tag, group_peer=prev) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


class _RingInfoNCE(torch.autograd.Function):
    """Per-row InfoNCE of this rank's queries against the candidate blocks of all ranks.

    Arguments: ``q`` (n x D, normalized), ``k_home`` (this rank's block, the candidates
    that get a gradient), ``k_const`` (local candidates without gradient, or None),
    ``inv_tau``, ``home_layout`` (:class:`ColumnLayout` of ``[k_home; k_const]``, target
    of row i at column i), ``block_rows`` (rows of every rank's block), ``backend``,
    ``group`` and ``normalize_eps`` (raw rows normalized by the kernels, per block: the
    normalization's backward is linear in the per-row sums, so the blocks' parts add up,
    see fastcl/ops/normalize.py; or None). Returns the n per-row losses in the accumulator dtype. All ranks must call
    it together (and its backward), with inputs that agree in requires_grad.
    """

    @staticmethod
    def forward(ctx, q, k_home, k_const, inv_tau, home_layout, block_rows, backend, group, normalize_eps=None):
        from .ops.infonce import _backend, kernel_params
        from .ops.layout import ColumnLayout

        world, rank = _world(group)
        forward_fn, _ = _backend(backend)
        extra = {} if normalize_eps is None else {"normalize_eps": normalize_eps}
        params = kernel_params(inv_tau, home_layout, q.dtype)
        home = k_home if k_const is None else torch.cat([k_home, k_const])
        no_target = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)

        current, lse, target_logit = k_home, None, None
        for step in range(world):
            requests, incoming = [], None
            if step < world - 1:  # start moving the next block while this one is scored
                incoming = k_home.new_empty((block_rows[(rank - step - 1) % world], k_home.shape[1]))
                requests = _ring_exchange([current], [incoming], group, _TAG_BLOCK)
            if step == 0:
                lse, target_logit = forward_fn(q, home, params, None, home_layout, **extra)
            else:
                part, _ = forward_fn(q, current, params, no_target, ColumnLayout.plain(current.shape[0]), **extra)
                lse = torch.logaddexp(lse, part)
            _wait(requests)
            current = incoming

        ctx.save_for_backward(q, home, params, lse)
        ctx.home_layout, ctx.block_rows, ctx.backend, ctx.group = home_layout, block_rows, backend, group
        ctx.extra = extra
        ctx.n_home, ctx.inv_tau_dtype = k_home.shape[0], inv_tau.dtype
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        from .ops.infonce import _backend
        from .ops.layout import ColumnLayout
        from .ops.utils import accumulator_dtype

        q, home, params, lse = ctx.saved_tensors
        need_q, need_k, _, need_tau = ctx.needs_input_grad[:4]
        want_dq = need_q or need_tau  # row_dot comes with dq
        world, rank = _world(ctx.group)
        _, backward_fn = _backend(ctx.backend)
        acc = accumulator_dtype(q.dtype)
        grad_rows = grad_rows.contiguous()
        dim = q.shape[1]
        no_target = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)

        dq = torch.zeros(q.shape, dtype=acc, device=q.device) if want_dq else None
        row_dot = torch.zeros(q.shape[0], dtype=acc, device=q.device) if want_dq else None
        current = home[:ctx.n_home]
        dk_current = torch.zeros((ctx.n_home, dim), dtype=acc, device=q.device) if need_k else None
        for step in range(world):
            next_rows = ctx.block_rows[(rank - step - 1) % world]
            requests, incoming = [], None
            if step < world - 1:
                incoming = current.new_empty((next_rows, dim))
                requests = _ring_exchange([current], [incoming], ctx.group, _TAG_BLOCK)
            if step == 0:
                k, targets, layout = home, None, ctx.home_layout
            else:
                k, targets, layout = current, no_target, ColumnLayout.plain(current.shape[0])
            dq_part, dk_part, row_dot_part = backward_fn(q, k, params, targets, layout, lse, grad_rows,
                                                         need_dq=want_dq, need_dk=need_k, **ctx.extra)
            if want_dq:
                dq += dq_part
                row_dot += row_dot_part
            if need_k:
                dk_current += dk_part
                if world > 1:  # the accumulator travels on with its block (home after step W - 1)
                    dk_incoming = dk_current.new_empty((next_rows, dim))
                    requests += _ring_exchange([dk_current], [dk_incoming], ctx.group, _TAG_GRAD)
                else:
                    dk_incoming = dk_current
            _wait(requests)
            current = incoming
            if need_k:
                dk_current = dk_incoming

        grad_q = dq.to(q.dtype) if need_q else None
        grad_k = dk_current.to(home.dtype) if need_k else None
        d_inv_tau = row_dot.sum().to(ctx.inv_tau_dtype) if need_tau else None
        return grad_q, grad_k, None, d_inv_tau, None, None, None, None, None


def ring_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    hard_negative_weight: float = 1.0,
    gaussian_negatives: int = 0,
    gaussian_weight: float = 1.0,
    generator: torch.Generator | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    check_finite: bool = True,
    group=None,
) -> torch.Tensor:
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

    Every rank must call it, in the same order as its other collectives, with inputs of
    the same dtype, D and requires_grad (local batch sizes may differ); ``backward``
    is collective too. ``backend``: as for :func:`fastcl.info_nce` (``"reference"``
    means the chunked PyTorch path here: the dense reference knows no blocks).
    """
    from .loss import (
        _check_options, _check_tensors, _choose_backend, _gaussian, constant_rows, inverse_temperature,
        reduce_rows, split_normalization, unit_rows,
    )
    from .ops.layout import ColumnLayout

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_info_nce needs an initialized torch.distributed process group")
    _check_options(temperature, hard_negative_weight, gaussian_negatives, gaussian_weight, reduction, backend, eps,
                   symmetric=symmetric, normalize=normalize, check_finite=check_finite)
    rescaled = _check_tensors(anchors, positives, hard_negatives, extra_negatives, None, temperature, symmetric,
                              check_finite, normalize=normalize, eps=eps)
    anchors, positives = rescaled.get("anchors", anchors), rescaled.get("positives", positives)
    hard_negatives = rescaled.get("hard_negatives", hard_negatives)
    extra_negatives = rescaled.get("extra_negatives", extra_negatives)
    import math

    world, rank = _world(group)
    sizes = _gather_sizes(anchors.shape[0], anchors.device, group)
    n_local, n_global = sizes[rank], sum(sizes)
    hard = hard_negatives is not None
    block_rows = [n * (2 if hard else 1) for n in sizes]
    gaussian = _gaussian(gaussian_negatives, anchors, generator)

    chosen = _choose_backend(backend, anchors.device, n_local * max(block_rows))
    if chosen == "reference":
        chosen = "torch"
    normalize_here, fused_eps = split_normalization(normalize, eps, chosen)
    q = unit_rows(anchors, normalize_here, eps)
    p = unit_rows(positives, normalize_here, eps)
    k_home = torch.cat([p, unit_rows(hard_negatives, normalize_here, eps)]) if hard else p
    k_const = constant_rows(extra_negatives, gaussian, normalize_here, eps)
    n_extra = extra_negatives.shape[0] if extra_negatives is not None else 0
    n_home = block_rows[rank]
    home_layout = ColumnLayout(
        n_cols=n_home + n_extra + gaussian_negatives, n_grad_cols=n_home, hard_start=n_local,
        n_hard=n_local if hard else 0, gauss_start=n_home + n_extra,
        log_hard_weight=math.log(hard_negative_weight), log_gauss_weight=math.log(gaussian_weight))
    inv_tau = inverse_temperature(temperature, anchors)

    per_row = _RingInfoNCE.apply(q, k_home, k_const, inv_tau, home_layout, block_rows, chosen, group, fused_eps)
    if symmetric:
        # Column direction of the in-batch block: local positives against every rank's
        # anchors, which now travel the ring in the positives' place.
        per_col = _RingInfoNCE.apply(p, q, None, inv_tau, ColumnLayout.plain(n_local), sizes, chosen, group,
                                     fused_eps)
        per_row = (per_row + per_col) / 2
    if reduction == "none":
        return reduce_rows(per_row, "none", anchors.dtype)
    scale = world / n_global if reduction == "mean" else world
    return reduce_rows(per_row, "sum", anchors.dtype) * scale
