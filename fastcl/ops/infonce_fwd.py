"""Forward kernel: per-row log-sum-exp and target logit, streaming over candidate tiles.

One program owns BLOCK_M query rows and walks every BLOCK_N-column tile of candidates,
forming the similarity tile in registers, folding it into an online log-sum-exp
(running max and rescaled sum, as FlashAttention does) and picking out the target
column's logit. Nothing of size N x M is ever written: the outputs are two vectors of
length N in the accumulator dtype, which is all the backward needs besides the inputs.
With NORMALIZED the rows are raw and each tile is scaled to cosines by the rows' inverse
norms (fastcl/ops/normalize.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .group_ranges import row_block_tile_ranges
from .launch import block_options, extra_rules, tile_inputs
from .layout import ColumnLayout, GuideMask
from .tiles import (
    column_interval, column_tile, load_scales, row_block,
    similarity_tile, tile_logits,
)
from .utils import accumulator_dtype


@triton.jit
def _infonce_fwd_kernel(
    ins,  # launch.TileInputs: q, k and what every tile reads with them
    seg,  # launch.Segments: the layout's column segments
    tile_ranges_ptr,  # GROUPED only: per row block, 3 intervals of column tiles to visit
    lse_ptr,
    target_logit_ptr,
    SW: tl.constexpr,  # the launch's switches (launch.Switches)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if SW.ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < ins.n_rows
    eps, params, targets, strength, thresholds, row_groups, row_scale = row_block(ins, rows, row_in, SW)

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
    row_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    target_logit = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    # Column tiles: with groups, only the (at most 3) intervals that can hold a candidate
    # of these rows (group_ranges.py); otherwise all of them.
    for interval in tl.static_range(3 if SW.GROUPED else 1):
        n_first, n_end = column_interval(tile_ranges_ptr, interval, seg.n_cols, BLOCK_N, SW.GROUPED)
        for n0 in range(n_first, n_end, BLOCK_N):
            cols, col_groups, visit = column_tile(ins.key_groups, n0, row_groups, row_in, seg.n_grad_cols, BLOCK_N,
                                                  SW.GROUPED)
            if visit:  # tiles whose rows and columns share no group hold no candidate
                s = similarity_tile(ins, rows, cols, ins.n_rows, seg.n_cols, BLOCK_M, BLOCK_N, BLOCK_D, acc_dtype, SW)
                col_scale = load_scales(ins.k_norm, cols, seg.n_cols, eps, SW.NORMALIZED)
                _, logits = tile_logits(s, row_scale, col_scale, ins, params, rows, cols, targets, thresholds,
                                        row_groups, col_groups, seg, strength, SW, BLOCK_D)
                new_max = tl.maximum(row_max, tl.max(logits, 1))
                # A row may have no candidate yet (all -inf so far, with masking): shift by 0
                # then, so that exp(-inf - -inf) never makes a NaN.
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
                row_max = new_max
                target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), 1)

    tl.store(lse_ptr + rows, row_max + tl.log(row_sum), mask=row_in)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_in)


def infonce_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    params: torch.Tensor,
    targets: torch.Tensor | None,
    layout: ColumnLayout,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    normalize_eps: float | None = None,
    thresholds: torch.Tensor | None = None,
    guide: GuideMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    q: N x D queries, k: M x D candidates (both contiguous, same dtype and device);
    params: [1/tau, log hard weight, log gaussian weight] in the accumulator dtype;
    targets: int64 column per row (-1 matches no column), or None for ``target_i = i``;
    groups: optional ``(row_groups, key_groups)``, int32 group ids of the N rows and of
    the first ``layout.n_grad_cols`` columns (later columns are visible to every group);
    normalize_eps: None (rows scored as given), or the rows are raw and are normalized on
    the fly as ``F.normalize(x, dim=-1, eps=normalize_eps)`` would; thresholds: None, or
    the false-negative margin's threshold of each row (length N); guide: None, or the
    guide rule's :class:`~fastcl.ops.layout.GuideMask`. The layout's per-entry
    rules (K hard negatives per row, the hardness penalty) come with ``layout``
    (:class:`~fastcl.ops.layout.ColumnLayout` states them all).
    Returns ``(lse, target_logit)``, each of length N in the accumulator dtype.
    """
    n_rows, dim = q.shape
    ins, segments, switches = tile_inputs(q, k, params, targets, layout, groups, normalize_eps, thresholds, guide)
    acc = accumulator_dtype(q.dtype)
    lse = torch.empty(n_rows, dtype=acc, device=q.device)
    target_logit = torch.empty(n_rows, dtype=acc, device=q.device)
    cfg = kernel_config("forward", q.dtype, dim, q.device, rules=extra_rules(switches))
    tile_ranges = row_block_tile_ranges(*groups, layout, cfg.BLOCK_M, cfg.BLOCK_N) if groups is not None else lse
    grid = (triton.cdiv(n_rows, cfg.BLOCK_M),)
    _infonce_fwd_kernel[grid](ins, segments, tile_ranges, lse, target_logit, SW=switches, **block_options(cfg))
    return lse, target_logit
