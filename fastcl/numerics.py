"""Accepted ranges of the loss's numeric arguments, and rows of extreme magnitude.

Every backend accumulates in float32 (float64 for float64 inputs). Three things can
leave that range before any kernel runs, and are handled here, identically for every
backend:

- ``temperature``: the logits reach 1/tau, and a learnable temperature's gradient
  carries 1/tau^2. A temperature below :data:`MIN_TEMPERATURE` is refused.
- ``eps``: a row below eps is divided by eps (as ``F.normalize`` does); 1/eps must be
  finite with room to spare, and rows that get rescaled (below) must stay above it, so
  eps must lie in :data:`EPS_RANGE`.
- rows whose squared norm (or dot products) could overflow the accumulator (float32 and
  bfloat16 rows whose largest entry exceeds sqrt(3.4e38 / (16 D)), 1.7e17 at D = 768;
  float64 above 1.2e152 there), or whose squares could underflow it (largest entry
  below 2^-50 in float32 while the norm is above eps): with ``normalize=True`` the loss
  depends on each row only through its direction, so such a row is multiplied by a
  power of two that brings its largest entry into [2, 4) (just above eps, for eps above
  1). That is exact (no rounding), the loss is unchanged, and autograd carries the same
  power of two into the row's gradient. With ``normalize=False`` the logits themselves
  would overflow, and the call is refused.

The magnitudes are read in the one device sync of the value checks (``check_finite``);
``check_finite=False`` (and torch.compile, which cannot hold a sync) skips them, so the
caller then vouches that every row is within range.
"""

from __future__ import annotations

import math
import numbers

import torch

from .ops.utils import accumulator_dtype

#: Smallest accepted temperature. The logits reach 1/tau, and the logit gradient between
#: two rows below eps reaches 1 / (tau eps^2) inside every backend's float32 arithmetic:
#: with tau >= 1e-6 and eps >= 1e-15 that stays below 1e36 (float32 reaches 3.4e38), and
#: a learnable temperature's gradient, which carries 1/tau^2, below 1e12 times its sum.
MIN_TEMPERATURE = 1e-6

#: Accepted eps of the normalization, [low, high]. Low: a row below eps is divided by eps
#: (see MIN_TEMPERATURE), and dot products of rows near eps (eps^2 >= 1e-30) stay normal
#: float32 numbers. High: rows rescaled above eps (module docstring) keep squares far
#: inside float32's range.
EPS_RANGE = (1e-15, 1e15)


def check_real(name: str, value) -> float:
    """A real Python / NumPy number (not a bool, not a tensor), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_eps(eps) -> None:
    value = check_real("eps", eps)
    low, high = EPS_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"eps must be a finite number in [{low:g}, {high:g}], got {eps!r}")


def check_temperature_float(temperature) -> None:
    value = check_real("temperature", temperature)
    if not (math.isfinite(value) and value >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (1/temperature scales "
                         f"the logits), got {temperature!r}")


def temperature_tensor_ok(temperature: torch.Tensor) -> torch.Tensor:
    """One device boolean: the tensor temperature is finite and >= MIN_TEMPERATURE."""
    t = temperature.detach().reshape(()).double()
    return torch.isfinite(t) & (t >= MIN_TEMPERATURE)


TEMPERATURE_TENSOR_MESSAGE = (f"temperature must be a finite number >= {MIN_TEMPERATURE:g} "
                              "(1/temperature scales the logits)")


def check_flag(name: str, value) -> None:
    """A switch must be a bool: a string such as "False" would otherwise count as true."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, bool) and not numpy_bool:
        raise TypeError(f"{name} must be True or False, got {value!r}")


