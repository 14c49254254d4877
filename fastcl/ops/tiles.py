"""Triton device functions shared by the forward and backward kernels.

A tile is a BLOCK_M x BLOCK_N block of the (never stored) logit matrix: rows are
queries (anchors), columns are candidates laid out as

    [ positives (N) | hard negatives (n_hard) | extra negatives (Q) | Gaussian (G) ]

Only two kinds of column carry an additive weight: row i's own hard negatives, at columns
``hard_start + k * n_hard + i`` for k < K (SimCSE's log alpha; K = 1 unless HARD_BLOCKS),
and every Gaussian column, from ``gauss_start`` on (GS-InfoNCE's log lambda). The
hardness penalty (HARDNESS, the layout's mode) adds ``s * sim`` to the value of the
entries its mode names, and the false-negative margin (MARGIN) masks every entry but
the target whose similarity exceeds the row's threshold (fastcl/ops/layout.py states
the rules). Two kinds of column are masked out (-inf): row i's own
column ``self_start + i`` when a row must not score itself (NT-Xent), and, with groups,
every candidate among the first ``n_grad_cols`` whose group differs from the row's
(token-level InfoNCE within a sequence); constant columns (extra and Gaussian negatives)
are visible to every group. Each feature is a compile-time switch, so the common case
pays for none of these comparisons.
"""

import triton
import triton.language as tl


