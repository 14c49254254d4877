"""torch.autograd.gradcheck in float64 through the Triton kernels (full mode, not fast mode:
fast mode missed a planted 0.1% error in dK that full mode caught, docs/design.md section 6).

Sizes are small for the interpreter, yet N = 17 spans two row tiles and D = 3 is below
any block, so the masks are exercised too.
"""

import pytest
import torch
from torch.autograd import gradcheck

from fastcl import info_nce

N, D = 17, 3


def _leaf(rows, device):
    return torch.randn(rows, D, dtype=torch.float64, device=device).requires_grad_()


CASES = {
    "plain": dict(),
    "hard_negatives": dict(hard=True, hard_negative_weight=2.0),
    "gaussian": dict(gaussian_negatives=4, gaussian_weight=0.5),
    "symmetric": dict(symmetric=True, reduction="none"),
    "learnable_temperature": dict(learnable_tau=True, hard=True),
    # Rows of N(0, 1) in D = 3 have norms around 1.6: eps = 1.5 clamps some of them, the
    # other branch of the normalization's backward that the kernels fuse.
    "clamped_norms": dict(eps=1.5, hard=True, symmetric=True),
}


@pytest.mark.parametrize("strategy", ["slab", "workspace"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_through_triton(name, strategy, device, monkeypatch):
    monkeypatch.setenv("FASTCL_BACKWARD", strategy)
    options = dict(CASES[name])
    hard = options.pop("hard", False)
    learnable_tau = options.pop("learnable_tau", False)
    inputs = [_leaf(N, device), _leaf(N, device)]
    if hard:
        inputs.append(_leaf(N, device))
    if learnable_tau:
        inputs.append(torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True))

    def loss(*args):
        a, p = args[0], args[1]
        h = args[2] if hard else None
        tau = args[-1] if learnable_tau else 0.3
        # Re-seeded every call: the Gaussian negatives must be the same function of nothing.
        generator = torch.Generator(device=device).manual_seed(0)
        return info_nce(a, p, h, temperature=tau, generator=generator, backend="triton", **options)

    assert gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)