def safe_row_range(dtype: torch.dtype, dim: int) -> tuple[float, float]:
    """(low, high): rows whose largest |entry| lies in [low, high] have squares, norms and
    dot products well inside the accumulator's range (no overflow, no underflow into
    subnormals). float16 rows always do (their entries stay within 6e-8 .. 65504)."""
    info = torch.finfo(accumulator_dtype(dtype))
    high = math.sqrt(info.max / (16 * dim))
    low = math.sqrt(info.tiny) * 2.0 ** 13
    return low, high


class RowMagnitudes:
    """Per-row largest |entry| of one input, and the device scalars the one value sync
    reads: the largest row maximum (NaN or inf when any entry is) and, only when eps is
    small enough for it to matter, the smallest row maximum of the rows that can exceed
    eps (with eps at its default no row can be both above eps and in danger of
    underflow, and the check costs nothing)."""

    def __init__(self, x: torch.Tensor, eps: float):
        # ord=inf: max |x| per row without an N x D temporary; NaN if the row holds a NaN.
        # (no_grad rather than a detached view, which would share, and pin, x's storage.)
        with torch.no_grad():
            self.row_max = torch.linalg.vector_norm(x, ord=math.inf, dim=1)
        self.low, self.high = safe_row_range(x.dtype, x.shape[1])
        m = self.row_max if self.row_max.dtype == torch.float64 else self.row_max.float()
        if m.numel() == 0:  # no rows (an empty queue of extra negatives)
            m = m.new_zeros(1)
        parts = [m.amax()]
        floor = eps / math.sqrt(x.shape[1])  # a row can exceed eps only if its max does
        self.checks_small = floor < self.low
        if self.checks_small:
            parts.append(torch.where(m > floor, m, torch.full_like(m, math.inf)).amin())
        self.scalars = [t.double() for t in parts]

    def judge(self, values: list[float]) -> tuple[bool, bool]:
        """(finite, some row outside the safe range) from the synced ``scalars``."""
        largest = values[0]
        smallest = values[1] if self.checks_small else math.inf
        return math.isfinite(largest), largest > self.high or smallest < self.low


def logits_overflow(largest: float, dim: int, dtype: torch.dtype, temperature: float) -> bool:
    """Without normalization: whether a logit q.k / tau can reach a quarter of the
    accumulator's largest value (|q.k| <= D max|q| max|k|, ``largest`` the largest |entry|)."""
    return dim * largest * largest / temperature > torch.finfo(accumulator_dtype(dtype)).max / 4


def rescale_rows(x: torch.Tensor, row_max: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` with every row outside the safe range (:func:`safe_row_range`) whose norm
    exceeds eps multiplied by a power of two that brings its largest |entry| into
    [2^t, 2^(t+1)), t = 1 or, for eps above 1, the first t with 2^t >= 2 eps (so the
    rescaled row stays above eps). Exact, and differentiable (the same power of two
    scales the row's gradient). Rows below eps are left alone: F.normalize divides them
    by eps, not by their norm."""
    low, high = safe_row_range(x.dtype, x.shape[1])
    m = row_max.detach().double()
    outside = (m > high) | ((m < low) & (m > 0))
    target = max(1, math.ceil(math.log2(eps)) + 1)
    exponent = torch.where(outside, torch.floor(torch.log2(torch.where(outside, m, 1.0))) - target, 0.0)
    # 2^-exponent in two factors, each representable in x's dtype (one factor would
    # overflow float32 for rows of subnormal entries).
    first = torch.floor(-exponent / 2)
    second = -exponent - first
    scaled = x * torch.exp2(first).to(x.dtype)[:, None] * torch.exp2(second).to(x.dtype)[:, None]
    # A tiny row is rescaled only if its norm exceeds eps: F.normalize divides a row below
    # eps by eps, so scaling it would change its value. Its scaled norm tells (exactly).
    norm_scaled = torch.linalg.vector_norm(scaled.detach(), dim=1, dtype=torch.float64)
    above_eps = norm_scaled * torch.exp2(exponent) > eps
    keep = (m < low) & ~above_eps
    return torch.where(keep[:, None], x, scaled)
