"""What every Triton launcher passes its kernel, in one place.

The forward, slab, workspace and one-pass kernels take the column layout as two tuple
arguments, its :class:`Segments` (runtime integers) and the launch's :class:`Switches`
(compile time: which features of the layout are on, the accumulator, the product
precision), the same block options from their :class:`~fastcl.ops.configs.KernelConfig`,
and inputs checked the same way; the two backwards share the scales of their 16-bit
operands.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .configs import KernelConfig
from .layout import ColumnLayout, GuideMask
from .normalize import row_norms
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


class Segments(NamedTuple):
    """The column layout's segments as every kernel takes them: one tuple argument of
    runtime integers (``seg.n_cols`` and so on in the kernels), so that a rule added to
    the layout is one field here rather than a parameter in each kernel's list.
    :class:`~fastcl.ops.layout.ColumnLayout` says what each one means."""

    n_cols: int
    n_grad_cols: int
    hard_start: int
    n_hard: int
    n_hard_blocks: int
    gauss_start: int
    self_start: int
    n_self: int


class Switches(NamedTuple):
    """The compile-time switches of a launch: one ``tl.constexpr`` tuple argument (``SW``
    in the kernels). Each feature of the layout a call does not use is compiled out, and
    the accumulator and the product precision follow the input dtype.

    HARD_BLOCKS: K > 1 hard negatives per row; HARDNESS: the penalty's mode (0 when it
    adds nothing); MARGIN: per-row false-negative thresholds are given; GUIDED: the guide
    rule (a GuideMask) is given; EMPTY_ROWS: a row may have every entry masked (under the
    margin or the guide, or when a -inf weight masks the own hard negatives), so its
    softmax must be read as 0."""

    HAS_TARGETS: bool
    HARD_WEIGHTED: bool
    GAUSS_WEIGHTED: bool
    EXCLUDE_SELF: bool
    GROUPED: bool
    NORMALIZED: bool
    ACC_FP64: bool
    PRECISION: str
    UPCAST: bool
    HARD_BLOCKS: bool
    HARDNESS: int
    MARGIN: bool
    GUIDED: bool
    EMPTY_ROWS: bool


def layout_switches(dtype: torch.dtype, targets: torch.Tensor | None, layout: ColumnLayout, grouped: bool,
                    normalized: bool, margin: bool = False, guided: bool = False) -> Switches:
    """The :class:`Switches` of a launch. ``margin``: per-row false-negative thresholds
    are given; ``guided``: the guide rule is."""
    hard_masked = layout.n_hard > 0 and layout.log_hard_weight == float("-inf")
    return Switches(
        HAS_TARGETS=targets is not None,
        HARD_WEIGHTED=layout.hard_weighted,
        GAUSS_WEIGHTED=layout.gauss_weighted,
        EXCLUDE_SELF=layout.n_self > 0,
        GROUPED=grouped,
        NORMALIZED=normalized,
        ACC_FP64=accumulator_dtype(dtype) == torch.float64,
        PRECISION=dot_precision(dtype),
        UPCAST=upcast_for_interpreter(dtype),
        HARD_BLOCKS=layout.n_hard > 0 and layout.n_hard_blocks > 1,
        HARDNESS=layout.hardness_mode if layout.penalized else 0,
        MARGIN=margin,
        GUIDED=guided,
        EMPTY_ROWS=margin or guided or hard_masked,
    )


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


class TileInputs(NamedTuple):
    """q, k and what every kernel that forms logit tiles reads with them: one tuple
    argument (``ins`` in the kernels). Inputs a call does not use hold a placeholder that
    nothing reads (the switch that would read it is off)."""

    q: torch.Tensor
    k: torch.Tensor
    params: torch.Tensor  # [1/tau, log hard weight, log Gaussian weight(, row weight)], accumulator dtype
    targets: torch.Tensor  # int64 target column per row (HAS_TARGETS)
    row_groups: torch.Tensor  # int32 group ids of the rows and of the gradient columns (GROUPED)
    key_groups: torch.Tensor
    q_norm: torch.Tensor  # L2 norms of the rows of q and k (NORMALIZED)
    k_norm: torch.Tensor
    scalars: torch.Tensor  # [eps of the normalization, hardness strength], accumulator dtype
    thresholds: torch.Tensor  # the rows' false-negative thresholds (MARGIN), accumulator dtype
    guide_rows: torch.Tensor  # GUIDED: the guide's unit rows of q (N x Dg) and of the first
    guide_cols: torch.Tensor  # n_guide_cols columns, and its thresholds, accumulator dtype
    guide_thresholds: torch.Tensor
    n_rows: int
    dim: int
    stride_q: int
    stride_k: int
    n_guide_cols: int
    guide_dim: int


def tile_inputs(q: torch.Tensor, k: torch.Tensor, params: torch.Tensor, targets: torch.Tensor | None,
                layout: ColumnLayout, groups: tuple[torch.Tensor, torch.Tensor] | None,
                normalize_eps: float | None, thresholds: torch.Tensor | None,
                guide: GuideMask | None = None) -> tuple[TileInputs, Segments, Switches]:
    """Check a launch's inputs and gather what its kernels take: the :class:`TileInputs`,
    the layout's :class:`Segments` and the :class:`Switches`. The scalars ``[eps,
    hardness strength]`` travel as a tensor in the accumulator dtype, read from memory (a
    Python float would reach the GPU as fp32); the rows' norms are computed here when
    the kernels normalize; the guide's rows (``guide``, a
    :class:`~fastcl.ops.layout.GuideMask`, or None) are made contiguous."""
    check_rows_contiguous(q, k)
    acc = accumulator_dtype(q.dtype)
    thresholds = checked_thresholds(thresholds, q.shape[0], acc, q.device)
    scalars = eps_tensor(normalize_eps, acc, q.device, 2)
    if layout.penalized:
        scalars[1] = layout.hardness_strength
    normalized = normalize_eps is not None
    q_norm, k_norm = (row_norms(q), row_norms(k)) if normalized else (scalars, scalars)
    row_groups, key_groups = groups if groups is not None else (scalars, scalars)
    guide_rows, guide_cols, guide_thresholds = (
        (checked_guide_tensor(guide.rows, (q.shape[0], None), acc, q.device, "guide.rows"),
         checked_guide_tensor(guide.cols, (None, guide.rows.shape[1]), acc, q.device, "guide.cols"),
         checked_thresholds(guide.thresholds, q.shape[0], acc, q.device))
        if guide is not None else (scalars, scalars, scalars))
    inputs = TileInputs(q, k, params, targets if targets is not None else scalars, row_groups, key_groups, q_norm,
                        k_norm, scalars, thresholds if thresholds is not None else scalars, guide_rows, guide_cols,
                        guide_thresholds, q.shape[0], q.shape[1], q.stride(0), k.stride(0),
                        guide_cols.shape[0] if guide is not None else 0,
                        guide_rows.shape[1] if guide is not None else 0)
    segments = Segments(layout.n_cols, layout.n_grad_cols, layout.hard_start, layout.n_hard, layout.n_hard_blocks,
                        layout.gauss_start, layout.self_start, layout.n_self)
    switches = layout_switches(q.dtype, targets, layout, groups is not None, normalized, thresholds is not None,
                               guide is not None)
    return inputs, segments, switches


def checked_guide_tensor(x: torch.Tensor, shape: tuple, acc: torch.dtype, device: torch.device,
                         name: str) -> torch.Tensor:
    """A guide tensor as the kernels read it (contiguous rows, accumulator dtype; the
    kernels use its width as the row stride); a ValueError names a wrong shape or
    device (None in ``shape``: any size)."""
    if x.dim() != 2 or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        raise ValueError(f"{name} must be 2-D of shape {shape} (None: any), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {x.device}")
    return x.detach().to(acc).contiguous()


def extra_rules(switches: Switches) -> bool:
    """Whether a launch compiles rules beyond the default loss (normalization, targets):
    weighted hard or Gaussian columns, the own column left out, groups, K hard-negative
    blocks, the hardness penalty, the margin, the guide. The kernels hold more values per
    logit then, and take the configurations made for that (fastcl.ops.configs,
    ``rules``)."""
    return bool(switches.HARD_WEIGHTED or switches.GAUSS_WEIGHTED or switches.EXCLUDE_SELF or switches.GROUPED
                or switches.HARD_BLOCKS or switches.HARDNESS or switches.MARGIN or switches.GUIDED)


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