@triton.jit
def similarity_tile(ins, rows, cols, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, SW: tl.constexpr):
    """S[rows, cols] = q[rows] . k[cols] (``ins``: launch.TileInputs), contracted over the
    dimension in BLOCK_D steps, at the launch's product precision (``SW``, launch.Switches).

    Rows from ``n_rows`` and columns from ``n_cols`` on read zeros, so their dot products
    are 0 (the caller masks columns to -inf and never stores rows past ``n_rows``).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_in = rows[:, None] < n_rows
    col_in = cols[:, None] < n_cols
    for d0 in range(0, ins.dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_in = dd[None, :] < ins.dim
        q = tl.load(ins.q + rows[:, None] * ins.stride_q + dd[None, :], mask=row_in & d_in, other=0.0)
        k = tl.load(ins.k + cols[:, None] * ins.stride_k + dd[None, :], mask=col_in & d_in, other=0.0)
        if SW.UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(tf32_operand(q, SW), tl.trans(tf32_operand(k, SW)), acc,
                     input_precision=SW.PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def tf32_operand(x, SW: tl.constexpr):
    """An fp32 operand of a tf32 product (``SW.PRECISION`` "tf32"), rounded to tf32's 10-bit
    mantissa to nearest even; any other operand as it is.

    The tensor cores' tf32 products read fp32 words and ignore their low 13 bits, so
    unrounded operands are truncated: every product is biased toward zero, the errors do
    not average out over D, and a loss of aligned pairs came out 4e-3 off on an H200 where
    cuBLAS's tf32 product, whose operands are rounded, was 2e-5 off. Rounded, the
    product sees each operand within half a tf32 unit, as cuBLAS does."""
    if SW.PRECISION == "tf32":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def guide_tile(ins, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               ACC_DTYPE: tl.constexpr):
    """The guide's similarities of a tile (GUIDED): ``guide_rows[rows] . guide_cols[cols]``
    (launch.TileInputs; unit rows in the accumulator dtype), at full precision, so that
    the mask decides as the reference does. Columns from ``n_guide_cols`` on read 0
    (the caller never masks them)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_in = rows[:, None] < ins.n_rows
    col_in = cols[:, None] < ins.n_guide_cols
    for d0 in range(0, ins.guide_dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_in = dd[None, :] < ins.guide_dim
        a = tl.load(ins.guide_rows + rows[:, None] * ins.guide_dim + dd[None, :], mask=row_in & d_in, other=0.0)
        b = tl.load(ins.guide_cols + cols[:, None] * ins.guide_dim + dd[None, :], mask=col_in & d_in, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee", out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def own_hard_tile(rows, cols, hard_start, n_hard, n_hard_blocks, HARD_BLOCKS: tl.constexpr):
    """Whether column j is one of row i's own hard negatives: ``hard_start + i`` alone,
    or with HARD_BLOCKS (K = ``n_hard_blocks`` > 1, n_hard > 0) ``hard_start + k * n_hard
    + i`` for k < K, found with one modulo instead of K comparisons."""
    if HARD_BLOCKS:
        offset = cols[None, :] - rows[:, None] - hard_start
        return ((rows[:, None] < n_hard) & (offset >= 0) & (offset < n_hard * n_hard_blocks)
                & (offset % n_hard == 0))
    return (cols[None, :] == rows[:, None] + hard_start) & (rows[:, None] < n_hard)


@triton.jit
def logit_tile(s, params, rows, cols, targets, thresholds, row_groups, col_groups, seg, strength, SW: tl.constexpr):
    """Scaled, weighted logits of a similarity tile, -inf where a column is not a
    candidate of the row (past ``n_cols``, the row itself, another group, a false
    negative above the row's threshold). ``params`` is :func:`load_params`' triple,
    ``seg`` the layout's segments and ``SW`` the launch's switches (fastcl/ops/launch.py).
    With HARDNESS (the layout's mode, 1-3) the penalized entries get ``strength * s``
    added to their value: a stop-gradient term, so the backwards' d logit / d s stays
    ``inv_tau``. ``targets`` are read only by the penalty and the margin, ``thresholds``
    (:func:`load_family`) only by the margin (the guide's, by :func:`tile_logits`)."""
    inv_tau, log_hard_weight, log_gauss_weight = params
    logits = s * inv_tau
    own_hard = own_hard_tile(rows, cols, seg.hard_start, seg.n_hard, seg.n_hard_blocks, SW.HARD_BLOCKS)
    if SW.HARD_WEIGHTED:
        logits = tl.where(own_hard, logits + log_hard_weight, logits)
    if SW.GAUSS_WEIGHTED:
        logits = tl.where(cols[None, :] >= seg.gauss_start, logits + log_gauss_weight, logits)
    if SW.HARDNESS != 0:  # never the target; modes 1 and 2 split the rest by own hard negatives
        penalized = cols[None, :] != targets[:, None]
        if SW.HARDNESS == 1:
            penalized = penalized & ~own_hard
        if SW.HARDNESS == 2:
            penalized = penalized & own_hard
        logits = tl.where(penalized, logits + strength * s, logits)
    valid = cols[None, :] < seg.n_cols
    if SW.EXCLUDE_SELF:
        valid = valid & ((cols[None, :] != rows[:, None] + seg.self_start) | (rows[:, None] >= seg.n_self))
    if SW.GROUPED:
        valid = valid & ((row_groups[:, None] == col_groups[None, :]) | (cols[None, :] >= seg.n_grad_cols))
    if SW.MARGIN:  # the target entry is never dropped
        valid = valid & ((s <= thresholds[0][:, None]) | (cols[None, :] == targets[:, None]))
    return tl.where(valid, logits, float("-inf"))


@triton.jit
def tile_logits(s, row_scale, col_scale, ins, params, rows, cols, targets, thresholds, row_groups, col_groups, seg,
                strength, SW: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(s, logits)`` of a :func:`similarity_tile` ``s``: with NORMALIZED, ``s`` scaled to
    cosines by the rows' inverse norms ``row_scale`` and ``col_scale`` (:func:`load_scales`),
    and its :func:`logit_tile`; with GUIDED, the entries the guide drops (the guide's tile,
    :func:`guide_tile`, above the row's guide threshold) are -inf too. (The caller loads
    the scales after forming ``s``, so that they are not held in registers through the
    product.)"""
    if SW.NORMALIZED:
        s = s * row_scale[:, None] * col_scale[None, :]
    logits = logit_tile(s, params, rows, cols, targets, thresholds, row_groups, col_groups, seg, strength, SW)
    if SW.GUIDED:  # never the target, nor columns past the guide's (constant negatives)
        g = guide_tile(ins, rows, cols, s.shape[0], s.shape[1], BLOCK_D, s.dtype)
        dropped = ((g > thresholds[1][:, None]) & (cols[None, :] != targets[:, None])
                   & (cols[None, :] < ins.n_guide_cols))
        logits = tl.where(dropped, float("-inf"), logits)
    return s, logits


@triton.jit
def load_family(ins, eps, rows, row_in, SW: tl.constexpr):
    """``(strength, thresholds)``: the hardness strength (HARDNESS: the second entry of
    scalars ``[eps, strength]`` in the accumulator dtype) and the rows' thresholds, a
    pair ``(margin, guide)``: the false-negative margin's (MARGIN) and
    the guide's (GUIDED), +inf past the rows. A rule that is off gets a placeholder of
    the same type that nothing reads."""
    strength = eps
    if SW.HARDNESS != 0:
        strength = tl.load(ins.scalars + 1)
    margin = rows.to(ins.scalars.dtype.element_ty)
    guide = margin
    if SW.MARGIN:
        margin = tl.load(ins.thresholds + rows, mask=row_in, other=float("inf"))
    if SW.GUIDED:
        guide = tl.load(ins.guide_thresholds + rows, mask=row_in, other=float("inf"))
    return strength, (margin, guide)


@triton.jit
def finite_lse(lse, EMPTY_ROWS: tl.constexpr):
    """A row's log-sum-exp as the softmax divides by it: with EMPTY_ROWS (rows may have
    every entry masked), -inf becomes 0, so that such a row's probabilities are
    exp(-inf - 0) = 0 rather than exp(-inf - -inf) = NaN."""
    if EMPTY_ROWS:
        return tl.where(lse == float("-inf"), 0.0, lse)
    return lse


@triton.jit
def load_params(params_ptr):
    """(1 / tau, log hard-negative weight, log Gaussian weight), read from device memory."""
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2)


@triton.jit
def load_targets(targets_ptr, rows, row_in, HAS_TARGETS: tl.constexpr):
    """int64 target column of each row: loaded (-1, matching nothing, past the rows), or
    the row itself (its own positive) when no targets are given."""
    if HAS_TARGETS:
        return tl.load(targets_ptr + rows, mask=row_in, other=-1).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def load_groups(groups_ptr, idx, n_valid, GROUPED: tl.constexpr):
    """int64 group ids of ``idx`` (0 past ``n_valid``); when ungrouped, ``idx`` itself as a
    placeholder that nothing reads (a jit function returns one type on every path)."""
    if GROUPED:
        return tl.load(groups_ptr + idx, mask=idx < n_valid, other=0).to(tl.int64)
    return idx.to(tl.int64)


@triton.jit
def load_scales(norm_ptr, idx, n_valid, eps, NORMALIZED: tl.constexpr):
    """Inverse norms ``1 / max(|x|, eps)`` of rows ``idx`` (0 past ``n_valid``: nothing
    there may scale a gradient operand up) when the kernel normalizes on the fly
    (fastcl/ops/normalize.py), from their L2 norms; otherwise a placeholder that nothing
    reads."""
    if NORMALIZED:
        norm = tl.load(norm_ptr + idx, mask=idx < n_valid, other=float("inf"))
        return 1.0 / tl.maximum(norm, eps)
    return idx.to(norm_ptr.dtype.element_ty)


@triton.jit
def load_projections(norm_ptr, idx, n_valid, eps):
    """The normalization backward's projection coefficients of rows ``idx``: ``1 / |x|^2``,
    0 where eps clamps the norm (and past ``n_valid``)."""
    norm = tl.load(norm_ptr + idx, mask=idx < n_valid, other=0.0)
    inv = 1.0 / tl.maximum(norm, eps)  # no division by zero on masked or zero rows
    return tl.where(norm > eps, inv * inv, 0.0)


@triton.jit
def load_row_gradients(lse_ptr, grad_rows_ptr, rows, row_in, acc_dtype: tl.constexpr, SW: tl.constexpr):
    """What a backward needs of each row besides :func:`row_block`'s: its log-sum-exp
    (:func:`finite_lse`) and its incoming gradient g_i (in ``acc_dtype``). Rows past the
    end get g = 0, so they contribute nothing anywhere."""
    lse = finite_lse(tl.load(lse_ptr + rows, mask=row_in, other=0.0), SW.EMPTY_ROWS)
    return lse, tl.load(grad_rows_ptr + rows, mask=row_in, other=0.0).to(acc_dtype)


@triton.jit
def row_block(ins, rows, row_in, SW: tl.constexpr):
    """What a program reads once for its block of rows (``ins``: launch.TileInputs):
    ``(eps, params, targets, strength, thresholds, row_groups, row_scale)``, see
    :func:`load_params`, :func:`load_targets`, :func:`load_family`, :func:`load_groups`
    and :func:`load_scales`."""
    eps = tl.load(ins.scalars)  # from memory: a float argument would be rounded to fp32
    targets = load_targets(ins.targets, rows, row_in, SW.HAS_TARGETS)
    strength, thresholds = load_family(ins, eps, rows, row_in, SW)
    row_groups = load_groups(ins.row_groups, rows, ins.n_rows, SW.GROUPED)
    row_scale = load_scales(ins.q_norm, rows, ins.n_rows, eps, SW.NORMALIZED)
    return eps, load_params(ins.params), targets, strength, thresholds, row_groups, row_scale


@triton.jit
def column_tile(key_groups_ptr, n0, row_groups, row_in, n_grad_cols, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    """Columns ``n0 .. n0 + BLOCK_N`` of a row block: ``(cols, their groups, whether the
    tile can hold a candidate of the rows)`` (:func:`groups_overlap`; always true when
    ungrouped)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_groups = load_groups(key_groups_ptr, cols, n_grad_cols, GROUPED)
    visit = groups_overlap(row_groups, row_in, col_groups, cols < n_grad_cols, n0 + BLOCK_N > n_grad_cols, GROUPED)
    return cols, col_groups, visit


@triton.jit
def column_interval(tile_ranges_ptr, interval, n_cols, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    """[first, end) columns of a row block's ``interval``-th stretch of column tiles: with
    groups, from the per-block intervals of group_ranges.py (3 per block); otherwise all
    columns, in one stretch (exactly the plain loop's bounds)."""
    if GROUPED:
        at = tile_ranges_ptr + (tl.program_id(0) * 3 + interval) * 2
        return tl.load(at) * BLOCK_N, tl.load(at + 1) * BLOCK_N
    return 0, n_cols


@triton.jit
def groups_overlap(row_groups, row_in, col_groups, col_in, col_all_visible, GROUPED: tl.constexpr):
    """Whether a tile can hold any candidate: its rows' and columns' group ranges meet,
    or it holds a column visible to every group. Always true when ungrouped."""
    if GROUPED:
        big = 2147483647
        row_lo = tl.min(tl.where(row_in, row_groups, big), 0)
        row_hi = tl.max(tl.where(row_in, row_groups, -big), 0)
        col_lo = tl.min(tl.where(col_in, col_groups, big), 0)
        col_hi = tl.max(tl.where(col_in, col_groups, -big), 0)
        return col_all_visible | ((col_lo <= row_hi) & (col_hi >= row_lo))
    return True


@triton.jit
def softmax_minus_target(logits, lse, targets, cols):
    """softmax_ij - [j == target_i] for one tile: the logit gradient before the row's
    incoming gradient g_i; every entry lies in [-1, 1]."""
    probs = tl.exp(logits - lse[:, None])
    is_target = cols[None, :] == targets[:, None]
    return tl.where(is_target, probs - 1.0, probs)


@triton.jit
def logit_grad_tile(logits, lse, grad_rows, targets, cols):
    """d loss / d logit = g_i * (softmax_ij - [j == target_i]) for one tile."""
    return grad_rows[:, None] * softmax_minus_target(logits, lse, targets, cols)


#: The logit-gradient operand of the backward's matrix products is (softmax - onehot),
#: in [-1, 1], times per-row or per-column factors in (0, 1], times this power of two: in
#: float16 the operand then stays below 65504 and every entry from 2^-29 of the largest
#: up is a normal number (full precision). 1/tau, g_i and the inverse norms are applied
#: to the fp32 accumulator instead, so none of them can push the 16-bit operand into
#: underflow or overflow (fastcl/ops/infonce_bwd_slab.py).
GRAD_OPERAND_SCALE: tl.constexpr = tl.constexpr(32768.0)


@triton.jit
def matmul_operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """An fp32 tile as a matrix-product operand of ``dtype`` (the inputs' dtype). Under
    the interpreter with bf16 inputs (UPCAST: its bf16 tl.dot is wrong, and its bf16 cast
    truncates), the tile is rounded to bf16 by hand, to nearest even as the GPU's cast
    does, and kept in fp32: the product then sees exactly the GPU's operand values."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
