"""Small helpers shared by the kernel launchers: dtypes, precision, interpreter mode."""

from __future__ import annotations

import os

import torch

#: Input dtypes the kernels accept. Integer, bool and complex inputs are rejected earlier.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # read while tracing: the graph keeps the number
def cpu_threads() -> int:
    """torch's intra-op thread count, which sizes the native kernel's blocks; a compiled
    graph holds the value it had when traced (a plain call would break the graph)."""
    return torch.get_num_threads()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics and matrix-product accumulators: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """Triton ``input_precision`` for a product of ``dtype`` operands.

    fp32 inputs follow ``torch.get_float32_matmul_precision()``: "highest" keeps full
    fp32 ("ieee"), "high" and "medium" allow tf32, exactly as cuBLAS does for torch.mm.
    Every other dtype multiplies exactly in its own precision ("ieee" is a no-op there).
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def eps_tensor(eps: float | None, acc: torch.dtype, device: torch.device, size: int = 1) -> torch.Tensor:
    """The normalization's eps as a one-element tensor in the accumulator dtype, for the
    kernels to read from memory: Triton passes a Python float as an fp32 scalar, which
    would round eps for float64 inputs (rows below eps are scaled by exactly 1 / eps).
    Filled on the device (no host copy, no sync); 0 when not normalizing. ``size`` > 1
    leaves room for more scalars after it (every entry starts as eps)."""
    return torch.full((size,), 0.0 if eps is None else eps, dtype=acc, device=device)


def upcast_for_interpreter(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot is silently wrong on bf16 operands (triton issue 11584):
    under the interpreter, bf16 tiles are upcast to fp32 before every product."""
    return interpreting() and dtype == torch.bfloat16
