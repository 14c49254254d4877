"""The autograd Function of the fused InfoNCE loss, over interchangeable backends.

A backend is a pair of functions with the signatures of
:func:`fastcl.ops.infonce_fwd.infonce_forward` and
:func:`fastcl.ops.infonce_bwd.infonce_backward`:

- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``);
- ``"torch"``: the chunked PyTorch implementation in :mod:`fastcl.ops.chunked`;
- ``"native"``: the dispatcher operators ``torch.ops.fastcl.infonce_fwd`` /
  ``infonce_bwd`` (:mod:`fastcl.native`): the compiled C++ kernel on CPU tensors, the
  Triton kernels on CUDA tensors.

With CUDA tensors the ``"triton"`` backend also goes through the operators (whose CUDA
kernels are the Triton launchers), so torch.compile sees one opaque call instead of
tracing into a kernel launch; with CPU tensors (Triton's interpreter) it calls the
launchers directly.

Both keep memory O((N + M) * D) (plus a bounded chunk for ``"torch"``): the forward
saves the inputs and one log-sum-exp per row, and the backward recomputes the rest.
Triton is imported only when its backend is used, so a machine without it can still
use the PyTorch path.
"""

from __future__ import annotations

import torch

from .layout import ColumnLayout
from .utils import accumulator_dtype


def _triton_forward(q, k, params, targets, layout, groups=None, normalize_eps=None):
    if q.is_cuda:
        from ..native import operator_forward

        return operator_forward(q, k, params, targets, layout, groups=groups, normalize_eps=normalize_eps)
    from .infonce_fwd import infonce_forward

    return infonce_forward(q, k, params, targets, layout, groups=groups, normalize_eps=normalize_eps)


def _triton_backward(q, k, params, targets, layout, lse, grad_rows, need_dq=True, need_dk=True, groups=None,
                     normalize_eps=None):
    if q.is_cuda:
        from ..native import operator_backward

        return operator_backward(q, k, params, targets, layout, lse, grad_rows, need_dq, need_dk, groups=groups,
                                 normalize_eps=normalize_eps)
    from .infonce_bwd import infonce_backward

    return infonce_backward(q, k, params, targets, layout, lse, grad_rows, need_dq, need_dk, groups=groups,
                            normalize_eps=normalize_eps)


#: The backends whose kernels normalize rows on the fly (``normalize_eps``).
FUSED_NORMALIZATION = ("triton", "native", "torch")


def _backend(name: str):
    """The (forward, backward) pair of a backend; see the module docstring."""
    if name == "triton":
        return _triton_forward, _triton_backward
    if name == "torch":
        from .chunked import chunked_backward, chunked_forward

        return chunked_forward, chunked_backward
    if name == "native":
        from ..native import operator_backward, operator_forward

        return operator_forward, operator_backward
    raise ValueError(f"unknown kernel backend {name!r}")


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
    """Per-row InfoNCE losses ``lse_i - logit[i, target_i]`` of normalized inputs.

    Arguments: ``q`` (N x D queries), ``k_grad`` (columns that get a gradient),
    ``k_const`` (columns that do not, or None), ``inv_tau`` (0-dim tensor, may require
    grad), ``targets`` (int64 of length N, or None for the diagonal), ``layout``
    (:class:`ColumnLayout` of ``[k_grad; k_const]``), ``backend`` (name) and ``groups``
    (None, or int32 group ids of the rows and of the ``k_grad`` columns: a row's
    candidates among ``k_grad`` are those of its own group) and ``normalize_eps``: None
    when the rows come normalized (or are scored raw), else the inputs are raw rows that
    the backend normalizes on the fly, as ``F.normalize(x, dim=-1, eps=normalize_eps)``
    would, and their gradients are with respect to the raw rows. Every backend takes it
    (:data:`FUSED_NORMALIZATION`); none keeps the unit rows or their gradients
    (fastcl/ops/normalize.py).
    Returns the N per-row losses in the accumulator dtype (fp32, fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, q, k_grad, k_const, inv_tau, targets, layout: ColumnLayout, backend: str, groups=None,
                normalize_eps=None):
        k = k_grad if k_const is None else torch.cat([k_grad, k_const])
        params = kernel_params(inv_tau, layout, q.dtype)
        forward_fn, _ = _backend(backend)
        extra = {} if groups is None else {"groups": groups}
        if normalize_eps is not None:
            if backend not in FUSED_NORMALIZATION:
                raise ValueError(f"normalize_eps needs one of the backends {FUSED_NORMALIZATION}, not {backend!r}")
            extra["normalize_eps"] = normalize_eps
        lse, target_logit = forward_fn(q, k, params, targets, layout, **extra)
        ctx.save_for_backward(q, k, params, targets, lse)
        ctx.layout, ctx.backend, ctx.extra = layout, backend, extra
        ctx.inv_tau_dtype = inv_tau.dtype
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        q, k, params, targets, lse = ctx.saved_tensors
        need_q, need_k, _, need_tau = ctx.needs_input_grad[:4]
        _, backward_fn = _backend(ctx.backend)
        dq, dk, row_dot = backward_fn(q, k, params, targets, ctx.layout, lse, grad_rows,
                                      need_dq=need_q or need_tau, need_dk=need_k, **ctx.extra)
        d_inv_tau = row_dot.sum().to(ctx.inv_tau_dtype) if need_tau else None
        return (dq if need_q else None), dk, None, d_inv_tau, None, None, None, None, None
