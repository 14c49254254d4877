"""Every fused backend against the float64 reference: every option, combined, at ragged sizes.

Without a GPU the "triton" backend runs the real kernels in Triton's interpreter (small
blocks, so ragged sizes span several tiles and several D slabs in every direction).
"""

import pytest
import torch

from fastcl import InfoNCELoss, info_nce
from fastcl.ops.configs import KernelConfig, override_config

from .helpers import NATIVE, Case, assert_close, relative_error, run_both

BASE = Case()  # N = 37, D = 24: not a multiple of any block size
CASES = {
    "plain": BASE,
    "n1": Case(n=1, d=5),
    "n1_hard_extra": Case(n=1, d=5, hard=True, n_extra=2),
    "d33": BASE.but(d=33),
    "d5": BASE.but(d=5),
    "hard": BASE.but(hard=True),
    "hard_weighted": BASE.but(hard=True, hard_weight=2.5),
    "extra": BASE.but(n_extra=7),
    "gaussian": BASE.but(gaussian=5),
    "gaussian_weighted": BASE.but(gaussian=5, gaussian_weight=0.6),
    "labels": BASE.but(labels=True, hard=True, n_extra=7),
    "symmetric": BASE.but(symmetric=True),
    "symmetric_all": BASE.but(symmetric=True, hard=True, hard_weight=3.0, n_extra=7, gaussian=5,
                              gaussian_weight=2.0),
    "learnable_tau": BASE.but(learnable_tau=True),
    "learnable_tau_symmetric": BASE.but(learnable_tau=True, symmetric=True, hard=True, reduction="sum"),
    "sum": BASE.but(reduction="sum", hard=True),
    "none": BASE.but(reduction="none", hard=True, n_extra=7),
    "unnormalized": BASE.but(normalize=False, temperature=5.0),
    "unnormalized_weighted": BASE.but(normalize=False, temperature=3.0, hard=True, hard_weight=4.0,
                                      gaussian=3, gaussian_weight=0.3),
    "everything": BASE.but(hard=True, hard_weight=0.5, n_extra=7, gaussian=5, gaussian_weight=1.5,
                           labels=True, reduction="none", learnable_tau=True),
    "everything_symmetric": BASE.but(hard=True, hard_weight=1.7, n_extra=7, gaussian=4, gaussian_weight=0.8,
                                     symmetric=True, reduction="none", learnable_tau=True),
    "larger_ragged": Case(n=70, d=40, hard=True, hard_weight=2.0, n_extra=19, gaussian=3, labels=True),
}


# The Triton backend has two backward strategies; every test runs both.
BACKENDS = ["triton-slab", "triton-workspace", "torch", NATIVE]


def _use(backend: str, monkeypatch) -> str:
    """The backend name for info_nce, with FASTCL_BACKWARD set for a Triton strategy."""
    if backend.startswith("triton-"):
        monkeypatch.setenv("FASTCL_BACKWARD", backend.split("-", 1)[1])
        return "triton"
    return backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_reference(name, backend, device, monkeypatch):
    ours, ref = run_both(CASES[name], _use(backend, monkeypatch), device)
    assert_close(ours, ref, 1e-10, f"{name}/{backend}")


