"""Workspace backward: logit gradients of a chunk of rows in a bounded buffer, then GEMMs.

The slab backward (infonce_bwd.py) recomputes every similarity tile once per D slab of
each gradient, so at D = 768 with 256-wide slabs it does the 2NMD similarity product
six times. This backward forms it once. For each chunk of R rows:

1. one Triton kernel recomputes S = q_R k^T tile by tile and writes, per tile,
   ``dS = g_i (softmax - [j == t_i]) / tau`` into an R x M workspace in the input dtype
   (the elementwise work fused into the product's epilogue, never a separate pass), and
   adds ``sum_j G_ij s_ij`` into the temperature's row sums;
2. ``dq_R = dS @ k`` and ``dk += dS[:, :n_grad]^T q_R`` are two plain matrix products
   (cuBLAS on the GPU).

That is 6NMD of backward work (2 for S, 2 for dq, 2 for dk) instead of the slab path's
~2NMD x (slabs + 1) per gradient, at the price of writing the workspace once and reading
it twice. Its size is capped (``FASTCL_WORKSPACE_BYTES``, default 1 GiB): R = cap / (M x
element size), so memory stays O((N + M) D + cap), never N x M.

With NORMALIZED the rows are raw: the kernel scales tiles to cosines and dS by the rows'
inverse norms, and adds the column sums ``sum_i G_ij cos_ij`` too; after the products, a
second small kernel gives each gradient row the normalization's rank-1 correction
(fastcl/ops/normalize.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .infonce_fwd import _check_rows_contiguous
from .layout import ColumnLayout
from .normalize import row_norms
from .tiles import (
    groups_overlap, load_groups, load_params, load_projections, load_scales, load_targets, logit_grad_tile,
    logit_tile, similarity_tile,
)
from .utils import accumulator_dtype, dot_precision, upcast_for_interpreter

#: Default cap on the workspace (bytes); FASTCL_WORKSPACE_BYTES overrides it.
DEFAULT_WORKSPACE_BYTES = 1 << 30


@triton.jit
def _infonce_dlogits_kernel(
    q_ptr,
    k_ptr,
    params_ptr,
    targets_ptr,
    row_groups_ptr,
    key_groups_ptr,
    q_norm_ptr,  # L2 norms of the rows of q and k (NORMALIZED only)
    k_norm_ptr,
    lse_ptr,
    grad_rows_ptr,
    ds_ptr,
    row_dot_ptr,
    col_dot_ptr,  # NORMALIZED only
    row0,
    n_chunk_rows,
    n_rows,
    n_cols,
    n_grad_cols,
    dim,
    stride_q,
    stride_k,
    stride_ds,
    hard_start,
    n_hard,
    gauss_start,
    self_start,
    n_self,
    eps,  # the normalization's lower bound on a norm (NORMALIZED only)
    HAS_TARGETS: tl.constexpr,
    HARD_WEIGHTED: tl.constexpr,
    GAUSS_WEIGHTED: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    GROUPED: tl.constexpr,
    NORMALIZED: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the chunk
    rows = row0 + local                                          # row of the whole batch
    row_in = local < n_chunk_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < n_cols
    out_ptrs = ds_ptr + local[:, None] * stride_ds + cols[None, :]
    out_mask = row_in[:, None] & col_in[None, :]

    row_groups = load_groups(row_groups_ptr, rows, n_rows, GROUPED)
    col_groups = load_groups(key_groups_ptr, cols, n_grad_cols, GROUPED)
    if GROUPED:
        visit = groups_overlap(row_groups, row_in, col_groups, cols < n_grad_cols,
                               tl.program_id(1) * BLOCK_N + BLOCK_N > n_grad_cols, GROUPED)
    else:
        visit = True
    if visit:
        inv_tau, log_hard_weight, log_gauss_weight = load_params(params_ptr)
        lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
        grad_rows = tl.load(grad_rows_ptr + rows, mask=row_in, other=0.0).to(acc_dtype)
        targets = load_targets(targets_ptr, rows, row_in, HAS_TARGETS)
        s = similarity_tile(q_ptr, k_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                            BLOCK_M, BLOCK_N, BLOCK_D, acc_dtype, PRECISION, UPCAST)
        if NORMALIZED:
            row_scale = load_scales(q_norm_ptr, rows, n_rows, eps, NORMALIZED)
            col_scale = load_scales(k_norm_ptr, cols, n_cols, eps, NORMALIZED)
            s = s * row_scale[:, None] * col_scale[None, :]
        logits = logit_tile(s, inv_tau, log_hard_weight, log_gauss_weight, rows, cols, row_groups,
                            col_groups, n_cols, n_grad_cols, hard_start, n_hard, gauss_start, self_start,
                            n_self, HARD_WEIGHTED, GAUSS_WEIGHTED, EXCLUDE_SELF, GROUPED)
        dlogits = logit_grad_tile(logits, lse, grad_rows, targets, cols)
        tl.atomic_add(row_dot_ptr + rows, tl.sum(dlogits * s, 1), mask=row_in)
        ds = dlogits * inv_tau
        if NORMALIZED:
            tl.atomic_add(col_dot_ptr + cols, tl.sum(dlogits * s, 0), mask=cols < n_grad_cols)
            ds = ds * row_scale[:, None] * col_scale[None, :]
        tl.store(out_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=out_mask)
    else:
        # A tile with no common group has zero gradient; the workspace is reused, so say so.
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=ds_ptr.dtype.element_ty), mask=out_mask)


#: Launch shape of _project_rows_kernel: 8 x 128 tiles on 4 warps take 40 registers on
#: sm_90a (32 x 128 took all 255), so many blocks share an SM in this bandwidth-bound pass
#: (tests/test_sm90_compile.py keeps it that way).
PROJECT_ROWS_BLOCKS = dict(BLOCK_R=8, BLOCK_D=128, num_warps=4)


@triton.jit
def _project_rows_kernel(
    grad_ptr,
    x_ptr,
    dot_ptr,
    norm_ptr,
    params_ptr,
    n_rows,
    dim,
    stride_grad,
    stride_x,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_i -= (1/tau) dot_i proj_i x_i, in place: F.normalize's rank-1 term for each
    row of a gradient (dq with row_dot, dk with col_dot), computed in fp32 or fp64."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_rows
    inv_tau = tl.load(params_ptr)
    coef = inv_tau * tl.load(dot_ptr + rows, mask=row_in, other=0.0) * load_projections(norm_ptr, rows, n_rows, eps)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = row_in[:, None] & (dd[None, :] < dim)
        grad_ptrs = grad_ptr + rows[:, None] * stride_grad + dd[None, :]
        grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(coef.dtype)
        x = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(coef.dtype)
        tl.store(grad_ptrs, (grad - coef[:, None] * x).to(grad_ptr.dtype.element_ty), mask=mask)


def _project_rows(grad, x, dot, norm, params, eps) -> None:
    """Launch :func:`_project_rows_kernel` over the rows of ``grad`` (``x`` has at least as many)."""
    n_rows, dim = grad.shape
    _project_rows_kernel[(triton.cdiv(n_rows, PROJECT_ROWS_BLOCKS["BLOCK_R"]),)](
        grad, x, dot, norm, params, n_rows, dim, grad.stride(0), x.stride(0), eps, **PROJECT_ROWS_BLOCKS)


def workspace_rows(n_rows: int, n_cols: int, element_size: int) -> int:
    """Rows per chunk so that a chunk's R x M workspace fits in the cap."""
    cap = int(os.environ.get("FASTCL_WORKSPACE_BYTES", DEFAULT_WORKSPACE_BYTES))
    return max(1, min(n_rows, cap // max(n_cols * element_size, 1)))


def infonce_backward_workspace(
    q: torch.Tensor,
    k: torch.Tensor,
    params: torch.Tensor,
    targets: torch.Tensor | None,
    layout: ColumnLayout,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    need_dq: bool = True,
    need_dk: bool = True,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    normalize_eps: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as :func:`fastcl.ops.infonce_bwd.infonce_backward`."""
    n_rows, dim = q.shape
    _check_rows_contiguous(q, k)
    acc = accumulator_dtype(q.dtype)
    grad_rows = grad_rows.contiguous()
    # The workspace holds dS in the input dtype for the products (fp32 for fp32, fp64 for
    # fp64); half-precision products accumulate in fp32 inside cuBLAS.
    chunk = workspace_rows(n_rows, layout.n_cols, q.element_size())
    workspace = torch.empty((chunk, layout.n_cols), dtype=q.dtype, device=q.device)
    row_dot = torch.zeros(n_rows, dtype=acc, device=q.device)
    dq = torch.empty_like(q) if need_dq else None
    want_dk = need_dk and layout.n_grad_cols > 0
    n_grad = layout.n_grad_cols
    # dk straight from the products when they accumulate in the output's own precision:
    # fp32 / fp64 inputs, or a single chunk (one GEMM, fp32 inside cuBLAS, one rounding).
    # Only 16-bit inputs over several chunks need an fp32 accumulator between products.
    direct_dk = want_dk and (q.dtype == acc or chunk >= n_rows)
    dk = torch.empty((n_grad, dim), dtype=q.dtype, device=q.device) if direct_dk else None
    dk_acc = torch.zeros((n_grad, dim), dtype=acc, device=q.device) if want_dk and not direct_dk else None

    cfg = kernel_config("backward_ds", q.dtype, dim, q.device)
    row_groups, key_groups = groups if groups is not None else (lse, lse)
    normalized = normalize_eps is not None
    q_norm, k_norm = (row_norms(q), row_norms(k)) if normalized else (lse, lse)
    # The kernel adds column sums whenever it normalizes (they are only read for dk).
    col_dot = torch.zeros(layout.n_grad_cols if normalized else 0, dtype=acc, device=q.device)
    flags = dict(
        HAS_TARGETS=targets is not None, HARD_WEIGHTED=layout.hard_weighted, GAUSS_WEIGHTED=layout.gauss_weighted,
        EXCLUDE_SELF=layout.n_self > 0, GROUPED=groups is not None, NORMALIZED=normalized,
        ACC_FP64=acc == torch.float64,
        PRECISION=dot_precision(q.dtype), UPCAST=upcast_for_interpreter(q.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    for row0 in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - row0)
        ds = workspace[:rows]
        grid = (triton.cdiv(rows, cfg.BLOCK_M), triton.cdiv(layout.n_cols, cfg.BLOCK_N))
        _infonce_dlogits_kernel[grid](
            q, k, params, targets if targets is not None else lse, row_groups, key_groups, q_norm, k_norm,
            lse, grad_rows, ds, row_dot, col_dot if normalized else lse, row0, rows, n_rows, layout.n_cols,
            layout.n_grad_cols, dim, q.stride(0), k.stride(0), ds.stride(0),
            layout.hard_start, layout.n_hard, layout.gauss_start, layout.self_start, layout.n_self,
            normalize_eps if normalized else 0.0, **flags,
        )
        q_chunk = q[row0:row0 + rows]
        if need_dq:
            torch.mm(ds, k, out=dq[row0:row0 + rows])
        if direct_dk:
            if row0 == 0:
                torch.mm(ds[:, :n_grad].T, q_chunk, out=dk)
            else:
                dk.addmm_(ds[:, :n_grad].T, q_chunk)
        elif want_dk:
            dk_acc += (ds[:, :n_grad].T @ q_chunk).to(acc)
    if normalized:  # the normalization's rank-1 terms, in place, one launch per gradient
        if need_dq:
            _project_rows(dq, q, row_dot, q_norm, params, normalize_eps)
        if want_dk:
            _project_rows(dk if direct_dk else dk_acc, k, col_dot, k_norm, params, normalize_eps)
    if want_dk and not direct_dk:
        dk = dk_acc.to(q.dtype)
    return dq, dk, (row_dot if need_dq else None)
