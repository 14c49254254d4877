"""Chunked PyTorch forward and backward: the path for CPU tensors without Triton.

Same interface and arithmetic as the Triton kernels (infonce_fwd.py, infonce_bwd_slab.py),
but a block of rows at a time with ordinary tensor ops: a chunk of C rows holds one
C x M logit block, and C is chosen so that block stays under a fixed element budget
whatever N and M are. Peak extra memory is therefore O(budget + (N + M) * D), never
N x M. With ``normalize_eps`` the rows are raw and normalized on the fly, as the kernels
do (fastcl/ops/normalize.py).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .group_ranges import row_block_tile_ranges
from .layout import HARDNESS_ALL, HARDNESS_HARD, ColumnLayout, GuideMask
from .normalize import row_scales
from .utils import accumulator_dtype

#: Elements of one chunk's logit block (4 M elements = 16 MiB in fp32). The environment
#: variable FASTCL_CHUNK_ELEMENTS overrides it.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def chunk_rows(n_rows: int, n_cols: int, grouped: bool = False) -> int:
    """Rows per chunk so that a chunk's logit block stays within the element budget; at
    most GROUPED_CHUNK_ROWS with groups, whose chunks compute only their groups' columns."""
    budget = int(os.environ.get("FASTCL_CHUNK_ELEMENTS", DEFAULT_CHUNK_ELEMENTS))
    rows = max(1, min(n_rows, budget // max(n_cols, 1)))
    return min(rows, GROUPED_CHUNK_ROWS) if grouped else rows


#: Rows per chunk with groups: few enough that a chunk spans a few sequences, so that
#: the columns it computes (those of its groups, group_ranges.py) are few.
GROUPED_CHUNK_ROWS = 256


class _Columns(NamedTuple):
    """The candidate columns one chunk computes: all of them (``ids`` None), or with
    groups only those that can hold a candidate of its rows (``ids``, sorted; the first
    ``n_grad`` are gradient columns), with their rows of k and inverse norms."""

    ids: torch.Tensor | None
    k: torch.Tensor
    k_inv: torch.Tensor | None
    n_grad: int


def _column_bounds(groups, layout: ColumnLayout, step: int) -> list | None:
    """With groups, every chunk's three [first, end) column ranges (the last: the shared
    columns), found for all chunks at once (the chunks are the ``step``-row blocks); None
    without groups."""
    if groups is None:
        return None
    row_groups, key_groups = groups
    return row_block_tile_ranges(row_groups, key_groups, layout, step, 1).tolist()


def _chunk_columns(k, norms, bounds, layout: ColumnLayout) -> _Columns:
    """The chunk's columns: all of them (``bounds`` None), else those of its ranges."""
    k_inv = norms.k_inv if norms is not None else None
    if bounds is None:
        return _Columns(None, k, k_inv, layout.n_grad_cols)
    ids = torch.cat([torch.arange(a, b, device=k.device) for a, b in bounds])
    n_grad = sum(b - a for a, b in bounds[:2])
    return _Columns(ids, k[ids], k_inv[ids] if k_inv is not None else None, n_grad)


def _positions(cols: _Columns, col_index: torch.Tensor) -> torch.Tensor:
    """Where the global columns ``col_index`` sit among the chunk's columns, -1 where they
    are not computed (or are -1 already)."""
    if cols.ids is None:
        return col_index
    if cols.ids.numel() == 0:
        return torch.full_like(col_index, -1)
    pos = torch.searchsorted(cols.ids, col_index.clamp(min=0)).clamp(max=cols.ids.numel() - 1)
    return torch.where((cols.ids[pos] == col_index) & (col_index >= 0), pos, -1)


def _chunk_logits(q_chunk, cols: _Columns, params, row0, layout: ColumnLayout, groups, norms, tgt,
                  thresholds=None, guide: GuideMask | None = None):
    """(similarity, logits) of rows [row0, row0 + len(q_chunk)) against the chunk's
    columns, in the accumulator dtype, with -inf where a column is not a candidate of the
    row (itself, another group, an own document under a -inf weight, a dropped false
    negative, a pair the guide drops); ``tgt`` are the rows' target positions among the chunk's columns (-1: none)."""
    n_chunk = q_chunk.shape[0]
    s = q_chunk @ cols.k.T
    if norms is not None:  # raw products to cosines
        s.mul_(norms.q_inv[row0:row0 + n_chunk, None]).mul_(cols.k_inv[None, :])
    logits = s * params[0]
    rows = torch.arange(row0, row0 + n_chunk, device=q_chunk.device)
    if layout.hard_weighted:
        for block in range(layout.n_hard_blocks):
            hard_cols = layout.hard_start + block * layout.n_hard + rows
            pos = torch.where(rows < layout.n_hard, _positions(cols, hard_cols), -1)
            own = pos >= 0
            logits[own.nonzero()[:, 0], pos[own]] += params[1]
    if layout.gauss_weighted:
        if cols.ids is None:
            logits[:, layout.gauss_start:] += params[2]
        else:
            logits[:, cols.ids >= layout.gauss_start] += params[2]
    if layout.penalized or thresholds is not None or guide is not None:
        col_ids = cols.ids if cols.ids is not None else torch.arange(s.shape[1], device=s.device)
        not_target = col_ids[None, :] != _global(cols, tgt)[:, None]
    if layout.penalized:
        # A stop-gradient penalty: it moves the logit's value only (the backward's
        # d logit / d sim stays 1/tau, fastcl/ops/layout.py).
        penalized = not_target
        if layout.hardness_mode != HARDNESS_ALL:
            own_hard = layout.own_hard(rows, col_ids)
            penalized = penalized & (own_hard if layout.hardness_mode == HARDNESS_HARD else ~own_hard)
        logits.add_(torch.where(penalized, s, torch.zeros_like(s)), alpha=layout.hardness_strength)
    if layout.n_self:
        pos = torch.where(rows < layout.n_self, _positions(cols, layout.self_start + rows), -1)
        own = pos >= 0
        logits[own.nonzero()[:, 0], pos[own]] = float("-inf")
    if groups is not None:
        row_groups, key_groups = groups
        keys = key_groups[:cols.n_grad] if cols.ids is None else key_groups[cols.ids[:cols.n_grad]]
        other_group = row_groups[row0:row0 + n_chunk, None] != keys[None, :]
        logits[:, :cols.n_grad].masked_fill_(other_group, float("-inf"))
    if thresholds is not None:
        dropped = (s > thresholds[row0:row0 + n_chunk, None].to(s.dtype)) & not_target
        logits.masked_fill_(dropped, float("-inf"))
    if guide is not None:  # the chunk's gradient columns come first
        guide_cols = guide.cols if cols.ids is None else guide.cols[cols.ids[:cols.n_grad]]
        over = guide.rows[row0:row0 + n_chunk] @ guide_cols.T > guide.thresholds[row0:row0 + n_chunk, None]
        logits[:, :cols.n_grad].masked_fill_(over & not_target[:, :cols.n_grad], float("-inf"))
    return s, logits


def _global(cols: _Columns, tgt: torch.Tensor) -> torch.Tensor:
    """Positions among the chunk's columns back to global column ids (-1 stays -1)."""
    if cols.ids is None:
        return tgt
    return torch.where(tgt >= 0, cols.ids[tgt.clamp(min=0)] if cols.ids.numel() else tgt, -1)


def _chunk_targets(targets, row0, n_chunk, cols: _Columns, device):
    """The chunk's target positions among its columns (-1: no target among them)."""
    if targets is None:
        tgt = torch.arange(row0, row0 + n_chunk, device=device)
    else:
        tgt = targets[row0:row0 + n_chunk]
    return _positions(cols, tgt)


def _target_logits(logits, tgt):
    """logits[i, tgt[i]], and 0 where tgt[i] is -1 (the target lies in no column here)."""
    picked = logits.gather(1, tgt.clamp(min=0)[:, None])[:, 0]
    return torch.where(tgt >= 0, picked, torch.zeros_like(picked))


def chunked_forward(q, k, params, targets, layout: ColumnLayout, groups=None, normalize_eps=None, thresholds=None,
                    guide: GuideMask | None = None):
    """Per-row ``(lse, target_logit)`` in the accumulator dtype; see infonce_forward."""
    n_rows = q.shape[0]
    acc = accumulator_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)  # no-op for fp32 and fp64; CPU half products are slow
    norms = row_scales(q, k, normalize_eps)
    lse = torch.empty(n_rows, dtype=acc, device=q.device)
    target_logit = torch.empty(n_rows, dtype=acc, device=q.device)
    step = chunk_rows(n_rows, layout.n_cols, grouped=groups is not None)
    bounds = _column_bounds(groups, layout, step)
    for row0 in range(0, n_rows, step):
        q_chunk = q[row0:row0 + step]
        cols = _chunk_columns(k, norms, bounds[row0 // step] if bounds else None, layout)
        tgt = _chunk_targets(targets, row0, q_chunk.shape[0], cols, q.device)
        _, logits = _chunk_logits(q_chunk, cols, params, row0, layout, groups, norms, tgt, thresholds, guide)
        lse[row0:row0 + step] = torch.logsumexp(logits, dim=1)
        target_logit[row0:row0 + step] = _target_logits(logits, tgt)
    return lse, target_logit


def chunked_backward(q, k, params, targets, layout: ColumnLayout, lse, grad_rows,
                     need_dq: bool = True, need_dk: bool = True, groups=None, normalize_eps=None, thresholds=None,
                     guide: GuideMask | None = None):
    """``(dq, dk, row_dot)`` with the same meaning as infonce_backward."""
    n_rows, dim = q.shape
    in_dtype, acc = q.dtype, accumulator_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    norms = row_scales(q, k, normalize_eps)
    n_grad = layout.n_grad_cols
    dq = torch.empty((n_rows, dim), dtype=in_dtype, device=q.device) if need_dq else None
    row_dot = torch.empty(n_rows, dtype=acc, device=q.device) if need_dq else None
    want_dk = need_dk and layout.n_grad_cols > 0
    dk_acc = torch.zeros((n_grad, dim), dtype=acc, device=q.device) if want_dk else None
    col_dot = torch.zeros(n_grad, dtype=acc, device=q.device) if want_dk and norms is not None else None
    step = chunk_rows(n_rows, layout.n_cols, grouped=groups is not None)
    bounds = _column_bounds(groups, layout, step)
    for row0 in range(0, n_rows, step):
        q_chunk = q[row0:row0 + step]
        n_chunk = q_chunk.shape[0]
        cols = _chunk_columns(k, norms, bounds[row0 // step] if bounds else None, layout)
        tgt = _chunk_targets(targets, row0, n_chunk, cols, q.device)
        s, logits = _chunk_logits(q_chunk, cols, params, row0, layout, groups, norms, tgt, thresholds, guide)
        # A row with every entry masked (lse -inf) has probabilities 0, not exp(-inf - -inf).
        row_lse = lse[row0:row0 + step, None]
        dlogits = torch.exp(logits - row_lse.masked_fill(torch.isneginf(row_lse), 0.0))
        has_target = tgt >= 0
        dlogits[has_target.nonzero()[:, 0], tgt[has_target]] -= 1.0
        dlogits *= grad_rows[row0:row0 + step, None].to(acc)
        ds = dlogits * params[0]
        chunk_row_dot = (dlogits * s).sum(dim=1)
        m = cols.n_grad  # the chunk's gradient columns come first
        if norms is not None:
            if want_dk:
                _add_rows(col_dot, cols, (dlogits[:, :m] * s[:, :m]).sum(dim=0))
            ds.mul_(norms.q_inv[row0:row0 + n_chunk, None]).mul_(cols.k_inv[None, :])
        if need_dq:
            dq_chunk = ds @ cols.k
            if norms is not None:  # the normalization's rank-1 term of each row
                coef = params[0] * chunk_row_dot * norms.q_proj[row0:row0 + n_chunk]
                dq_chunk.addcmul_(q_chunk, coef[:, None], value=-1)
            dq[row0:row0 + step] = dq_chunk.to(in_dtype)
            del dq_chunk  # freed before the dk product, not after it
            row_dot[row0:row0 + step] = chunk_row_dot
        if want_dk:
            _add_rows(dk_acc, cols, ds[:, :m].T @ q_chunk)
    if want_dk and norms is not None:
        dk_acc.addcmul_(k[:n_grad], (params[0] * col_dot * norms.k_proj[:n_grad])[:, None], value=-1)
    dk = dk_acc.to(in_dtype) if want_dk else None
    return dq, dk, row_dot


def _add_rows(total, cols: _Columns, part):
    """total[gradient columns of the chunk] += part (rows in the chunk's column order)."""
    if cols.ids is None:
        total += part
    else:
        total.index_add_(0, cols.ids[:cols.n_grad], part)
