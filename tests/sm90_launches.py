"""Bind every Triton launch as a GPU would, and compile it for sm_90a, without a GPU.

Run as a script without TRITON_INTERPRET (tests/test_sm90_compile.py does). The
launchers run on small CPU tensors with their kernels replaced by recorders; each
recorded launch then goes through Triton's own runtime binder (the code that turns a
launch's arguments into a signature on a GPU: tuple arguments, specializations,
constexprs) and is compiled for sm_90a. This catches what the interpreter cannot: a
launch whose arguments the GPU binder rejects, or a kernel that does not compile with
them. Prints one line per compiled launch: ``kernel variant``.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastcl.ops import infonce_bwd_slab, infonce_bwd_workspace, infonce_fwd, infonce_one_pass
from fastcl.ops.layout import HARDNESS_IN_BATCH, ColumnLayout, GuideMask

MODULES = (infonce_fwd, infonce_bwd_slab, infonce_bwd_workspace, infonce_one_pass)
TARGET = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn: JITFunction, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record(variant: str, launches: list) -> None:
    """Run every launcher once for ``variant`` (its kernels recorded, not run)."""
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[
        variant.split("/")[0]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, k_blocks, dim = 48, 2, 96
    params = torch.tensor([20.0, 0.3, 0.0], dtype=acc)
    if variant.endswith("family"):  # K hard blocks, the penalty, the margin and the guide
        layout = ColumnLayout(n_cols=n * (1 + k_blocks), n_grad_cols=n * (1 + k_blocks), hard_start=n, n_hard=n,
                              gauss_start=n * (1 + k_blocks), log_hard_weight=0.3, n_hard_blocks=k_blocks,
                              hardness_mode=HARDNESS_IN_BATCH, hardness_strength=0.5)
        thresholds, targets = torch.full((n,), 0.9, dtype=acc), None
        unit = torch.nn.functional.normalize
        guide = GuideMask(unit(torch.randn(n, 40, dtype=acc), dim=-1),
                          unit(torch.randn(layout.n_grad_cols, 40, dtype=acc), dim=-1),
                          torch.full((n,), 0.5, dtype=acc))
    else:
        layout, thresholds, targets, guide = ColumnLayout.plain(n), None, torch.arange(n), None
    q = torch.randn(n, dim, dtype=dtype)
    k = torch.randn(layout.n_cols, dim, dtype=dtype)
    lse, grad_rows = torch.zeros(n, dtype=acc), torch.ones(n, dtype=acc)
    common = dict(normalize_eps=1e-12, thresholds=thresholds, guide=guide)
    infonce_fwd.infonce_forward(q, k, params, targets, layout, **common)
    infonce_bwd_slab.infonce_backward_slab(q, k, params, targets, layout, lse, grad_rows, **common)
    infonce_bwd_workspace.infonce_backward_workspace(q, k, params, targets, layout, lse, grad_rows, **common)
    infonce_one_pass.infonce_forward_grad(q, k, params, targets, layout, 1.0 / n, **common)


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict):
    """Bind a recorded launch with Triton's runtime binder and compile it for sm_90a."""
    kwargs = dict(kwargs)
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def main(variants: list[str]) -> int:
    launches: list = []
    originals = {}
    for module in MODULES:
        for name, value in vars(module).items():
            if isinstance(value, JITFunction):
                originals[(module, name)] = value
                setattr(module, name, Recorder(value, launches))
    recorded = []
    try:
        for variant in variants:
            start = len(launches)
            record(variant, launches)
            recorded += [(variant, launch) for launch in launches[start:]]
    finally:  # the compiler reads the kernels' module globals: put the kernels back first
        for (module, name), value in originals.items():
            setattr(module, name, value)
    for variant, (fn, args, kwargs) in recorded:
        compile_launch(fn, args, kwargs)
        print(fn.__name__, variant, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["bf16/plain", "fp16/family", "fp32/family", "fp64/plain"]))
