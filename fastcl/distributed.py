"""Negatives across ranks over torch.distributed.

Nothing here runs unless called: fastcl never turns distributed behaviour on by itself
because a process group happens to exist.

:func:`all_gather_with_grad` concatenates every rank's rows, and its backward returns to
each rank the sum, over all ranks, of the gradient that reached its own rows. With it,
each rank can compute the loss of its local anchors against the global candidates, and
the sum over ranks of those losses has exactly the gradients of one process computing
the whole batch.
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
        reduce_rows, unit_rows,
    )
    from .ops.infonce import InfoNCEFunction
    from .ops.layout import ColumnLayout

    _check_options(temperature, hard_negative_weight, gaussian_negatives, gaussian_weight, reduction, backend)
    _check_tensors(anchors, positives, hard_negatives, extra_negatives, None, temperature, symmetric, check_finite)
    import math

    world, rank = _world(group)
    sizes = _gather_sizes(anchors.shape[0], anchors.device, group)
    n_local, n_global, offset = sizes[rank], sum(sizes), sum(sizes[:rank])
    gaussian = _gaussian(gaussian_negatives, anchors, generator)

    q = unit_rows(anchors, normalize, eps)
    p_all = all_gather_with_grad(unit_rows(positives, normalize, eps), group)
    blocks = [p_all]
    n_hard = 0
    if hard_negatives is not None:
        blocks.append(all_gather_with_grad(unit_rows(hard_negatives, normalize, eps), group))
        n_hard = n_local
    k_grad = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    k_const = constant_rows(extra_negatives, gaussian, normalize, eps)
    n_extra = extra_negatives.shape[0] if extra_negatives is not None else 0
    n_cols = k_grad.shape[0] + n_extra + gaussian_negatives
    layout = ColumnLayout(
        n_cols=n_cols, n_grad_cols=k_grad.shape[0], hard_start=n_global + offset, n_hard=n_hard,
        gauss_start=k_grad.shape[0] + n_extra, log_hard_weight=math.log(hard_negative_weight),
        log_gauss_weight=math.log(gaussian_weight))
    chosen = _choose_backend(backend, anchors.device, n_local * n_cols)
    if chosen == "reference":
        chosen = "torch"  # the dense reference knows no rank offsets; the chunked path does
    inv_tau = inverse_temperature(temperature, anchors)
    targets = torch.arange(offset, offset + n_local, device=anchors.device)

    per_row = InfoNCEFunction.apply(q, k_grad, k_const, inv_tau, targets, layout, chosen)
    if symmetric:
        a_all = all_gather_with_grad(q, group)
        p_local = p_all[offset:offset + n_local]
        per_col = InfoNCEFunction.apply(p_local, a_all, None, inv_tau, targets, ColumnLayout.plain(n_global), chosen)
        per_row = (per_row + per_col) / 2
    if reduction == "none":
        return reduce_rows(per_row, "none", anchors.dtype)
    scale = world / n_global if reduction == "mean" else world
    return reduce_rows(per_row, "sum", anchors.dtype) * scale
