"""The autograd Function of the fused InfoNCE loss.

It takes the inputs and a :class:`~fastcl.ops.dispatch.KernelPlan` (the column layout,
the backend, the backward strategy and the normalization's eps: everything decided
above it, in :mod:`fastcl.plan`), looks its kernels up in the dispatch table, and
keeps memory O((N + M) D): the forward saves the inputs and one log-sum-exp per row, and
the backward recomputes the rest.
"""

from __future__ import annotations

import torch

from .dispatch import KernelPlan, kernels
from .layout import ColumnLayout, GuideMask
from .utils import accumulator_dtype


def kernel_params(inv_tau: torch.Tensor, layout: ColumnLayout, dtype: torch.dtype) -> torch.Tensor:
    """``[1/tau, log hard weight, log gaussian weight]`` as a tensor the kernels read.

    Passing these through memory rather than as Python floats keeps the learnable
    temperature on the device (no host sync) and keeps all three in float64 for float64
    inputs (Triton passes Python floats as fp32 on the GPU).
    """
    acc = accumulator_dtype(dtype)
    # Filled on the device: building it from a host list would copy from pageable memory,
    # which waits for every kernel already queued (a host sync per call on CUDA).
    params = torch.full((3,), layout.log_hard_weight, dtype=acc, device=inv_tau.device)
    params[2] = layout.log_gauss_weight
    params[0] = inv_tau.detach().reshape(()).to(acc)
    return params


class InfoNCEFunction(torch.autograd.Function):
    """Per-row InfoNCE losses ``lse_i - logit[i, target_i]``.

    Arguments: ``q`` (N x D queries), ``k_grad`` (columns that get a gradient),
    ``k_const`` (columns that do not, or None), ``inv_tau`` (0-dim tensor, may require
    grad), ``targets`` (int64 of length N, or None for the diagonal), ``groups`` (None,
    or int64 group ids of the rows and of the ``k_grad`` columns: a row's candidates
    among ``k_grad`` are those of its own group) and ``plan``, the
    :class:`~fastcl.ops.dispatch.KernelPlan` (its layout describes ``[k_grad; k_const]``),
    and optionally ``thresholds``: the false-negative margin's per-row thresholds on the
    similarity (see :class:`~fastcl.ops.layout.ColumnLayout`; no gradient), handed to the
    kernels only when given, and optionally ``guide``: the guide rule's
    :class:`~fastcl.ops.layout.GuideMask` (detached, no gradient), likewise. A target of -1 means no target: the row's value is its
    log-sum-exp (-inf when every entry is masked; such a row gets no gradient).
    With ``plan.normalize_eps`` the rows are raw, and their gradients are with respect to
    the raw rows; no backend keeps the unit rows or their gradients.
    Returns the N per-row losses in the accumulator dtype (fp32, fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, q, k_grad, k_const, inv_tau, targets, groups, plan: KernelPlan, thresholds=None,
                guide: GuideMask | None = None):
        k = k_grad if k_const is None else torch.cat([k_grad, k_const])
        # Kernels that do not know the margin or the guide are never handed them (the plan
        # routes such calls to backends that compute them).
        extra = {} if thresholds is None else {"thresholds": thresholds.detach()}
        if guide is not None:
            extra["guide"] = GuideMask(*(x.detach() for x in guide))
        params = kernel_params(inv_tau, plan.layout, q.dtype)
        entry = kernels(q.device.type, plan.backend, plan.backward)
        ctx.plan, ctx.groups, ctx.inv_tau_dtype = plan, groups, inv_tau.dtype
        ctx.one_pass = entry.backward is None
        if ctx.one_pass:  # the gradients come with the forward, for row gradients of 1
            need_q, need_k, _, need_tau = ctx.needs_input_grad[:4]
            loss_rows, dq, dk, row_dot = entry.forward(
                q, k, params, targets, plan.layout, groups=groups, normalize_eps=plan.normalize_eps,
                need_dq=need_q or need_tau, need_dk=need_k, **extra)
            ctx.save_for_backward(dq, dk, row_dot)
            ctx.dtypes = q.dtype, k.dtype
            return loss_rows
        lse, target_logit = entry.forward(q, k, params, targets, plan.layout, groups=groups,
                                          normalize_eps=plan.normalize_eps, **extra)
        ctx.save_for_backward(q, k, params, targets, lse, extra.get("thresholds"),
                              *(extra["guide"] if guide is not None else (None, None, None)))
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        need_q, need_k, _, need_tau = ctx.needs_input_grad[:4]
        plan = ctx.plan
        if ctx.one_pass:
            dq, dk, row_dot = _scaled(ctx.saved_tensors, grad_rows, ctx.dtypes)
        else:
            q, k, params, targets, lse, thresholds, *guide = ctx.saved_tensors
            extra = {} if thresholds is None else {"thresholds": thresholds}
            if guide[0] is not None:
                extra["guide"] = GuideMask(*guide)
            backward = kernels(q.device.type, plan.backend, plan.backward).backward
            dq, dk, row_dot = backward(q, k, params, targets, plan.layout, lse, grad_rows, need_dq=need_q or need_tau,
                                       need_dk=need_k, groups=ctx.groups, normalize_eps=plan.normalize_eps, **extra)
        d_inv_tau = row_dot.sum().to(ctx.inv_tau_dtype) if need_tau else None
        return (dq if need_q else None), (dk if need_k else None), None, d_inv_tau, None, None, None, None, None


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): then the
    saved gradients must stay as they are for the next backward. True when unknown."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except Exception:  # noqa: BLE001 - a torch without this query: always copy
        return True


def _scaled(saved, grad_rows, dtypes):
    """Gradients formed in the forward for row gradients of 1, times the incoming ones.
    dq and row_dot are linear in each row's own gradient; dk sums over rows, so it takes
    the common value (the loss was reduced to a scalar: every row's gradient is equal).

    When the graph is not kept, the saved gradients are scaled in place and handed over:
    nothing reads them again, and a copy would hold a second (N + M) x D of gradients at
    the step's peak. A retained graph (or a compiled backward) gets scaled copies, so
    every backward sees the same saved gradients."""
    dq, dk, row_dot = saved
    g = grad_rows.to(row_dot.dtype if row_dot is not None else grad_rows.dtype)
    in_place = not torch.compiler.is_compiling() and not _graph_is_kept()

    def scale(x, factor, dtype):
        if x is None:
            return None
        if x.dtype != dtype or not in_place:
            return (x * factor).to(dtype)
        return x.mul_(factor)

    return (scale(dq, g[:, None] if dq is not None else None, dtypes[0]), scale(dk, g[0], dtypes[1]),
            row_dot * g if row_dot is not None else None)
