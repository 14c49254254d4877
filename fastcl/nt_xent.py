"""NT-Xent (SimCLR's normalized temperature-scaled cross-entropy) on the fused kernels.

Two views z1, z2 (N x D each) of N examples. All 2N rows of ``z = [z1; z2]`` are
anchors; each is scored against the other 2N - 1 rows (itself excluded) and its target
is its other view. The kernels run with queries = candidates = z and mask each row's own
column, so no 2N x 2N matrix exists; both views get their gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops.function import InfoNCEFunction
from .plan import LossOptions, plan_nt_xent, reduce_rows
from .reference import nt_xent_reference


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float | torch.Tensor = 0.1, reduction: str = "mean",
            normalize: bool = True, eps: float = 1e-12, backend: str = "auto", backward_strategy: str = "auto",
            check_finite: bool = True, false_negative_margin: float | None = None) -> torch.Tensor:
    """NT-Xent of two views: mean (``reduction="mean"``), sum or the 2N per-row losses
    (``"none"``, rows of z1 first). ``temperature`` as in :func:`fastcl.info_nce` (a
    tensor that requires grad gets its gradient); SimCLR's default is 0.1 here. The
    other arguments mean what they mean for :func:`fastcl.info_nce`;
    ``false_negative_margin`` m drops from row i's softmax every other row whose cosine
    to it exceeds that of its other view plus m (no gradient through the decision)."""
    options = LossOptions(temperature=temperature, reduction=reduction, normalize=normalize, eps=eps, backend=backend,
                          backward_strategy=backward_strategy, check_finite=check_finite,
                          false_negative_margin=false_negative_margin).checked()
    plan = plan_nt_xent(options, z1, z2)
    z1, z2 = plan.inputs.anchors, plan.inputs.positives
    if plan.rows is None:  # the dense path
        loss = nt_xent_reference(z1, z2, temperature=temperature, reduction=reduction, normalize=normalize, eps=eps,
                                 false_negative_margin=options.margin)
        return reduce_rows(loss, "none", z1.dtype)
    return reduce_rows(InfoNCEFunction.apply(*plan.rows), reduction, z1.dtype)


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) loss module: ``NTXentLoss(temperature=0.1)(z1, z2)``.

    See :func:`nt_xent`. A temperature given as an ``nn.Parameter`` is registered as a
    parameter of the module.
    """

    def __init__(self, temperature: float | torch.Tensor = 0.1, *, reduction: str = "mean",
                 normalize: bool = True, eps: float = 1e-12, backend: str = "auto",
                 backward_strategy: str = "auto", check_finite: bool = True,
                 false_negative_margin: float | None = None) -> None:
        super().__init__()
        LossOptions(temperature=temperature, reduction=reduction, normalize=normalize, eps=eps, backend=backend,
                    backward_strategy=backward_strategy, check_finite=check_finite,
                    false_negative_margin=false_negative_margin).checked()
        self.false_negative_margin = false_negative_margin
        self.temperature = temperature
        self.reduction, self.normalize, self.eps = reduction, bool(normalize), float(eps)
        self.backend, self.backward_strategy, self.check_finite = backend, backward_strategy, bool(check_finite)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, temperature=self.temperature, reduction=self.reduction, normalize=self.normalize,
                       eps=self.eps, backend=self.backend, backward_strategy=self.backward_strategy,
                       check_finite=self.check_finite, false_negative_margin=self.false_negative_margin)

    def extra_repr(self) -> str:
        tau = self.temperature if not isinstance(self.temperature, torch.Tensor) else "learnable"
        return f"temperature={tau}, reduction={self.reduction!r}"
