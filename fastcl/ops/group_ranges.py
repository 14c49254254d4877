"""With groups: which candidate tiles each block of rows can meet, and which row tiles
each block of candidates can meet, so the kernels' loops run over those only.

The kernels already skip a tile whose rows and columns share no group (tiles.py,
``groups_overlap``), but a loop over every tile still costs O(N M / (BLOCK_M BLOCK_N))
iterations, which for token-level InfoNCE (many short groups) outweighs the work. Rows
sorted by group (sequence after sequence, as :func:`fastcl.token_info_nce` lays them
out) make each block's partners contiguous: in each sorted segment of the candidates
(the positives, and the hard negatives, which repeat the rows' groups), the columns
whose group lies in the block's [smallest, largest] group form one range, found by
binary search. A segment that is not sorted is taken whole, so the ranges are right
for any grouping (a superset of the tiles that hold candidates; the kernels still check
each tile), and the decision is made on the device, without a host sync.

Everything here is O((N + M) log M) on the device, and nothing is N x M.
"""

from __future__ import annotations

import torch

from .layout import ColumnLayout

#: Column-tile intervals per row block: [grouped segment 1, grouped segment 2, shared].
N_INTERVALS = 3


def _cdiv(x: torch.Tensor | int, d: int):
    return (x + d - 1) // d


def _block_bounds(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest id of every block of ``block`` consecutive entries."""
    n = ids.numel()
    n_blocks = _cdiv(n, block)
    padded = ids.to(torch.int64)
    if n_blocks * block > n:  # repeat the last id: it changes no block's bounds
        padded = torch.cat([padded, padded[-1:].expand(n_blocks * block - n)])
    blocks = padded.view(n_blocks, block)
    return blocks.amin(dim=1), blocks.amax(dim=1)


def _is_sorted(ids: torch.Tensor) -> torch.Tensor:
    """0-dim bool on the device: ids are non-decreasing."""
    if ids.numel() < 2:
        return torch.ones((), dtype=torch.bool, device=ids.device)
    return (ids[1:] >= ids[:-1]).all()


def _matching_range(ids: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (lo, hi): the index range [a, b) of ``ids`` whose values lie in [lo, hi] when
    ids are sorted; all of ``ids`` when they are not."""
    ids = ids.to(torch.int64).contiguous()
    a = torch.searchsorted(ids, lo, right=False)
    b = torch.searchsorted(ids, hi, right=True)
    ordered = _is_sorted(ids)
    return torch.where(ordered, a, 0), torch.where(ordered, b, ids.numel())


def row_block_tile_ranges(row_groups: torch.Tensor, key_groups: torch.Tensor, layout: ColumnLayout,
                          block_m: int, block_n: int) -> torch.Tensor:
    """int32 tensor (row blocks, 3, 2): for every block of ``block_m`` rows, three
    disjoint, increasing intervals [first, end) of ``block_n``-column tiles that hold
    every candidate of its rows (the tiles of its groups in each grouped segment, then
    the shared columns past ``layout.n_grad_cols``)."""
    lo, hi = _block_bounds(row_groups, block_m)
    n_grad = layout.n_grad_cols
    segments = [(0, layout.hard_start), (layout.hard_start, n_grad)] if layout.n_hard else [(0, n_grad)]
    intervals = []
    for start, end in segments:
        a, b = _matching_range(key_groups[start:end], lo, hi)
        first = (start + a) // block_n
        intervals.append((first, torch.where(b > a, _cdiv(start + b, block_n), first)))
    if len(intervals) == 1:
        intervals.append((intervals[0][1], intervals[0][1]))  # empty
    shared_first = torch.full_like(lo, n_grad // block_n)
    intervals.append((shared_first, torch.full_like(lo, _cdiv(layout.n_cols, block_n))))
    if n_grad == layout.n_cols:
        intervals[-1] = (intervals[1][1], intervals[1][1])  # no shared columns: empty
    # Adjacent intervals may share a boundary tile: each starts where the last one ended.
    for i in (1, 2):
        first = torch.maximum(intervals[i][0], intervals[i - 1][1])
        intervals[i] = (first, torch.maximum(intervals[i][1], first))
    return torch.stack([torch.stack(pair, dim=1) for pair in intervals], dim=1).to(torch.int32).contiguous()


def column_block_row_ranges(row_groups: torch.Tensor, key_groups: torch.Tensor, layout: ColumnLayout,
                            block_m: int, block_n: int) -> torch.Tensor:
    """int32 tensor (column blocks, 2): for every block of ``block_n`` gradient columns
    (the first ``layout.n_grad_cols``), the interval [first, end) of ``block_m``-row tiles
    holding every row that scores one of its columns. A block that reaches past
    ``n_grad_cols`` holds shared columns, which every row scores: all row tiles."""
    n_rows, n_grad = row_groups.numel(), layout.n_grad_cols
    lo, hi = _block_bounds(key_groups[:n_grad], block_n)
    a, b = _matching_range(row_groups, lo, hi)
    first = a // block_m
    end = torch.where(b > a, _cdiv(b, block_m), first)
    block_end = (torch.arange(lo.numel(), device=lo.device) + 1) * block_n
    reaches_shared = block_end > n_grad
    if layout.n_cols > n_grad:
        first = torch.where(reaches_shared, 0, first)
        end = torch.where(reaches_shared, _cdiv(n_rows, block_m), end)
    return torch.stack([first, end], dim=1).to(torch.int32).contiguous()
