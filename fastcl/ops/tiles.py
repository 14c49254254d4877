"""Triton device functions shared by the forward and backward kernels.

A tile is a BLOCK_M x BLOCK_N block of the (never stored) logit matrix: rows are
queries (anchors), columns are candidates laid out as

    [ positives (N) | hard negatives (n_hard) | extra negatives (Q) | Gaussian (G) ]

Only two kinds of column carry an additive weight: row i's own hard negative, at column
``hard_start + i`` (SimCSE's log alpha), and every Gaussian column, from ``gauss_start``
on (GS-InfoNCE's log lambda). Both are switched off at compile time when their weight
is 1, so the common case pays for neither comparison.
"""

import triton
import triton.language as tl


@triton.jit
def similarity_tile(
    q_ptr,
    k_ptr,
    rows,
    cols,
    n_rows,
    n_cols,
    dim,
    stride_q,
    stride_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """S[rows, cols] = q[rows] . k[cols], contracted over ``dim`` in BLOCK_D steps.

    Out-of-range rows and columns read zeros, so their dot products are 0 (the caller
    masks columns to -inf and never stores rows past ``n_rows``).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_in = rows[:, None] < n_rows
    col_in = cols[:, None] < n_cols
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_in = dd[None, :] < dim
        q = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :], mask=row_in & d_in, other=0.0)
        k = tl.load(k_ptr + cols[:, None] * stride_k + dd[None, :], mask=col_in & d_in, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def logit_tile(
    s,
    inv_tau,
    log_hard_weight,
    log_gauss_weight,
    rows,
    cols,
    n_cols,
    hard_start,
    n_hard,
    gauss_start,
    HARD_WEIGHTED: tl.constexpr,
    GAUSS_WEIGHTED: tl.constexpr,
):
    """Scaled, weighted logits of a similarity tile; columns past ``n_cols`` are -inf."""
    logits = s * inv_tau
    if HARD_WEIGHTED:
        own_hard = (cols[None, :] == rows[:, None] + hard_start) & (rows[:, None] < n_hard)
        logits = tl.where(own_hard, logits + log_hard_weight, logits)
    if GAUSS_WEIGHTED:
        logits = tl.where(cols[None, :] >= gauss_start, logits + log_gauss_weight, logits)
    return tl.where(cols[None, :] < n_cols, logits, float("-inf"))


@triton.jit
def logit_grad_tile(logits, lse, grad_rows, targets, cols):
    """d loss / d logit = g_i * (softmax_ij - [j == target_i]) for one tile."""
    probs = tl.exp(logits - lse[:, None])
    is_target = cols[None, :] == targets[:, None]
    return grad_rows[:, None] * tl.where(is_target, probs - 1.0, probs)
