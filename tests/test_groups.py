"""Token-level groups: a row's candidates are the rows of its own group (plus shared
extra / Gaussian negatives); the kernels skip tiles that share no group."""

import pytest
import torch

from fastcl import info_nce, info_nce_reference, token_info_nce
from fastcl.ops.configs import KernelConfig, override_config

from .helpers import NATIVE, check_groups_stay_apart, relative_error

D = 8


def _rand(n, device, grad=True):
    return torch.randn(n, D, dtype=torch.float64, device=device).requires_grad_(grad)


def test_reference_groups_equal_separate_losses_per_group(device):
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2], device=device)
    a, p, h = (_rand(9, device, grad=False) for _ in range(3))
    got = info_nce_reference(a, p, h, groups=groups, hard_negative_weight=2.0, reduction="none")
    expected = torch.cat([info_nce_reference(a[groups == g], p[groups == g], h[groups == g],
                                             hard_negative_weight=2.0, reduction="none") for g in range(3)])
    torch.testing.assert_close(got, expected)


def _cases():
    sorted_groups = torch.arange(45) // 7  # 7 rows per group: not aligned with any block
    shuffled = sorted_groups[torch.randperm(45, generator=torch.Generator().manual_seed(0))]
    yield "sorted", sorted_groups, dict()
    yield "unsorted", shuffled, dict()
    yield "hard_weighted", sorted_groups, dict(hard=True, hard_negative_weight=3.0)
    yield "shared_negatives", sorted_groups, dict(extra=5, gaussian_negatives=4, gaussian_weight=0.5)
    yield "symmetric_tau", sorted_groups, dict(symmetric=True, learnable=True)
    yield "everything", shuffled, dict(hard=True, hard_negative_weight=0.5, extra=3, gaussian_negatives=2,
                                       learnable=True, reduction="none")


@pytest.mark.parametrize("backend", ["triton-slab", "triton-workspace", "torch", NATIVE])
@pytest.mark.parametrize("name, groups, options", list(_cases()), ids=[c[0] for c in _cases()])
def test_fused_matches_reference(backend, name, groups, options, device, monkeypatch):
    if backend.startswith("triton-"):
        monkeypatch.setenv("FASTCL_BACKWARD", backend.split("-")[1])
        backend = "triton"
    options = dict(options)
    hard, extra, learnable = options.pop("hard", False), options.pop("extra", 0), options.pop("learnable", False)
    n = groups.shape[0]
    groups = groups.to(device)
    leaves = [_rand(n, device) for _ in range(3 if hard else 2)]
    queue = _rand(extra, device, grad=False) if extra else None
    tau = torch.tensor(0.2, dtype=torch.float64, device=device, requires_grad=True) if learnable else 0.2
    weights = torch.randn(n, dtype=torch.float64, device=device)
    gaussian = options.pop("gaussian_negatives", 0)

    def run(fn, **gauss):
        out = fn(leaves[0], leaves[1], leaves[2] if hard else None, queue, temperature=tau, groups=groups,
                 **options, **gauss)
        objective = (out * weights).sum() if out.dim() else out
        return [out.detach()] + list(torch.autograd.grad(objective, leaves + ([tau] if learnable else [])))

    gen = lambda: torch.Generator(device=device).manual_seed(5)  # noqa: E731
    ours = run(lambda *a, **k: info_nce(*a, backend=backend, **k),
               **({"gaussian_negatives": gaussian, "generator": gen()} if gaussian else {}))
    from fastcl import draw_gaussian_negatives
    g = draw_gaussian_negatives(gaussian, D, torch.float64, device, gen()) if gaussian else None
    ref = run(lambda a, p, h, e, **k: info_nce_reference(a, p, h, e, g, **k))
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10


def test_kernels_skip_tiles_without_a_common_group(device):
    # The slab backward (the default with groups) skips tiles in all three kernels. (The
    # workspace backward's matrix products run over every column, so this NaN test does
    # not apply to it; its correctness with groups is tested above.)
    # 16-row tiles, groups of 16 aligned with them: a NaN candidate in group 1 would turn
    # group 0's gradients to NaN (0 * NaN in the gradient product) if its tile were visited.
    tile = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, BLOCK_D_OUT=16, num_warps=1, num_stages=1)
    with override_config(tile):
        check_groups_stay_apart("triton", device)


@pytest.mark.parametrize("backend", ["triton-slab", "triton-workspace", "torch", NATIVE])
def test_many_short_sequences_match_reference(backend, device, monkeypatch):
    # Token-level shape: 150 rows in sequences of 1 to 12, hard negatives (a second sorted
    # run of groups) and a shared queue, 16-wide tiles: each row block's loop visits only
    # the column-tile intervals of its own sequences (group_ranges.py), each column
    # block's only its rows' tiles; the chunked path computes only those columns (in
    # 40-row chunks here) and the native kernel skips the other blocks.
    if backend.startswith("triton-"):
        monkeypatch.setenv("FASTCL_BACKWARD", backend.split("-")[1])
        backend = "triton"
    monkeypatch.setattr("fastcl.ops.chunked.GROUPED_CHUNK_ROWS", 40)
    g = torch.Generator().manual_seed(3)
    groups = torch.repeat_interleave(torch.arange(40), torch.randint(1, 13, (40,), generator=g))[:150].to(device)
    n = groups.numel()
    a, p, h = (_rand(n, device) for _ in range(3))
    queue = _rand(6, device, grad=False)
    options = dict(hard_negative_weight=2.0, temperature=0.1, groups=groups, symmetric=True)
    ours = info_nce(a, p, h, queue, backend=backend, **options)
    ref = info_nce_reference(a, p, h, queue, **options)
    got = torch.autograd.grad(ours, [a, p, h])
    expected = torch.autograd.grad(ref, [a, p, h])
    assert relative_error(ours.detach(), ref.detach()) < 1e-10
    for x, y in zip(got, expected):
        assert relative_error(x, y) < 1e-10


