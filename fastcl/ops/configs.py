"""Launch configurations of every kernel, in one place.

Three sources, in order:

1. an override (``override_config``: tests, and the tuner while it measures);
2. a tuned table for the GPU's architecture, ``tuned/sm90.json`` and the like, written by
   ``benchmarks/tune.py`` from measurements on that GPU (the entry for the smallest tuned
   D >= the actual D is used, else the largest);
3. the defaults below: first choices checked only by compiling for sm_90a with a real
   launch's alignment (no register spills, shared memory within the H100's 227 KB;
   ``python -m fastcl.ops.compile_report --check``), not yet timed on a GPU.

Launches with rules beyond the default loss (weighted hard or Gaussian columns, the own
column left out, groups, K hard-negative blocks, the hardness penalty, the margin, the
guide; ``rules=True``, launch.extra_rules) hold more values per logit and spill at the
default loss's tiles, so they take their own defaults, and no tuned entry (the tuner
measures the default loss).

Under the Triton interpreter every kernel takes one small configuration: the
interpreter's cost is per tile, and small blocks make ragged test sizes span several
tiles in every direction.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .utils import interpreting

#: The kernels that take a configuration.
KERNELS = ("forward", "backward_dq", "backward_dk", "backward_ds", "one_pass_logits")

TUNED_DIR = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options of one kernel.

    BLOCK_M / BLOCK_N: rows (queries) and columns (candidates) of a logit tile.
    BLOCK_D: step of the contraction over the embedding dimension.
    BLOCK_D_OUT: width of the gradient slab one backward program owns (the backward
    splits D across programs so that its accumulator fits in registers; the forward
    ignores it).
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_D_OUT: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict:
        return asdict(self)


_INTERPRETER = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, BLOCK_D_OUT=16, num_warps=1, num_stages=1)


def _c(bm: int, bn: int, bd: int, bd_out: int, warps: int, stages: int) -> KernelConfig:
    return KernelConfig(bm, bn, bd, bd_out, num_warps=warps, num_stages=stages)


#: (kernel, dtype family) -> (the default loss's configuration, the one with more rules).
#: Each a large tile that compiles for sm_90a without spills in the option sets it serves
#: (compile_report's "plain" and "normalized"; "all" and "family"), for bfloat16 and
#: float16, and for fp32 in tf32 and in full precision alike. The one pass's logits kernel
#: keeps each entry's similarity live beside its logit (the temperature's row sums) and
#: stores the logits, so it takes smaller tiles than the forward (128 x 128 spilled 392
#: bytes per thread).
_DEFAULTS = {
    ("forward", "half"): (_c(128, 128, 64, 64, 8, 3), _c(128, 64, 32, 64, 8, 3)),
    ("forward", "fp32"): (_c(128, 64, 32, 64, 8, 3), _c(64, 64, 32, 64, 8, 3)),
    ("backward_ds", "half"): (_c(128, 128, 64, 64, 8, 3), _c(64, 128, 64, 64, 8, 3)),
    ("backward_ds", "fp32"): (_c(128, 64, 32, 64, 8, 3), _c(64, 64, 32, 64, 8, 3)),
    ("backward_dq", "half"): (_c(64, 64, 64, 256, 8, 2), _c(64, 32, 64, 128, 8, 2)),
    ("backward_dq", "fp32"): (_c(32, 64, 32, 128, 8, 2), _c(32, 32, 32, 256, 8, 2)),
    ("one_pass_logits", "half"): (_c(128, 64, 64, 64, 8, 3), _c(64, 32, 64, 64, 8, 3)),
    ("one_pass_logits", "fp32"): (_c(64, 64, 32, 64, 8, 3), _c(64, 32, 32, 64, 8, 3)),
}
_DEFAULTS[("backward_dk", "half")] = _DEFAULTS[("backward_dq", "half")]
_DEFAULTS[("backward_dk", "fp32")] = _DEFAULTS[("backward_dq", "fp32")]
#: float64 products run on the FMA / DMMA units at small tiles, in every kernel.
_FP64 = _c(32, 32, 16, 32, 4, 1)

_override: dict[str, KernelConfig] | None = None


@contextlib.contextmanager
def override_config(config: KernelConfig | dict[str, KernelConfig]):
    """Run kernels launched inside the block with ``config``: one config for every
    kernel, or a dict kernel name -> config (kernels not named keep their usual one)."""
    global _override
    previous = _override
    _override = dict.fromkeys(KERNELS, config) if isinstance(config, KernelConfig) else dict(config)
    try:
        yield
    finally:
        _override = previous


def dtype_family(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "fp32"
    return "half"


def _fit_d_out(config: KernelConfig, dim: int) -> KernelConfig:
    """Never make the gradient slab wider than D rounded up to a power of two (>= 16)."""
    width = max(16, min(config.BLOCK_D_OUT, 1 << max(dim - 1, 0).bit_length()))
    return replace(config, BLOCK_D_OUT=width)


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def _tuned_table(arch: str) -> dict:
    path = TUNED_DIR / f"{arch}.json"
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)["configs"]


def _tuned(kernel: str, dtype: torch.dtype, dim: int, device: torch.device | None) -> KernelConfig | None:
    if device is None or device.type != "cuda":
        return None
    entries = _tuned_table(_arch(device.index if device.index is not None else torch.cuda.current_device()))
    by_dim = entries.get(kernel, {}).get(dtype_family(dtype), {})
    if not by_dim:
        return None
    dims = sorted(int(d) for d in by_dim)
    chosen = next((d for d in dims if d >= dim), dims[-1])
    return KernelConfig(**by_dim[str(chosen)])


def kernel_config(kernel: str, dtype: torch.dtype, dim: int, device: torch.device | None = None,
                  rules: bool = False) -> KernelConfig:
    """The configuration ``kernel`` (one of :data:`KERNELS`) launches with; ``rules``: the
    launch compiles rules beyond the default loss (launch.extra_rules)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if _override is not None and kernel in _override:
        return _override[kernel]
    if interpreting():
        return _INTERPRETER
    config = None if rules else _tuned(kernel, dtype, dim, device)
    if config is None:
        family = dtype_family(dtype)
        config = _FP64 if family == "fp64" else _DEFAULTS[(kernel, family)][1 if rules else 0]
    # Only the slab kernels own a gradient slab.
    return _fit_d_out(config, dim) if kernel in ("backward_dq", "backward_dk") else config


