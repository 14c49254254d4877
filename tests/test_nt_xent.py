"""NT-Xent (SimCLR) on the fused kernels against its dense reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fastcl import NTXentLoss, nt_xent, nt_xent_reference

from .helpers import relative_error


def test_reference_matches_simclr_formula():
    n, tau = 6, 0.2
    z1, z2 = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / tau
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [sim[i, k] for k in range(2 * n) if k != i]
        losses.append(-(sim[i, j] - torch.logsumexp(torch.stack(others), 0)))
    torch.testing.assert_close(nt_xent_reference(z1, z2, temperature=tau), torch.stack(losses).mean())


@pytest.mark.parametrize("backend", ["triton-slab", "triton-workspace", "torch"])
@pytest.mark.parametrize("n, d, reduction, learnable", [(1, 5, "mean", False), (19, 24, "none", False),
                                                        (19, 33, "sum", True), (40, 7, "mean", True)])
def test_fused_matches_reference(backend, n, d, reduction, learnable, device, monkeypatch):
    if backend.startswith("triton-"):
        monkeypatch.setenv("FASTCL_BACKWARD", backend.split("-")[1])
        backend = "triton"
    z1 = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    z2 = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True) if learnable else 0.3
    weights = torch.randn(2 * n, dtype=torch.float64, device=device)

    def run(fn):
        out = fn(z1, z2, temperature=tau, reduction=reduction)
        objective = (out * weights).sum() if reduction == "none" else out
        return [out.detach()] + list(torch.autograd.grad(objective, [z1, z2] + ([tau] if learnable else [])))

    ours = run(lambda *a, **k: nt_xent(*a, backend=backend, **k))
    ref = run(nt_xent_reference)
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10


def test_gradcheck_through_triton(device):
    z1 = torch.randn(9, 3, dtype=torch.float64, device=device, requires_grad=True)
    z2 = torch.randn(9, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda a, b: nt_xent(a, b, temperature=0.4, backend="triton"), (z1, z2),
                     eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bf16_and_module(device):
    z1, z2 = (torch.randn(30, 16, device=device) for _ in range(2))
    ref = nt_xent_reference(z1.double(), z2.double(), temperature=0.1)
    out = NTXentLoss(temperature=0.1, backend="triton")(z1.bfloat16(), z2.bfloat16())
    assert out.dtype == torch.float32
    assert relative_error(out, ref) < 2e-2


def test_errors_name_the_views():
    z1 = torch.randn(4, 3)
    with pytest.raises(ValueError, match="z2 must have the shape of z1"):
        nt_xent(z1, torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty batch: z1"):
        nt_xent(z1[:0], z1[:0])
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=-1.0)