# Tolerances from docs/design.md section 5 (relative error against the float64 reference).
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=str)
@pytest.mark.parametrize("name", ["plain", "everything", "symmetric_all"])
def test_low_precision_matches_reference(name, dtype, backend, device, monkeypatch):
    ours, ref = run_both(CASES[name], _use(backend, monkeypatch), device, dtype=dtype)
    assert_close(ours, ref, DTYPE_TOLERANCE[dtype], f"{name}/{backend}/{dtype}")
    for grad_name in ("anchors", "positives", "hard_negatives"):
        if grad_name in ours:
            assert ours[grad_name].dtype == dtype, "gradients keep the input dtype"


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalization_of_rows_at_every_scale(backend, device, monkeypatch):
    # The kernels normalize raw rows on the fly. Rows from 1e-4 to 1e2 in norm, zero rows
    # and rows that eps clamps (F.normalize's other branch) must all match the reference,
    # which normalizes first.
    name = _use(backend, monkeypatch)
    g = torch.Generator().manual_seed(4)
    n, d, eps = 37, 12, 0.5

    def rows(count):
        scale = torch.logspace(-4, 2, count, dtype=torch.float64)[torch.randperm(count, generator=g)]
        return (torch.randn(count, d, dtype=torch.float64, generator=g) * scale[:, None] / d ** 0.5).to(device)

    a, p, h, queue = rows(n), rows(n), rows(n), rows(7)
    a[3], p[5], h[8] = 0.0, 0.0, 0.0
    assert (a.norm(dim=1) < eps).sum() > 5 and (a.norm(dim=1) > eps).sum() > 5
    options = dict(temperature=0.1, eps=eps, symmetric=True, hard_negative_weight=2.0, gaussian_negatives=3)

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (a, p, h)]
        loss = fn(*leaves, queue, generator=torch.Generator(device=device).manual_seed(0), **options)
        return [loss.detach()] + list(torch.autograd.grad(loss, leaves))

    ours = run(lambda *x, **k: info_nce(*x, backend=name, **k))
    ref = run(lambda *x, **k: info_nce(*x, backend="reference", **k))
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10


@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, BLOCK_D_OUT=32, num_warps=1, num_stages=1),
        KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32, BLOCK_D_OUT=16, num_warps=1, num_stages=1),
        KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_D_OUT=64, num_warps=1, num_stages=1),
    ],
    ids=["tall", "wide", "one_tile"],
)
@pytest.mark.parametrize("backend", ["triton-slab", "triton-workspace"])
def test_block_shapes_do_not_change_the_result(config, backend, device, monkeypatch):
    with override_config(config):
        ours, ref = run_both(CASES["everything"].but(d=33), _use(backend, monkeypatch), device)
    assert_close(ours, ref, 1e-10)


def test_workspace_backward_in_several_chunks(device, monkeypatch):
    # A 3-row workspace cap: many chunks, the last one ragged, the buffer reused.
    case = CASES["everything"]
    monkeypatch.setenv("FASTCL_WORKSPACE_BYTES", str(3 * case.n_cols * 8 + 8 * (case.gaussian + 1)))
    ours, ref = run_both(case, _use("triton-workspace", monkeypatch), device)
    assert_close(ours, ref, 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_workspace_backward_chunks_in_low_precision(dtype, device, monkeypatch):
    # Several chunks: 16-bit inputs accumulate dk in fp32 between the products, fp32
    # inputs straight into dk; both within the dtype's tolerance.
    case = CASES["everything"]
    monkeypatch.setenv("FASTCL_WORKSPACE_BYTES", str(5 * case.n_cols * 4))
    ours, ref = run_both(case, _use("triton-workspace", monkeypatch), device, dtype=dtype)
    assert_close(ours, ref, DTYPE_TOLERANCE[dtype], str(dtype))


def test_half_precision_loss_is_float32(device):
    a, p = torch.randn(40, 16, device=device, dtype=torch.bfloat16), torch.randn(40, 16, device=device,
                                                                                  dtype=torch.bfloat16)
    for backend in ("triton", "torch", "reference"):
        assert info_nce(a, p, backend=backend).dtype == torch.float32


def test_non_contiguous_inputs(device):
    base = torch.randn(24, 2 * 37, dtype=torch.float64, device=device)
    a, p = base.T[:37], base.T[37:]  # transposed views: strides (1, 74)
    assert not a.is_contiguous()
    for backend in ("triton", "torch"):
        for normalize in (True, False):
            ours = info_nce(a, p, backend=backend, normalize=normalize, temperature=2.0)
            ref = info_nce(a.contiguous(), p.contiguous(), backend="reference", normalize=normalize, temperature=2.0)
            assert relative_error(ours, ref) < 1e-12


def test_extra_negatives_get_no_gradient(device):
    a = torch.randn(20, 8, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.randn(20, 8, dtype=torch.float64, device=device, requires_grad=True)
    queue = torch.randn(9, 8, dtype=torch.float64, device=device, requires_grad=True)
    info_nce(a, p, extra_negatives=queue, backend="triton").backward()
    assert queue.grad is None
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_module_matches_functional_and_registers_learnable_temperature(device):
    tau = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64, device=device))
    loss_fn = InfoNCELoss(temperature=tau, hard_negative_weight=2.0, backend="triton")
    assert [p is tau for p in loss_fn.parameters()] == [True]
    a, p, h = (torch.randn(30, 12, dtype=torch.float64, device=device) for _ in range(3))
    ours = loss_fn(a, p, hard_negatives=h)
    ref = info_nce(a, p, h, temperature=tau, hard_negative_weight=2.0, backend="reference")
    assert relative_error(ours, ref) < 1e-12
    ours.backward()
    assert tau.grad is not None and tau.grad.abs() > 0


