"""The tensor arguments of a loss call, checked before any kernel runs.

Shapes, dtypes and devices first (no device work); then, in one device sync, the values:
non-finite entries, a tensor temperature's range, labels in range and rows of extreme
magnitude (fastcl/numerics.py). Every failure is a TypeError or ValueError that names
the argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .numerics import MIN_TEMPERATURE, TEMPERATURE_TENSOR_MESSAGE, RowMagnitudes, logits_overflow, rescale_rows
from .ops.utils import SUPPORTED_DTYPES


class Inputs(NamedTuple):
    """A call's rows after the checks: rows of extreme magnitude rescaled exactly when
    the loss normalizes (fastcl/numerics.py), otherwise the tensors given."""

    anchors: torch.Tensor
    positives: torch.Tensor
    hard_negatives: torch.Tensor | None
    extra_negatives: torch.Tensor | None
    labels: torch.Tensor | None
    groups: torch.Tensor | None


def check_matrix(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x embedding dim), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_index_vector(name: str, x, n: int, device: torch.device, what: str) -> None:
    """A 1-D integer tensor with one entry per anchor, on the anchors' device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor with one {what} per anchor ({n}), got {shape}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} are on {x.device} but anchors are on {device}")


def check_inputs(options, anchors, positives, hard_negatives=None, extra_negatives=None, labels=None, groups=None,
                 names: tuple[str, str] = ("anchors", "positives")) -> Inputs:
    """Shapes, dtypes and devices; then, in one device sync, the values. ``options`` are
    the call's checked :class:`~fastcl.plan.LossOptions`; ``names`` what the first two
    inputs are called in messages (NT-Xent calls them z1 and z2)."""
    first, second = names
    check_matrix(first, anchors)
    n, d = anchors.shape
    if n == 0 or d == 0:
        raise ValueError(f"empty batch: {first} has shape {tuple(anchors.shape)}; "
                         "need at least one row and one column")
    named = [(first, anchors), (second, positives)]
    k_blocks = 0
    if hard_negatives is not None:
        if isinstance(hard_negatives, torch.Tensor) and hard_negatives.dim() == 3:
            # N x K x D: K hard negatives per anchor, checked as their N K rows.
            if hard_negatives.shape[0] != n or hard_negatives.shape[1] == 0 or hard_negatives.shape[2] != d:
                raise ValueError(f"hard_negatives must be N x D or N x K x D (K >= 1 per anchor) with N x D the "
                                 f"shape of {first} {tuple(anchors.shape)}, got {tuple(hard_negatives.shape)}")
            k_blocks = hard_negatives.shape[1]
            named.append(("hard_negatives", hard_negatives.reshape(n * k_blocks, d)))
        else:
            k_blocks = 1
            named.append(("hard_negatives", hard_negatives))
    if extra_negatives is not None:
        named.append(("extra_negatives", extra_negatives))
    for name, x in named[1:]:
        check_matrix(name, x)
        paired = name != "extra_negatives" and not (name == "hard_negatives" and k_blocks > 1)
        if paired and x.shape != anchors.shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(anchors.shape)} "
                             f"(row i pairs with row i), got {tuple(x.shape)}")
        if x.shape[1] != d:
            raise ValueError(f"{name} has embedding dim {x.shape[1]}, {first} have {d}")
        if x.device != anchors.device:
            raise ValueError(f"{name} is on {x.device} but {first} are on {anchors.device}")
        if x.dtype != anchors.dtype:
            raise TypeError(f"{name} is {x.dtype} but {first} are {anchors.dtype}; "
                            "cast them to one dtype")
    temperature = options.temperature
    if isinstance(temperature, torch.Tensor) and temperature.device != anchors.device:
        raise ValueError(f"temperature is on {temperature.device} but {first} are on {anchors.device}")

    n_cols = n + k_blocks * n
    n_cols += extra_negatives.shape[0] if extra_negatives is not None else 0
    if labels is not None:
        if options.symmetric:
            raise ValueError("labels are not supported with symmetric=True: the column direction "
                             "pairs positive i with anchor i")
        if tuple(options.directions) != ("query_to_doc",):
            raise ValueError(f"labels are not supported with directions={tuple(options.directions)}: a label picks "
                             "a query_to_doc column, and the other directions pair positive i with anchor i")
        if groups is not None:
            raise ValueError("labels are not supported with groups: each anchor's target is its "
                             "own positive, inside its group")
        _check_index_vector("labels", labels, n, anchors.device, "target column")
    if groups is not None:
        if k_blocks > 1:
            raise ValueError("groups are not supported with several hard negatives per anchor (N x K x D, K > 1): "
                             "pass one hard negative per row (N x D)")
        if set(options.directions) - {"query_to_doc", "doc_to_query"}:
            raise ValueError(f"groups are not supported with directions={tuple(options.directions)}: only "
                             "'query_to_doc' and 'doc_to_query' are scored within a group")
        _check_index_vector("groups", groups, n, anchors.device, "group id")

    rescaled = _check_values(options, named, labels, n_cols)
    if "hard_negatives" in rescaled:
        rescaled["hard_negatives"] = rescaled["hard_negatives"].reshape(hard_negatives.shape)
    return Inputs(rescaled.get(first, anchors), rescaled.get(second, positives),
                  rescaled.get("hard_negatives", hard_negatives), rescaled.get("extra_negatives", extra_negatives),
                  labels, groups)


