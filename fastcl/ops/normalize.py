"""Fused L2 normalization: per-row norms that let every backend take raw rows.

The loss scores cosines. Instead of normalized copies of q and k (and, in the backward,
their gradients and F.normalize's backward), the backends take the raw rows and one L2
norm per row; from it, ``r_i = 1 / max(|q_i|, eps)`` (``c_j`` likewise for k) scales
each similarity tile: ``cos_ij = (q_i . k_j) r_i c_j``. With ``G`` the gradient of the
loss with respect to the logits and ``g_i = (1/tau) sum_j G_ij k^_j`` the gradient with
respect to the unit row ``q^_i``, F.normalize's backward is

    dq_i = r_i g_i - [|q_i| > eps] r_i (g_i . q^_i) q^_i
         = (1/tau) sum_j (G_ij r_i c_j) k_j  -  (1/tau) row_dot_i proj_i q_i

with ``row_dot_i = sum_j G_ij cos_ij`` (the per-row sum the backends form anyway for
the temperature's gradient) and ``proj_i = 1 / |q_i|^2`` where the norm exceeds eps, 0
where eps clamps it (F.normalize's gradient is then ``g / eps``, no projection). So the
gradient products take ``G`` scaled by ``r_i c_j`` and each gradient row gets one
rank-1 correction; dk is the same with rows and columns swapped (``col_dot_j = sum_i
G_ij cos_ij``). Memory: N + M norms instead of the 4 (N + M) D values of the unit rows
and their gradients. The Triton kernels derive ``r`` and ``proj`` from the norms
themselves (tiles.py), so normalizing costs one reduction launch per input; the
chunked path uses :func:`row_scales`. (The kernels read eps from memory in the
accumulator dtype: a Python float argument would reach them as fp32, and rows below
eps, zero rows included, are scaled by exactly 1 / eps.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .utils import accumulator_dtype


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every row, in the accumulator dtype (one reduction)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=accumulator_dtype(x.dtype))


class RowScales(NamedTuple):
    """Per-row scales of q (N) and k (M) in the accumulator dtype: ``*_inv`` the inverse
    norms ``1 / max(|x|, eps)``, ``*_proj`` the projection coefficients (see above)."""

    q_inv: torch.Tensor
    q_proj: torch.Tensor
    k_inv: torch.Tensor
    k_proj: torch.Tensor


def _scales(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    norm = row_norms(x)
    inv = 1.0 / norm.clamp_min(eps)
    return inv, torch.where(norm > eps, inv * inv, torch.zeros_like(inv))


def row_scales(q: torch.Tensor, k: torch.Tensor, eps: float | None) -> RowScales | None:
    """The scales of q's and k's rows for ``F.normalize(x, dim=-1, eps=eps)``, or None
    when ``eps`` is None (rows scored as given)."""
    if eps is None:
        return None
    return RowScales(*_scales(q, eps), *_scales(k, eps))