def test_gaussian_negatives_are_reproducible(device):
    a, p = (torch.randn(30, 12, dtype=torch.float64, device=device) for _ in range(2))
    first = InfoNCELoss(gaussian_negatives=16, seed=7, backend="torch")
    second = InfoNCELoss(gaussian_negatives=16, seed=7, backend="torch")
    draws_first = [first(a, p) for _ in range(3)]
    draws_second = [second(a, p) for _ in range(3)]
    assert torch.equal(torch.stack(draws_first), torch.stack(draws_second)), "same seed, same sequence"
    assert len({x.item() for x in draws_first}) == 3, "each call draws new Gaussian negatives"
    without = InfoNCELoss(backend="torch")(a, p)
    assert all(x > without for x in draws_first), "extra negatives only add to the loss"


def test_auto_backend_is_correct_at_every_size(device):
    # Tiny batches take the dense reference; larger ones the fused path.
    for n in (8, 260):
        a, p = (torch.randn(n, 16, dtype=torch.float64, device=device) for _ in range(2))
        ref = info_nce(a, p, backend="reference")
        assert relative_error(info_nce(a, p), ref) < 1e-12


def test_backward_strategy_choice(monkeypatch):
    from fastcl.ops.configs import backward_strategy

    monkeypatch.delenv("FASTCL_BACKWARD", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU defaults: 256-wide slabs at 16 bits
    assert backward_strategy(torch.bfloat16, 256) == "slab"
    assert backward_strategy(torch.bfloat16, 768) == "workspace"
    assert backward_strategy(torch.bfloat16, 768, grouped=True) == "slab"
    monkeypatch.setenv("FASTCL_BACKWARD", "slab")
    assert backward_strategy(torch.bfloat16, 768) == "slab"
    monkeypatch.setenv("FASTCL_BACKWARD", "fast")
    with pytest.raises(ValueError, match="FASTCL_BACKWARD must be one of"):
        backward_strategy(torch.bfloat16, 768)


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to tf32's 10-bit mantissa, to nearest even."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tf32 product is exact on rounded operands")
def test_tf32_products_see_operands_rounded_to_nearest(monkeypatch):
    # Tensor cores truncate fp32 operands to tf32 (a bias that does not average out over
    # D); the kernels round them to nearest first. The interpreter's product is exact
    # fp32, so there the loss must be that of the tf32-rounded rows.
    monkeypatch.setenv("FASTCL_BACKWARD", "slab")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 24, generator=g) * 3
    p = a + torch.randn(37, 24, generator=g)  # aligned pairs
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        ours = info_nce(a, p, temperature=0.5, backend="triton", reduction="none")
    finally:
        torch.set_float32_matmul_precision(previous)

    def loss_rows(x, y):  # products of x and y over the exact rows' norms (the kernels' cosines), in fp64
        logits = (x.double() @ y.double().T) / (a.double().norm(dim=1)[:, None] * p.double().norm(dim=1)) / 0.5
        return torch.logsumexp(logits, 1) - logits.diagonal()

    rounded, exact = loss_rows(_round_to_tf32(a), _round_to_tf32(p)), loss_rows(a, p)
    assert relative_error(ours, rounded) < 1e-6
    assert relative_error(rounded, exact) > 1e-5  # the check above can tell the two apart
