"""What every Triton launcher passes its kernel, in one place.

The forward, slab and workspace kernels take the same compile-time switches (which
features of the column layout are on, the accumulator, the product precision), the
same block options from their :class:`~fastcl.ops.configs.KernelConfig`, and inputs
checked the same way; the two backwards share the scales of their 16-bit operands.
"""

from __future__ import annotations

import torch

from .configs import KernelConfig
from .layout import ColumnLayout
from .utils import accumulator_dtype, dot_precision, eps_tensor, upcast_for_interpreter


def check_rows_contiguous(*tensors: torch.Tensor) -> None:
    """Unit column stride, and element offsets that fit the kernels' 32-bit index
    arithmetic (row index x row stride): past 2^31 they would wrap around silently."""
    for t in tensors:
        if t.stride(1) != 1:
            raise ValueError(f"kernel inputs need unit column stride, got strides {t.stride()}")
        if t.shape[0] and (t.shape[0] - 1) * t.stride(0) + t.shape[1] >= 2 ** 31:
            raise ValueError(f"a {tuple(t.shape)} input is too large for the Triton kernels (element offsets "
                             "past 2**31); use backend='chunked' or 'cpp', or fewer rows per call")


def layout_switches(dtype: torch.dtype, targets: torch.Tensor | None, layout: ColumnLayout, grouped: bool,
                    normalized: bool, margin: bool = False) -> dict:
    """The compile-time switches of a kernel launch: each feature of the layout a call
    does not use is compiled out, and the accumulator and product precision follow the
    input dtype. ``margin``: per-row false-negative thresholds are given."""
    return dict(
        HAS_TARGETS=targets is not None,
        HARD_WEIGHTED=layout.hard_weighted,
        GAUSS_WEIGHTED=layout.gauss_weighted,
        EXCLUDE_SELF=layout.n_self > 0,
        GROUPED=grouped,
        NORMALIZED=normalized,
        ACC_FP64=accumulator_dtype(dtype) == torch.float64,
        PRECISION=dot_precision(dtype),
        UPCAST=upcast_for_interpreter(dtype),
        **family_switches(layout, margin),
    )


def family_switches(layout: ColumnLayout, margin: bool) -> dict:
    """The switches of the per-entry rules (fastcl/ops/layout.py): HARD_BLOCKS (K > 1
    hard negatives per row), HARDNESS (the penalty's mode, 0 when it adds nothing),
    MARGIN (thresholds given) and EMPTY_ROWS (a row may have every entry masked: under
    the margin, or when a -inf weight masks the own hard negatives)."""
    hard_masked = layout.n_hard > 0 and layout.log_hard_weight == float("-inf")
    return dict(HARD_BLOCKS=layout.n_hard > 0 and layout.n_hard_blocks > 1,
                HARDNESS=layout.hardness_mode if layout.penalized else 0,
                MARGIN=margin, EMPTY_ROWS=margin or hard_masked)


def checked_thresholds(thresholds: torch.Tensor | None, n_rows: int, acc: torch.dtype,
                       device: torch.device) -> torch.Tensor | None:
    """The false-negative margin's per-row thresholds as the kernels read them
    (contiguous, accumulator dtype), or None; a ValueError names a wrong shape."""
    if thresholds is None:
        return None
    if not isinstance(thresholds, torch.Tensor) or thresholds.shape != (n_rows,):
        shape = tuple(thresholds.shape) if isinstance(thresholds, torch.Tensor) else type(thresholds).__name__
        raise ValueError(f"thresholds must be a tensor of one value per row ({n_rows},), got {shape}")
    if thresholds.device != device:
        raise ValueError(f"thresholds must be on the inputs' device {device}, got {thresholds.device}")
    return thresholds.detach().to(acc).contiguous()


def layout_segments(layout: ColumnLayout, normalize_eps: float | None, acc: torch.dtype,
                    device: torch.device, thresholds: torch.Tensor | None = None) -> tuple:
    """The layout's segments as the kernels take them, after the sizes and strides:
    ``hard_start, n_hard, gauss_start, self_start, n_self``, the scalars ``[eps,
    hardness strength]`` (a two-element tensor in the accumulator dtype, read from
    memory: a Python float would reach the GPU as fp32), ``n_hard_blocks`` and the
    thresholds (checked by :func:`checked_thresholds`; a placeholder when None)."""
    scalars = eps_tensor(normalize_eps, acc, device, 2)
    if layout.penalized:
        scalars[1] = layout.hardness_strength
    return (layout.hard_start, layout.n_hard, layout.gauss_start, layout.self_start, layout.n_self, scalars,
            layout.n_hard_blocks, thresholds if thresholds is not None else scalars)


#: Where :func:`layout_segments` puts the scalars ``[eps, hardness strength]``.
SCALARS_AT = 5


def block_options(cfg: KernelConfig, slab: bool = False) -> dict:
    """Block sizes and launch options of ``cfg``; with ``slab``, the gradient slab's width too."""
    options = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if slab:
        options["BLOCK_D_OUT"] = cfg.BLOCK_D_OUT
    return options


def backward_operand_scales(q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, grad_rows: torch.Tensor,
                            normalize_eps: float | None, acc: torch.dtype) -> torch.Tensor:
    """``[max_j c_j, max_i |g_i r_i|]`` (c, r: inverse norms of k's and q's rows, 1
    without normalization; g: the incoming row gradients), in the accumulator dtype on
    the device.

    Dividing by them keeps the per-column (dq) or per-row (dk) factor inside a product's
    16-bit operand within [-1, 1]; the same maxima multiply the fp32 result. They are
    taken over finite values only, so that a NaN or inf row (``check_finite=False``)
    spoils its own results, not every row's; a zero maximum (all gradients 0) becomes 1,
    so the division never makes a NaN."""
    g = grad_rows.detach().to(acc).abs()
    if normalize_eps is None:
        col_max = torch.ones((), dtype=acc, device=g.device)
        row = g
    else:
        col = 1.0 / k_norm.clamp_min(normalize_eps)
        row = g / q_norm.clamp_min(normalize_eps)
        col_max = _finite_max(col)
    row_max = _finite_max(row)
    return torch.stack([col_max.to(acc), row_max])


def _finite_max(values: torch.Tensor) -> torch.Tensor:
    """The largest finite value (all >= 0), 1 when there is none or it is 0."""
    largest = torch.where(torch.isfinite(values), values, torch.zeros_like(values)).amax()
    return torch.where(largest > 0, largest, torch.ones_like(largest))