def _brute_force_tiles(row_groups, key_groups, layout, block_m, block_n):
    """Per row block, the column tiles holding a candidate of one of its rows; per column
    block (gradient columns), the row tiles holding a row that scores one of its columns."""
    rows, keys = row_groups.tolist(), key_groups.tolist()
    n = len(rows)

    def candidate(i, j):
        return j >= layout.n_grad_cols or keys[j] == rows[i]

    per_row_block = [{j // block_n for j in range(layout.n_cols)
                      if any(candidate(i, j) for i in range(b * block_m, min(n, (b + 1) * block_m)))}
                     for b in range(-(-n // block_m))]
    per_col_block = [{i // block_m for i in range(n)
                      if any(candidate(i, j) for j in range(c * block_n, min(layout.n_cols, (c + 1) * block_n)))}
                     for c in range(-(-layout.n_grad_cols // block_n))]
    return per_row_block, per_col_block


def test_group_ranges_cover_every_candidate_tile_once():
    # Random groupings, sorted (sequence after sequence) and shuffled, with and without
    # hard negatives and shared columns, at random block sizes: the intervals hold every
    # tile that holds a candidate, visit no tile twice, stay in bounds, and (sorted) skip.
    from fastcl.ops.group_ranges import column_block_row_ranges, row_block_tile_ranges
    from fastcl.ops.layout import ColumnLayout

    g = torch.Generator().manual_seed(0)
    visited_sorted = total_sorted = 0
    for _ in range(150):
        n = int(torch.randint(1, 50, (1,), generator=g))
        hard, extra = bool(torch.randint(0, 2, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g))
        shuffled = bool(torch.randint(0, 3, (1,), generator=g) == 0)
        rows = torch.repeat_interleave(torch.arange(n), torch.randint(1, 9, (n,), generator=g))[:n]
        if shuffled:
            rows = rows[torch.randperm(n, generator=g)]
        keys = torch.cat([rows, rows]) if hard else rows
        n_hard = n if hard else 0
        layout = ColumnLayout(n_cols=n + n_hard + extra, n_grad_cols=n + n_hard, hard_start=n, n_hard=n_hard,
                              gauss_start=n + n_hard + extra)
        block_m, block_n = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        need_rows, need_cols = _brute_force_tiles(rows, keys, layout, block_m, block_n)
        for b, intervals in enumerate(row_block_tile_ranges(rows, keys, layout, block_m, block_n).tolist()):
            visited = [t for first, end in intervals for t in range(first, end)]
            assert len(visited) == len(set(visited)), f"a tile visited twice: {intervals}"
            assert need_rows[b] <= set(visited) <= set(range(-(-layout.n_cols // block_n)))
            if not shuffled:
                visited_sorted, total_sorted = visited_sorted + len(visited), total_sorted + -(-layout.n_cols // block_n)
        for c, (first, end) in enumerate(column_block_row_ranges(rows, keys, layout, block_m, block_n).tolist()):
            assert need_cols[c] <= set(range(first, end)) and 0 <= first and end <= -(-n // block_m)
    assert visited_sorted < 0.7 * total_sorted, "sorted groups should skip tiles"


def test_chunked_path_computes_only_its_groups_columns(monkeypatch):
    # As the kernels' skipping test above, for the chunked PyTorch path: 16-row chunks,
    # groups of 16. A NaN candidate of group 1 would reach group 0's gradients if group
    # 0's chunk computed its column.
    monkeypatch.setattr("fastcl.ops.chunked.GROUPED_CHUNK_ROWS", 16)
    check_groups_stay_apart("torch")


def test_token_info_nce_equals_per_sequence_losses(device):
    batch, length = 3, 6
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], device=device)
    anchors = torch.randn(batch, length, D, dtype=torch.float64, device=device)
    positives = torch.randn(batch, length, D, dtype=torch.float64, device=device)
    got = token_info_nce(anchors, positives, mask, reduction="none", backend="triton")
    expected = torch.cat([info_nce_reference(anchors[b][mask[b] == 1], positives[b][mask[b] == 1], reduction="none")
                          for b in range(batch)])
    torch.testing.assert_close(got, expected)
    mean = token_info_nce(anchors, positives, mask, backend="torch")
    torch.testing.assert_close(mean, expected.mean())


def test_group_errors():
    a, p = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="groups must be a 1-D tensor with one group id per anchor"):
        info_nce(a, p, groups=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="groups must be an integer tensor"):
        info_nce(a, p, groups=torch.zeros(5))
    with pytest.raises(ValueError, match="labels are not supported with groups"):
        info_nce(a, p, groups=torch.zeros(5, dtype=torch.long), labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask keeps no token"):
        token_info_nce(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(2, 3))