def _check_values(options, named: list, labels, n_cols: int) -> dict[str, torch.Tensor]:
    """The value checks, in one device sync. Returns the inputs to use in place of the
    given ones, by name: with ``normalize``, those holding rows of extreme magnitude,
    rescaled exactly (fastcl/numerics.py); usually none."""
    anchors = named[0][1]
    if torch.compiler.is_compiling():
        return {}  # value checks would need a host sync, which a compiled graph cannot hold
    if anchors.device.type == "meta":
        return {}  # no values to check: shapes only (e.g. working out output sizes)
    eps, temperature = options.eps, options.temperature
    # Every value check becomes a scalar on the device; one transfer reads them all.
    scalars: list[torch.Tensor] = []
    magnitudes = {name: RowMagnitudes(x, eps) for name, x in named} if options.check_finite else {}
    for m in magnitudes.values():
        scalars += m.scalars
    if isinstance(temperature, torch.Tensor):
        scalars.append(temperature.detach().reshape(()).double())
    if labels is not None:
        # int64 first: unsigned dtypes have no comparison kernels, and n_cols may not fit
        # the labels' own dtype.
        wide = labels.to(torch.int64)
        scalars.append(((wide >= 0) & (wide < n_cols)).all().double())
    if not scalars:
        return {}
    values = torch.stack(scalars).tolist()
    outside, largest = [], 0.0
    for name, m in magnitudes.items():
        finite, out_of_range = m.judge(values[:len(m.scalars)])
        if not finite:
            raise ValueError(f"{name} contains NaN or infinite values")
        largest = max(largest, values[0])
        values = values[len(m.scalars):]
        if out_of_range:
            outside.append(name)
    tau = temperature
    if isinstance(temperature, torch.Tensor):
        tau = values.pop(0)
        if not (math.isfinite(tau) and tau >= MIN_TEMPERATURE):
            raise ValueError(f"{TEMPERATURE_TENSOR_MESSAGE}, got {tau}")
    if labels is not None and not values.pop(0):
        raise ValueError(f"labels must lie in [0, {n_cols}): positives, hard and extra negatives")
    if not options.normalize:
        if magnitudes and logits_overflow(largest, anchors.shape[1], anchors.dtype, tau):
            raise ValueError(f"the logits q.k / temperature can overflow {anchors.dtype}'s accumulator: "
                             "without normalization the inputs' magnitudes (and 1/temperature) must be smaller")
        return {}
    tensors = dict(named)
    return {name: rescale_rows(tensors[name], magnitudes[name].row_max, eps) for name in outside}
