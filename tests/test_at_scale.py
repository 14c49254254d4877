"""The kernels at real sizes (GPU) and the same check at small sizes (CPU interpreter).

The oracle at scale is the chunked PyTorch backend in float64 on the very same (rounded)
inputs: it is held to the dense reference at 1e-10 in test_kernels.py, and unlike the
dense reference it fits in memory at N = 65536. Errors are ||out - ref|| / ||ref|| over
the loss and every gradient, against the tolerances of docs/design.md section 5.

On the H100:  python -m pytest tests/test_at_scale.py -m gpu -v
"""

import pytest
import torch

from fastcl import info_nce

from .conftest import DEVICE
from .helpers import relative_error

# fp32 "highest" runs full fp32 products; "high" allows tf32 (docs/design.md section 5: ~3e-4).
TOLERANCE = {
    ("bf16", "highest"): 2e-2,
    ("fp16", "highest"): 5e-3,
    ("fp32", "highest"): 1e-5,
    ("fp32", "high"): 2e-3,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def loss_scale(dtype_name: str, n: int) -> float:
    """What the loss is multiplied by before the backward, as fp16 training's GradScaler
    does. The gradients of a mean over N rows shrink as 1/N (a hard negative's as
    N^-1.5): at N = 65536 they lie below float16's smallest normal number (6e-5), so the
    stored fp16 gradients lose their digits whatever computes them. A scale of 2^16 N,
    which a GradScaler grows to, keeps the largest gradient entries near 2e3 and the
    smallest in range. bf16 and fp32 have fp32's exponent range and need none."""
    return float(n << 16) if dtype_name == "fp16" else 1.0

CASES = {
    "unsupervised": dict(),
    "supervised": dict(hard=True, hard_negative_weight=2.0),
    "everything": dict(hard=True, hard_negative_weight=0.5, extra=True, gaussian_negatives=128,
                       gaussian_weight=0.7, learnable_tau=True),
    "symmetric": dict(symmetric=True, learnable_tau=True),
}


def check_at_scale(n: int, d: int, dtype_name: str, precision: str, case: str, device, backend="triton"):
    options = dict(CASES[case])
    hard, extra, learnable_tau = options.pop("hard", False), options.pop("extra", False), options.pop("learnable_tau", False)
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(n)
    inputs = [torch.randn(n, d, device=device, dtype=dtype, generator=gen) for _ in range(3 if hard else 2)]
    queue = torch.randn(max(n // 4, 1), d, device=device, dtype=dtype, generator=gen) if extra else None

    scale = loss_scale(dtype_name, n)

    def loss_and_grads(xs, q, backend_name):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        tau = torch.tensor(0.05, dtype=torch.float32 if xs[0].dtype != torch.float64 else torch.float64,
                           device=device, requires_grad=True) if learnable_tau else 0.05
        loss = info_nce(*leaves[:2], leaves[2] if hard else None, q, temperature=tau, backend=backend_name,
                        generator=torch.Generator(device=device).manual_seed(1), **options)
        wrt = leaves + ([tau] if learnable_tau else [])
        return [loss.detach()] + list(torch.autograd.grad(loss * scale, wrt))

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours = loss_and_grads(inputs, queue, backend)
    finally:
        torch.set_float32_matmul_precision(previous)
    ref = loss_and_grads([x.double() for x in inputs], queue.double() if queue is not None else None, "torch")
    names = ["loss", "anchors", "positives", "hard_negatives"][: 1 + len(inputs)] + (["temperature"] if learnable_tau else [])
    tol = TOLERANCE[(dtype_name, precision)]
    errors = {name: relative_error(o, r) for name, o, r in zip(names, ours, ref)}
    assert all(e <= tol for e in errors.values()), f"relative errors {errors} exceed {tol:g}"
    return errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real sizes below")
@pytest.mark.parametrize("strategy", ["slab", "workspace"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype_name, precision", [("bf16", "highest"), ("fp32", "highest")])
def test_scale_check_on_cpu(case, dtype_name, precision, strategy, monkeypatch):
    monkeypatch.setenv("FASTCL_BACKWARD", strategy)
    check_at_scale(45, 20, dtype_name, precision, case, DEVICE)


# Ordered for a run cut at its time budget (the GPU runner's): the strategy varies
# fastest, then the dtype, then the case (the one with every option first), then N
# (largest first), so the first minutes cover every strategy and dtype at N = 65536.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["workspace", "one_pass", "slab"])
@pytest.mark.parametrize("dtype_name, precision", list(TOLERANCE))
@pytest.mark.parametrize("case", ["everything", "symmetric", "supervised", "unsupervised"])
@pytest.mark.parametrize("n", [65536, 16384, 4096])
def test_real_sizes_on_gpu(strategy, n, dtype_name, precision, case, monkeypatch):
    # Large chunks keep the float64 oracle's cuBLAS products efficient (2 GiB of logits).
    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", str(1 << 28))
    monkeypatch.setenv("FASTCL_BACKWARD", strategy)
    errors = check_at_scale(n, 768, dtype_name, precision, case, DEVICE)
    print(f"N={n} D=768 {dtype_name}/{precision} {case} {strategy}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
