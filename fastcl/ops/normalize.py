"""Fused L2 normalization: per-row scales that let the kernels take raw rows.

The loss scores cosines. Instead of normalized copies of q and k (and, in the backward,
their gradients and F.normalize's backward), the kernels take the raw rows and one
inverse norm per row, ``r_i = 1 / max(|q_i|, eps)`` and ``c_j`` likewise, and scale
each similarity tile: ``cos_ij = (q_i . k_j) r_i c_j``. With ``G`` the gradient of the
loss with respect to the logits and ``g_i = (1/tau) sum_j G_ij k^_j`` the gradient with
respect to the unit row ``q^_i``, F.normalize's backward is

    dq_i = r_i g_i - [|q_i| > eps] r_i (g_i . q^_i) q^_i
         = (1/tau) sum_j (G_ij r_i c_j) k_j  -  (1/tau) row_dot_i [|q_i| > eps] r_i^2 q_i

with ``row_dot_i = sum_j G_ij cos_ij``, the per-row sum the kernels form anyway for the
temperature's gradient. So the gradient products take ``G`` scaled by ``r_i c_j`` and
each gradient row gets one rank-1 correction; dk is the same with columns and rows
swapped (``col_dot_j = sum_i G_ij cos_ij``). Memory: 4 (N + M) scalars instead of the
4 (N + M) D values of the unit rows and their gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .utils import accumulator_dtype


class RowNorms(NamedTuple):
    """Per-row scales of q (N) and k (M), in the accumulator dtype: ``*_inv`` the inverse
    norms, ``*_proj`` the projection coefficients (``1 / |x|^2``, 0 where eps clamps the
    norm: F.normalize's gradient is then ``g / eps``, with no projection)."""

    q_inv: torch.Tensor
    q_proj: torch.Tensor
    k_inv: torch.Tensor
    k_proj: torch.Tensor


def _scales(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=accumulator_dtype(x.dtype))
    inv = 1.0 / norm.clamp_min(eps)
    return inv, torch.where(norm > eps, inv * inv, torch.zeros_like(inv))


def row_norms(q: torch.Tensor, k: torch.Tensor, eps: float | None) -> RowNorms | None:
    """The scales of q's and k's rows for ``F.normalize(x, dim=-1, eps=eps)``, or None
    when ``eps`` is None (rows scored as given)."""
    if eps is None:
        return None
    return RowNorms(*_scales(q, eps), *_scales(k, eps))


def kernel_scale_args(norms: RowNorms | None, placeholder: torch.Tensor) -> RowNorms:
    """The four scale pointers a kernel takes; without normalization, ``placeholder`` (a
    tensor of the accumulator dtype that the kernel never reads) in every slot."""
    return norms if norms is not None else RowNorms(placeholder, placeholder, placeholder, placeholder)
