"""NT-Xent (SimCLR's normalized temperature-scaled cross-entropy) on the fused kernels.

Two views z1, z2 (N x D each) of N examples. All 2N rows of ``z = [z1; z2]`` are
anchors; each is scored against the other 2N - 1 rows (itself excluded) and its target
is its other view. The kernels run with queries = candidates = z and mask each row's own
column, so no 2N x 2N matrix exists; both views get their gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from .loss import (
    _check_options, _check_tensors, _choose_backend, inverse_temperature, reduce_rows, split_normalization, unit_rows,
)
from .ops.infonce import InfoNCEFunction
from .ops.layout import ColumnLayout
from .ops.one_pass import needs_gradient, one_pass_loss, plan_one_pass
from .reference import nt_xent_reference


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.1,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """NT-Xent of two views: mean (``reduction="mean"``), sum or the 2N per-row losses
    (``"none"``, rows of z1 first). ``temperature`` as in :func:`fastcl.info_nce` (a
    tensor that requires grad gets its gradient); SimCLR's default is 0.1 here."""
    _check_options(temperature, 1.0, 0, 1.0, reduction, backend)
    _check_tensors(z1, z2, None, None, None, temperature, False, check_finite, names=("z1", "z2"))
    n = z1.shape[0]
    chosen = _choose_backend(backend, z1.device, (2 * n) ** 2)
    if chosen == "reference":
        loss = nt_xent_reference(z1, z2, temperature=temperature, reduction=reduction, normalize=normalize, eps=eps)
        return reduce_rows(loss, "none", z1.dtype)
    normalize_here, fused_eps = split_normalization(normalize, eps, chosen)
    z = unit_rows(torch.cat([z1, z2]), normalize_here, eps)
    layout = ColumnLayout(n_cols=2 * n, n_grad_cols=2 * n, gauss_start=2 * n, self_start=0, n_self=2 * n)
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    inv_tau = inverse_temperature(temperature, z1)
    # One pass (fastcl/ops/one_pass.py): a reduced loss gets its gradients in the forward.
    plan = plan_one_pass(reduction=reduction, needs_grad=needs_gradient(z1, z2, inv_tau), backend=chosen,
                         device=z.device, n_rows=2 * n, n_cols=2 * n, n_grad_cols=2 * n, dim=z.shape[1], dtype=z.dtype)
    if plan.one_pass:
        return one_pass_loss(z, z, None, inv_tau, targets, layout, chosen, None, fused_eps, reduction, plan)
    # z is both the queries and the candidates: autograd adds the two gradients.
    per_row = InfoNCEFunction.apply(z, z, None, inv_tau, targets, layout, chosen, None, fused_eps)
    return reduce_rows(per_row, reduction, z1.dtype)


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) loss module: ``NTXentLoss(temperature=0.1)(z1, z2)``.

    See :func:`nt_xent`. A temperature given as an ``nn.Parameter`` is registered as a
    parameter of the module.
    """

    def __init__(self, temperature: float | torch.Tensor = 0.1, *, reduction: str = "mean",
                 normalize: bool = True, eps: float = 1e-12, backend: str = "auto",
                 check_finite: bool = True) -> None:
        super().__init__()
        _check_options(temperature, 1.0, 0, 1.0, reduction, backend)
        self.temperature = temperature
        self.reduction, self.normalize, self.eps = reduction, bool(normalize), float(eps)
        self.backend, self.check_finite = backend, bool(check_finite)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, temperature=self.temperature, reduction=self.reduction, normalize=self.normalize,
                       eps=self.eps, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        tau = self.temperature if not isinstance(self.temperature, torch.Tensor) else "learnable"
        return f"temperature={tau}, reduction={self.reduction!r}"
