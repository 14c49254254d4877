"""Workspace backward: logit gradients of a chunk of rows in a bounded buffer, then GEMMs.

The slab backward (infonce_bwd_slab.py) recomputes every similarity tile once per D slab of
each gradient, so at D = 768 with 256-wide slabs it does the 2NMD similarity product
six times. This backward forms it once. For each chunk of R rows:

1. one Triton kernel recomputes S = q_R k^T tile by tile and writes, per tile, the
   logit-gradient operand ``E ~ g_i r_i (softmax - [j == t_i]) c_j`` into an R x M
   workspace in the input dtype (the elementwise work fused into the product's
   epilogue, never a separate pass), and adds ``sum_j G_ij s_ij`` into the temperature's
   row sums;
2. ``dq_R = E @ k`` and ``dk += E[:, :n_grad]^T q_R`` are two plain matrix products
   (cuBLAS on the GPU), with results in fp32 for 16-bit inputs;
3. a small kernel multiplies each result by what E leaves out (1/tau and the maxima
   that normalize E's factors, see infonce_bwd_slab.py "Precision"), subtracts the
   normalization's rank-1 term of each row (fastcl/ops/normalize.py, with the column
   sums ``sum_i G_ij cos_ij`` the first kernel also adds) and rounds once.

float16's exponent range cannot hold the per-row and the per-column factor in one
operand when row norms spread widely, so for float16 the first kernel writes a second
operand (n_grad wide) for dk: dq's keeps only c_j, dk's only g_i r_i, and the other
factor multiplies the result row by row.

That is 6NMD of backward work (2 for S, 2 for dq, 2 for dk) instead of the slab path's
~2NMD x (slabs + 1) per gradient, at the price of writing the workspace once (float16:
twice) and reading it twice. Its size is capped (``FASTCL_WORKSPACE_BYTES``, default
1 GiB): R = cap / (M x element size), so memory stays O((N + M) D + cap), never N x M.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .launch import backward_operand_scales, block_options, extra_rules, tile_inputs
from .layout import ColumnLayout, GuideMask
from .tiles import (
    GRAD_OPERAND_SCALE, column_tile, load_family, load_groups, load_params, load_projections, load_row_gradients,
    load_scales, load_targets, matmul_operand, similarity_tile, softmax_minus_target, tile_logits,
)
from .utils import accumulator_dtype

#: Default cap on the workspace (bytes); FASTCL_WORKSPACE_BYTES overrides it.
DEFAULT_WORKSPACE_BYTES = 1 << 30


@triton.jit
def _infonce_dlogits_kernel(
    ins,  # launch.TileInputs: q, k and what every tile reads with them
    seg,  # launch.Segments: the layout's column segments
    operand_scales_ptr,  # [max_j c_j, max_i |g_i r_i|] (launch.backward_operand_scales)
    lse_ptr,
    grad_rows_ptr,
    ds_ptr,
    ds2_ptr,  # SPLIT and WRITE_DS2 only: the dk operand, n_grad_cols wide
    row_dot_ptr,
    col_dot_ptr,  # NORMALIZED only
    row0,
    n_chunk_rows,
    stride_ds,
    stride_ds2,
    SW: tl.constexpr,  # the launch's switches (launch.Switches)
    SPLIT: tl.constexpr,
    WRITE_DS2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if SW.ACC_FP64 else tl.float32
    eps = tl.load(ins.scalars)  # from memory: a float argument would be rounded to fp32
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the chunk
    rows = row0 + local                                          # row of the whole batch
    row_in = local < n_chunk_rows
    row_groups = load_groups(ins.row_groups, rows, ins.n_rows, SW.GROUPED)
    cols, col_groups, visit = column_tile(ins.key_groups, tl.program_id(1) * BLOCK_N, row_groups, row_in,
                                          seg.n_grad_cols, BLOCK_N, SW.GROUPED)
    col_in = cols < seg.n_cols
    out_ptrs = ds_ptr + local[:, None] * stride_ds + cols[None, :]
    out_mask = row_in[:, None] & col_in[None, :]
    out2_ptrs = ds2_ptr + local[:, None] * stride_ds2 + cols[None, :]
    out2_mask = row_in[:, None] & (cols < seg.n_grad_cols)[None, :]

    if visit:
        params = load_params(ins.params)
        lse, grad_rows = load_row_gradients(lse_ptr, grad_rows_ptr, rows, row_in, acc_dtype, SW)
        targets = load_targets(ins.targets, rows, row_in, SW.HAS_TARGETS)
        strength, thresholds = load_family(ins, eps, rows, row_in, SW)
        s = similarity_tile(ins, rows, cols, ins.n_rows, seg.n_cols, BLOCK_M, BLOCK_N, BLOCK_D, acc_dtype, SW)
        row_scale = load_scales(ins.q_norm, rows, ins.n_rows, eps, SW.NORMALIZED)
        col_scale = load_scales(ins.k_norm, cols, seg.n_cols, eps, SW.NORMALIZED)
        s, logits = tile_logits(s, row_scale, col_scale, ins, params, rows, cols, targets, thresholds,
                                row_groups, col_groups, seg, strength, SW, BLOCK_D)
        p_minus = softmax_minus_target(logits, lse, targets, cols)
        dlogits = grad_rows[:, None] * p_minus
        tl.atomic_add(row_dot_ptr + rows, tl.sum(dlogits * s, 1), mask=row_in)
        # The operands hold P - onehot times the factors that cannot leave the products'
        # sums, each normalized by its maximum; 1/tau and the rest multiply the fp32
        # products afterwards (infonce_bwd_slab.py, "Precision"). One operand serves both
        # products when it can hold both factors (bf16, fp32, fp64: fp32's exponent
        # range); float16's range cannot hold the product of both spreads, so with SPLIT
        # the dq operand keeps c_j only and a second one, for dk, keeps g_i r_i only.
        col_scale_max = tl.load(operand_scales_ptr)
        row_weight_max = tl.load(operand_scales_ptr + 1)
        if SW.NORMALIZED:
            tl.atomic_add(col_dot_ptr + cols, tl.sum(dlogits * s, 0), mask=cols < seg.n_grad_cols)
            row_factor = grad_rows * row_scale * (GRAD_OPERAND_SCALE / row_weight_max)
            col_factor = col_scale / col_scale_max
        else:
            row_factor = grad_rows * (GRAD_OPERAND_SCALE / row_weight_max)
            col_factor = tl.full((BLOCK_N,), 1.0, dtype=acc_dtype)
        if SPLIT:
            ds = p_minus * (col_factor * GRAD_OPERAND_SCALE)[None, :]
            if WRITE_DS2:
                ds2 = p_minus * row_factor[:, None]
                tl.store(out2_ptrs, matmul_operand(ds2, ds2_ptr.dtype.element_ty, SW.UPCAST).to(
                    ds2_ptr.dtype.element_ty), mask=out2_mask)
        else:
            ds = p_minus * row_factor[:, None] * col_factor[None, :]
        tl.store(out_ptrs, matmul_operand(ds, ds_ptr.dtype.element_ty, SW.UPCAST).to(ds_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        # A tile with no common group has zero gradient; the workspace is reused, so say so.
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=ds_ptr.dtype.element_ty), mask=out_mask)
        if WRITE_DS2:
            tl.store(out2_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=ds2_ptr.dtype.element_ty), mask=out2_mask)


#: Launch shape of _project_rows_kernel: 8 x 128 tiles on 8 warps (4 values a thread) take
#: at most 66 registers on sm_90a in every dtype (on 4 warps, since it reads the products'
#: fp32 results and writes a separate output, 80-96), so many blocks share an SM in this
#: bandwidth-bound pass (tests/test_sm90_compile.py keeps it that way).
PROJECT_ROWS_BLOCKS = dict(BLOCK_R=8, BLOCK_D=128, num_warps=8)


@triton.jit
def _project_rows_kernel(
    out_ptr,
    grad_ptr,
    x_ptr,
    dot_ptr,
    norm_ptr,
    params_ptr,
    factor_ptr,
    row_factor_ptr,
    n_rows,
    dim,
    stride_out,
    stride_grad,
    stride_x,
    eps_ptr,
    NORMALIZED: tl.constexpr,
    ROW_FACTORS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out_i = factor f_i grad_i - (1/tau) dot_i proj_i x_i (``out`` may be ``grad``): the
    products' fp32 (or fp64) result times the factors kept out of their operand (one
    scalar, and per row f_i when ROW_FACTORS), minus F.normalize's rank-1 term of each
    row (NORMALIZED: dq with row_dot, dk with col_dot), rounded once to the output dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_rows
    factor = tl.load(factor_ptr) + tl.zeros((BLOCK_R,), dtype=factor_ptr.dtype.element_ty)
    if ROW_FACTORS:
        factor = factor * tl.load(row_factor_ptr + rows, mask=row_in, other=0.0)
    if NORMALIZED:
        inv_tau = tl.load(params_ptr)
        coef = inv_tau * tl.load(dot_ptr + rows, mask=row_in, other=0.0) * load_projections(
            norm_ptr, rows, n_rows, tl.load(eps_ptr))
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = row_in[:, None] & (dd[None, :] < dim)
        grad = tl.load(grad_ptr + rows[:, None] * stride_grad + dd[None, :], mask=mask, other=0.0).to(factor.dtype)
        result = factor[:, None] * grad
        if NORMALIZED:
            x = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(factor.dtype)
            result -= coef[:, None] * x
        tl.store(out_ptr + rows[:, None] * stride_out + dd[None, :], result.to(out_ptr.dtype.element_ty), mask=mask)


def _project_rows(out, grad, x, dot, norm, params, factor, eps, row_factors=None) -> None:
    """Launch :func:`_project_rows_kernel` over the rows of ``grad`` (``x`` has at least as
    many); ``dot`` None: no normalization term; ``row_factors`` None: none."""
    n_rows, dim = grad.shape
    normalized = dot is not None
    _project_rows_kernel[(triton.cdiv(n_rows, PROJECT_ROWS_BLOCKS["BLOCK_R"]),)](
        out, grad, x, dot if normalized else factor, norm if normalized else factor, params, factor,
        row_factors if row_factors is not None else factor, n_rows, dim, out.stride(0), grad.stride(0), x.stride(0),
        eps, NORMALIZED=normalized, ROW_FACTORS=row_factors is not None,
        **PROJECT_ROWS_BLOCKS)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with the result in the accumulator dtype: fp32 for 16-bit operands (their
    product is 2^15 times the gradient's scale, so it must not be rounded to 16 bits),
    from cuBLAS's fp32 accumulator where torch offers ``out_dtype``; else, and on the
    CPU, from operands upcast to fp32 (exact: 16-bit values are exact in fp32, and in
    tf32)."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


#: torch.mm(..., out_dtype=torch.float32) for 16-bit CUDA operands (torch >= 2.8).
_MM_OUT_DTYPE = torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")


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
    thresholds: torch.Tensor | None = None,
    guide: GuideMask | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as :func:`fastcl.ops.infonce_bwd_slab.infonce_backward_slab`."""
    n_rows, dim = q.shape
    ins, segments, switches = tile_inputs(q, k, params, targets, layout, groups, normalize_eps, thresholds, guide)
    acc = accumulator_dtype(q.dtype)
    grad_rows = grad_rows.contiguous()
    # The workspace holds the logit-gradient operand in the input dtype (fp32 for fp32,
    # fp64 for fp64); the products' results stay in the accumulator dtype until the last
    # step scales them and rounds once.
    want_dk = need_dk and layout.n_grad_cols > 0
    n_grad = layout.n_grad_cols
    # float16: one operand per product (see the kernel); the second is n_grad wide.
    split = q.dtype == torch.float16
    write_ds2 = split and want_dk
    chunk = workspace_rows(n_rows, layout.n_cols + (n_grad if write_ds2 else 0), q.element_size())
    workspace = torch.empty((chunk, layout.n_cols), dtype=q.dtype, device=q.device)
    workspace2 = torch.empty((chunk, n_grad), dtype=q.dtype, device=q.device) if write_ds2 else workspace
    row_dot = torch.zeros(n_rows, dtype=acc, device=q.device)
    dq = torch.empty_like(q) if need_dq else None
    # dk accumulates straight into the output for fp32 / fp64 inputs; 16-bit inputs need
    # an fp32 accumulator (the scaled products would not fit, or not keep precision, in
    # 16 bits).
    direct_dk = want_dk and q.dtype == acc
    dk = torch.empty((n_grad, dim), dtype=q.dtype, device=q.device) if direct_dk else None
    dk_acc = torch.zeros((n_grad, dim), dtype=acc, device=q.device) if want_dk and not direct_dk else None

    cfg = kernel_config("backward_ds", q.dtype, dim, q.device, rules=extra_rules(switches))
    normalized = normalize_eps is not None
    eps_arg, q_norm, k_norm = ins.scalars, ins.q_norm, ins.k_norm
    operand_scales = backward_operand_scales(q_norm, k_norm, grad_rows, normalize_eps, acc)
    # What the products' results are multiplied by: (1/tau) max(c) max|g r| / 2^15 when
    # one operand holds both factors; when split, dq's result by (1/tau) max(c) / 2^15
    # and g_i r_i per row, dk's by (1/tau) max|g r| / 2^15 and c_j per column.
    col_max, row_max = operand_scales[0], operand_scales[1]
    inv_tau = params[0]
    if split:
        dq_factor = (inv_tau * col_max / GRAD_OPERAND_SCALE.value).reshape(1)
        dk_factor = (inv_tau * row_max / GRAD_OPERAND_SCALE.value).reshape(1)
        g = grad_rows.to(acc)
        dq_row_factors = g / q_norm.clamp_min(normalize_eps) if normalized else g
        dk_row_factors = 1.0 / k_norm[:n_grad].clamp_min(normalize_eps) if normalized else None
    else:
        dq_factor = dk_factor = (inv_tau * col_max * row_max / GRAD_OPERAND_SCALE.value).reshape(1)
        dq_row_factors = dk_row_factors = None
    # The kernel adds column sums whenever it normalizes (they are only read for dk).
    col_dot = torch.zeros(layout.n_grad_cols if normalized else 0, dtype=acc, device=q.device)
    for row0 in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - row0)
        ds = workspace[:rows]
        ds2 = workspace2[:rows]
        grid = (triton.cdiv(rows, cfg.BLOCK_M), triton.cdiv(layout.n_cols, cfg.BLOCK_N))
        _infonce_dlogits_kernel[grid](
            ins, segments, operand_scales, lse, grad_rows, ds, ds2, row_dot, col_dot if normalized else lse, row0,
            rows, ds.stride(0), ds2.stride(0), SW=switches, SPLIT=split, WRITE_DS2=write_ds2, **block_options(cfg),
        )
        q_chunk = q[row0:row0 + rows]
        if need_dq:
            # This chunk's rows are complete (row_dot included): scale, project, round.
            dq_chunk = dq[row0:row0 + rows]
            if q.dtype == acc:
                torch.mm(ds, k, out=dq_chunk)
                product = dq_chunk
            else:
                product = _mm_fp32(ds, k)
            _project_rows(dq_chunk, product, q_chunk, row_dot[row0:] if normalized else None, q_norm[row0:],
                          params, dq_factor, eps_arg,
                          dq_row_factors[row0:] if dq_row_factors is not None else None)
            del product
        if direct_dk:
            if row0 == 0:
                torch.mm(ds[:, :n_grad].T, q_chunk, out=dk)
            else:
                dk.addmm_(ds[:, :n_grad].T, q_chunk)
        elif want_dk:
            dk_acc += _mm_fp32((ds2 if split else ds[:, :n_grad]).T, q_chunk)
    if want_dk:  # scale, the normalization's rank-1 terms, one rounding
        if not direct_dk:
            dk = torch.empty((n_grad, dim), dtype=q.dtype, device=q.device)
        _project_rows(dk, dk if direct_dk else dk_acc, k, col_dot if normalized else None, k_norm, params, dk_factor,
                      eps_arg, dk_row_factors)
    return dq, dk, (row_dot if need_dq else None)
