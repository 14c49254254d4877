"""Launch configurations of every kernel, in one place.

The GPU entries are first choices checked only by compiling for sm_90a (no spills,
shared memory within the H100's 227 KB; see tests/test_sm90_compile.py): they have not
yet been timed on an H100. Tuning them by measurement is issue 3's work; change them
here and nowhere else.

Under the Triton interpreter every kernel takes one small configuration: the
interpreter's cost is per tile, and small blocks make ragged test sizes span several
tiles in every direction.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from .utils import interpreting


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options of one kernel.

    BLOCK_M / BLOCK_N: rows (queries) and columns (candidates) of a logit tile.
    BLOCK_D: step of the contraction over the embedding dimension.
    BLOCK_D_OUT: width of the gradient slab one backward program owns (the backward
    splits D across programs so that its accumulator fits in registers).
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_D_OUT: int
    num_warps: int
    num_stages: int


_INTERPRETER = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, BLOCK_D_OUT=16, num_warps=1, num_stages=1)

_override: KernelConfig | None = None


@contextlib.contextmanager
def override_config(config: KernelConfig):
    """Run every kernel launched inside the block with ``config`` (tests use this)."""
    global _override
    previous, _override = _override, config
    try:
        yield
    finally:
        _override = previous


def _fit_d_out(block_d_out: int, dim: int) -> int:
    """Never make the gradient slab wider than D rounded up to a power of two (>= 16)."""
    return max(16, min(block_d_out, 1 << max(dim - 1, 0).bit_length()))


def forward_config(dtype: torch.dtype, dim: int) -> KernelConfig:
    if _override is not None:
        return _override
    if interpreting():
        return _INTERPRETER
    if dtype == torch.float64:
        return KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, BLOCK_D_OUT=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return KernelConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, BLOCK_D_OUT=64, num_warps=8, num_stages=3)
    return KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, BLOCK_D_OUT=64, num_warps=8, num_stages=3)


def backward_config(dtype: torch.dtype, dim: int) -> KernelConfig:
    if _override is not None:
        return _override
    if interpreting():
        return _INTERPRETER
    if dtype == torch.float64:
        config = KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, BLOCK_D_OUT=32, num_warps=4, num_stages=2)
    elif dtype == torch.float32:
        config = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_D_OUT=128, num_warps=8, num_stages=2)
    else:
        config = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_D_OUT=256, num_warps=8, num_stages=2)
    return replace(config, BLOCK_D_OUT=_fit_d_out(config.BLOCK_D_OUT, dim))