#: Backward strategies of the Triton backend: "slab" (infonce_bwd_slab.py: two kernels, the
#: similarity recomputed once per D slab), "workspace" (infonce_bwd_workspace.py: logit
#: gradients of a chunk of rows in a capped buffer, then two matrix products) and
#: "one_pass" (infonce_one_pass.py: for a loss reduced to a scalar, the gradients formed
#: in the forward; fastcl/backends.py decides where it applies).
BACKWARD_STRATEGIES = ("slab", "workspace", "one_pass")


def backward_strategy(dtype: torch.dtype, dim: int, device: torch.device | None = None, grouped: bool = False) -> str:
    """Which backward the Triton backend runs: ``FASTCL_BACKWARD`` if set; else "slab"
    with groups (its kernels skip tiles without a common group, where the workspace's
    matrix products would run over every column) or when one slab spans D (nothing is
    recomputed), and "workspace" when D needs several slabs. The default is a first
    choice by operation count, not yet timed on a GPU."""
    import os

    chosen = os.environ.get("FASTCL_BACKWARD", "")
    if chosen:
        if chosen not in BACKWARD_STRATEGIES:
            raise ValueError(f"FASTCL_BACKWARD must be one of {BACKWARD_STRATEGIES}, got {chosen!r}")
        if chosen != "one_pass":  # a call the one pass does not apply to recomputes as by default
            return chosen
    if grouped:
        return "slab"
    slab = kernel_config("backward_dq", dtype, dim, device).BLOCK_D_OUT
    return "slab" if dim <= slab else "workspace"


#: The native one pass's blocks: rows per chunk and columns per tile (with groups,
#: smaller blocks skip more: a block is skipped only when none of its rows shares a group
#: with any of its columns). FASTCL_CPU_TILE_ROWS / FASTCL_CPU_TILE_COLS override both.
ONE_PASS_CPU_ROWS, ONE_PASS_CPU_COLS = 256, 512
ONE_PASS_GROUPED_ROWS, ONE_PASS_GROUPED_COLS = 64, 64
#: Fewer rows per chunk than this make the dk product (a rank-R update of dk per chunk)
#: bound by memory traffic: the plan recomputes instead.
ONE_PASS_MIN_ROWS = 16
#: Strip elements per thread always allowed (the recomputing kernel holds two 256 x 512
#: blocks per thread, 2^18 elements).
ONE_PASS_STRIP_FLOOR = 1 << 18


def _env_int(name: str) -> int | None:
    import os

    value = os.environ.get(name, "")
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def one_pass_cpu_blocks(n_rows: int, n_cols: int, n_grad_cols: int, dim: int, threads: int,
                        grouped: bool) -> tuple[int, int]:
    """Rows per chunk and columns per tile of the native one-pass kernel.

    256 x 512 blocks (512 KiB in fp32) stay in a core's L2 while the softmax runs on
    them and keep BLAS near its peak; at least one chunk per thread. Each thread holds a
    strip of ``rows x M`` logits (the chunk's, until its gradient products are done) and
    ``rows x D`` scaled rows; ``rows`` is capped so that the strips of all threads hold no
    more than the gradients themselves, ``(N + n_grad_cols) D`` values, or ``2^18``
    values per thread (what the recomputing kernel's blocks take): the extra memory of
    the one pass stays within twice the recomputing path's. With groups a strip holds
    only the tiles a chunk visits, a few sequences' columns, and is not capped.
    """
    rows = _env_int("FASTCL_CPU_TILE_ROWS")
    cols = _env_int("FASTCL_CPU_TILE_COLS") or (ONE_PASS_GROUPED_COLS if grouped else ONE_PASS_CPU_COLS)
    if rows is not None:
        return rows, cols
    threads = max(threads, 1)
    rows = min(ONE_PASS_GROUPED_ROWS if grouped else ONE_PASS_CPU_ROWS, max(ONE_PASS_MIN_ROWS, -(-n_rows // threads)))
    if not grouped:
        budget = max(ONE_PASS_STRIP_FLOOR, (n_rows + n_grad_cols) * dim // threads)
        rows = min(rows, budget // (n_cols + dim))
    return max(1, min(rows, n_rows)), cols
