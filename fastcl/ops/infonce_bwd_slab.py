"""Slab backward: gradients of the per-row losses with respect to queries and keys.

With P the row softmax, g_i the incoming gradient of loss_i and t_i the target column,
the gradient of loss_i with respect to logit[i, j] is ``G[i, j] = g_i (P[i, j] - [j ==
t_i])`` and, since ``logit = s / tau + w``,

    dq_i = 1/tau * sum_j G[i, j] k_j          dk_j = 1/tau * sum_i G[i, j] q_i

Two kernels form them without storing anything N x M: one program per (row block, D
slab) walks all candidate tiles and accumulates its slab of dq; one program per
(column block, D slab) walks all query tiles and accumulates its slab of dk. Each
recomputes its similarity tiles from q and k and its softmax from the saved row
log-sum-exp. D is split into slabs so that a program's accumulator (rows x slab, fp32)
fits in registers at any D; the price is recomputing the similarity tile once per slab.

The dq kernel also returns ``sum_j G[i, j] s[i, j]`` per row: the gradient of the loss
with respect to 1/tau is the sum of it, which is how a learnable temperature gets its
gradient without another pass.

With NORMALIZED the rows are raw: tiles are scaled to cosines by the rows' inverse
norms r_i and c_j, and each program ends with the normalization's rank-1 correction of
its slab, from that same row sum (dq) or the matching column sum (dk); see
fastcl/ops/normalize.py.

Precision. With float16 / bfloat16 inputs the products take 16-bit operands (tensor
cores), so the logit-gradient operand must hold its values without underflow or
overflow: 1/tau, g_i (1/N under a mean) and the inverse norms, folded in, push it far
below float16's smallest normal number at row norms of a few thousand, and above its
largest at norms near 1e-3. So the operand is only ``P - onehot`` (in [-1, 1]) times
the one factor that cannot leave the sum, normalized by its maximum and times 2^15
(GRAD_OPERAND_SCALE): in dq's sum over columns, c_j / max c; in dk's sum over rows,
g_i r_i / max |g r|. Everything else multiplies the fp32 accumulator once, at the end:

    dq_i = [(1/tau) g_i r_i max(c) / 2^15] * sum_j (2^15 (P - onehot)_ij c_j / max c) k_j
    dk_j = [(1/tau) c_j max|g r| / 2^15] * sum_i (2^15 (P - onehot)_ij g_i r_i / max|g r|) q_i

The only rounding left is the operand's own (relative 2^-11 in float16, 2^-8 in
bfloat16), so the gradients are within a few units of roundoff of the input dtype
(tests/test_adversarial.py states and checks the bound). In float16 an operand entry
below 2^-29 of the largest (a softmax entry under 1e-2 of a column whose norm is 1e7
times the smallest column norm of the batch, say) is subnormal and keeps fewer bits;
such entries weigh little in the sums, and norms spread over seven decades in one batch
stay within the bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .group_ranges import column_block_row_ranges, row_block_tile_ranges
from .launch import backward_operand_scales, block_options, extra_rules, tile_inputs
from .layout import ColumnLayout, GuideMask
from .tiles import (
    GRAD_OPERAND_SCALE, column_interval, column_tile, groups_overlap, load_family, load_groups, load_params,
    load_projections, load_row_gradients, load_scales, load_targets, matmul_operand, row_block, similarity_tile,
    softmax_minus_target, tf32_operand, tile_logits,
)
from .utils import accumulator_dtype


@triton.jit
def _infonce_bwd_dq_kernel(
    ins,  # launch.TileInputs: q, k and what every tile reads with them
    seg,  # launch.Segments: the layout's column segments
    tile_ranges_ptr,  # GROUPED only: per row block, 3 intervals of column tiles to visit
    operand_scales_ptr,  # [max_j c_j, max_i |g_i r_i|]: see backward_operand_scales
    lse_ptr,
    grad_rows_ptr,
    dq_ptr,
    row_dot_ptr,
    stride_dq,
    SW: tl.constexpr,  # the launch's switches (launch.Switches)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if SW.ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slab = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    row_in = rows < ins.n_rows
    slab_in = slab < ins.dim
    eps, params, targets, strength, thresholds, row_groups, row_scale = row_block(ins, rows, row_in, SW)
    inv_tau = params[0]
    lse, grad_rows = load_row_gradients(lse_ptr, grad_rows_ptr, rows, row_in, acc_dtype, SW)
    col_scale_max = tl.load(operand_scales_ptr)

    dq = tl.zeros((BLOCK_M, BLOCK_D_OUT), dtype=acc_dtype)
    row_dot = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    # Column tiles: with groups, only the (at most 3) intervals that can hold a candidate
    # of these rows (group_ranges.py); otherwise all of them.
    for interval in tl.static_range(3 if SW.GROUPED else 1):
        n_first, n_end = column_interval(tile_ranges_ptr, interval, seg.n_cols, BLOCK_N, SW.GROUPED)
        for n0 in range(n_first, n_end, BLOCK_N):
            cols, col_groups, visit = column_tile(ins.key_groups, n0, row_groups, row_in, seg.n_grad_cols, BLOCK_N,
                                                  SW.GROUPED)
            if visit:
                s = similarity_tile(ins, rows, cols, ins.n_rows, seg.n_cols, BLOCK_M, BLOCK_N, BLOCK_D, acc_dtype, SW)
                col_scale = load_scales(ins.k_norm, cols, seg.n_cols, eps, SW.NORMALIZED)
                s, logits = tile_logits(s, row_scale, col_scale, ins, params, rows, cols, targets, thresholds,
                                        row_groups, col_groups, seg, strength, SW, BLOCK_D)
                p_minus = softmax_minus_target(logits, lse, targets, cols)
                row_dot += tl.sum(p_minus * s, 1)
                k_slab = tl.load(ins.k + cols[:, None] * ins.stride_k + slab[None, :],
                                 mask=(cols[:, None] < seg.n_cols) & slab_in[None, :], other=0.0)
                # The operand keeps only the per-column factor c_j / max c (in (0, 1]);
                # 1/tau, g_i and r_i multiply the fp32 accumulator after the loop.
                if SW.NORMALIZED:
                    ds = p_minus * (col_scale * (GRAD_OPERAND_SCALE / col_scale_max))[None, :]
                else:
                    ds = p_minus * GRAD_OPERAND_SCALE
                if SW.UPCAST:
                    k_slab = k_slab.to(tl.float32)
                dq = tl.dot(tf32_operand(matmul_operand(ds, k_slab.dtype, SW.UPCAST), SW),
                            tf32_operand(k_slab, SW), dq, input_precision=SW.PRECISION, out_dtype=acc_dtype)

    # Per-row factors, in the accumulator dtype: dq_i = (1/tau) g_i r_i sum_j G'_ij c_j k_j.
    row_factor = inv_tau * grad_rows / GRAD_OPERAND_SCALE
    if SW.NORMALIZED:
        row_factor = row_factor * row_scale * col_scale_max
    dq = dq * row_factor[:, None]
    row_dot = row_dot * grad_rows
    if SW.NORMALIZED:  # dq_i -= (1/tau) row_dot_i proj_i q_i, on this slab
        proj = load_projections(ins.q_norm, rows, ins.n_rows, eps)
        q_slab = tl.load(ins.q + rows[:, None] * ins.stride_q + slab[None, :],
                         mask=row_in[:, None] & slab_in[None, :], other=0.0).to(acc_dtype)
        dq -= (inv_tau * row_dot * proj)[:, None] * q_slab
    tl.store(dq_ptr + rows[:, None] * stride_dq + slab[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=row_in[:, None] & slab_in[None, :])
    if tl.program_id(1) == 0:
        tl.store(row_dot_ptr + rows, row_dot, mask=row_in)


@triton.jit
def _infonce_bwd_dk_kernel(
    ins,  # launch.TileInputs: q, k and what every tile reads with them
    seg,  # launch.Segments: the layout's column segments
    row_ranges_ptr,  # GROUPED only: per column block, the interval of row tiles to visit
    operand_scales_ptr,  # [max_j c_j, max_i |g_i r_i|]: see backward_operand_scales
    lse_ptr,
    grad_rows_ptr,
    dk_ptr,
    stride_dk,
    SW: tl.constexpr,  # the launch's switches (launch.Switches)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if SW.ACC_FP64 else tl.float32
    eps = tl.load(ins.scalars)  # from memory: a float argument would be rounded to fp32
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slab = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    slab_in = slab < ins.dim
    params = load_params(ins.params)
    inv_tau = params[0]
    # Every column here is a gradient column (< n_grad_cols), so it has a group.
    col_groups = load_groups(ins.key_groups, cols, seg.n_grad_cols, SW.GROUPED)
    col_scale = load_scales(ins.k_norm, cols, seg.n_cols, eps, SW.NORMALIZED)
    row_weight_max = tl.load(operand_scales_ptr + 1)

    dk = tl.zeros((BLOCK_N, BLOCK_D_OUT), dtype=acc_dtype)
    col_dot = tl.zeros((BLOCK_N,), dtype=acc_dtype)  # NORMALIZED: sum_i G_ij cos_ij
    if SW.GROUPED:  # only the row tiles whose groups can meet these columns (group_ranges.py)
        m_first = tl.load(row_ranges_ptr + tl.program_id(0) * 2) * BLOCK_M
        m_end = tl.load(row_ranges_ptr + tl.program_id(0) * 2 + 1) * BLOCK_M
    else:
        m_first = 0
        m_end = ins.n_rows
    for m0 in range(m_first, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in = rows < ins.n_rows
        row_groups = load_groups(ins.row_groups, rows, ins.n_rows, SW.GROUPED)
        if groups_overlap(row_groups, row_in, col_groups, cols < seg.n_grad_cols, False, SW.GROUPED):
            lse, grad_rows = load_row_gradients(lse_ptr, grad_rows_ptr, rows, row_in, acc_dtype, SW)
            targets = load_targets(ins.targets, rows, row_in, SW.HAS_TARGETS)
            strength, thresholds = load_family(ins, eps, rows, row_in, SW)
            # The softmax runs over all n_cols columns; only the first n_grad_cols are
            # stored, and this program's columns are among them.
            s = similarity_tile(ins, rows, cols, ins.n_rows, seg.n_cols, BLOCK_M, BLOCK_N, BLOCK_D, acc_dtype, SW)
            row_scale = load_scales(ins.q_norm, rows, ins.n_rows, eps, SW.NORMALIZED)
            s, logits = tile_logits(s, row_scale, col_scale, ins, params, rows, cols, targets, thresholds,
                                    row_groups, col_groups, seg, strength, SW, BLOCK_D)
            p_minus = softmax_minus_target(logits, lse, targets, cols)
            q_slab = tl.load(ins.q + rows[:, None] * ins.stride_q + slab[None, :],
                             mask=row_in[:, None] & slab_in[None, :], other=0.0)
            # The operand keeps only the per-row factor g_i r_i / max |g r| (in [-1, 1]);
            # 1/tau and c_j multiply the fp32 accumulator after the loop.
            if SW.NORMALIZED:
                row_weight = grad_rows * row_scale
                col_dot += tl.sum(p_minus * s * grad_rows[:, None], 0)
            else:
                row_weight = grad_rows
            ds = p_minus * (row_weight * (GRAD_OPERAND_SCALE / row_weight_max))[:, None]
            if SW.UPCAST:
                q_slab = q_slab.to(tl.float32)
            dk = tl.dot(tl.trans(tf32_operand(matmul_operand(ds, q_slab.dtype, SW.UPCAST), SW)),
                        tf32_operand(q_slab, SW), dk, input_precision=SW.PRECISION, out_dtype=acc_dtype)

    # Per-column factors, in the accumulator dtype: dk_j = (1/tau) c_j sum_i G'_ij g_i r_i q_i.
    col_factor = inv_tau * row_weight_max / GRAD_OPERAND_SCALE + tl.zeros((BLOCK_N,), dtype=acc_dtype)
    if SW.NORMALIZED:
        col_factor = col_factor * col_scale
    dk = dk * col_factor[:, None]
    if SW.NORMALIZED:  # dk_j -= (1/tau) col_dot_j proj_j k_j, on this slab
        proj = load_projections(ins.k_norm, cols, seg.n_grad_cols, eps)
        k_slab = tl.load(ins.k + cols[:, None] * ins.stride_k + slab[None, :],
                         mask=(cols[:, None] < seg.n_grad_cols) & slab_in[None, :], other=0.0).to(acc_dtype)
        dk -= (inv_tau * col_dot * proj)[:, None] * k_slab
    tl.store(dk_ptr + cols[:, None] * stride_dk + slab[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=(cols[:, None] < seg.n_grad_cols) & slab_in[None, :])


def infonce_backward_slab(
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
    """Launch the slab backward kernels.

    Arguments as for :func:`~fastcl.ops.infonce_fwd.infonce_forward`, plus the forward's
    ``lse`` and the incoming per-row gradient ``grad_rows``. Returns ``(dq, dk,
    row_dot)``: dq is N x D (None unless ``need_dq``), dk is ``layout.n_grad_cols`` x D
    (None unless ``need_dk``), both in the input dtype; row_dot (accumulator dtype,
    length N, computed with dq) sums to the gradient of the loss with respect to 1/tau.
    With ``normalize_eps`` the gradients are with respect to the raw rows.
    """
    n_rows, dim = q.shape
    ins, segments, switches = tile_inputs(q, k, params, targets, layout, groups, normalize_eps, thresholds, guide)
    acc = accumulator_dtype(q.dtype)
    grad_rows = grad_rows.contiguous()
    operand_scales = backward_operand_scales(ins.q_norm, ins.k_norm, grad_rows, normalize_eps, acc)

    dq = row_dot = None
    if need_dq:
        dq = torch.empty_like(q)
        row_dot = torch.empty(n_rows, dtype=acc, device=q.device)
        cfg = kernel_config("backward_dq", q.dtype, dim, q.device, rules=extra_rules(switches))
        grid = (triton.cdiv(n_rows, cfg.BLOCK_M), triton.cdiv(dim, cfg.BLOCK_D_OUT))
        tile_ranges = row_block_tile_ranges(*groups, layout, cfg.BLOCK_M, cfg.BLOCK_N) if groups is not None else lse
        _infonce_bwd_dq_kernel[grid](ins, segments, tile_ranges, operand_scales, lse, grad_rows, dq, row_dot,
                                     dq.stride(0), SW=switches, **block_options(cfg, slab=True))
    dk = None
    if need_dk and layout.n_grad_cols > 0:
        dk = torch.empty((layout.n_grad_cols, dim), dtype=k.dtype, device=k.device)
        cfg = kernel_config("backward_dk", q.dtype, dim, q.device, rules=extra_rules(switches))
        grid = (triton.cdiv(layout.n_grad_cols, cfg.BLOCK_N), triton.cdiv(dim, cfg.BLOCK_D_OUT))
        row_ranges = column_block_row_ranges(*groups, layout, cfg.BLOCK_M, cfg.BLOCK_N) if groups is not None else lse
        _infonce_bwd_dk_kernel[grid](ins, segments, row_ranges, operand_scales, lse, grad_rows, dk, dk.stride(0),
                                     SW=switches, **block_options(cfg, slab=True))
    return dq, dk, row_dot
