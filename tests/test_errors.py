"""Every bad input gets a clear error before any kernel runs."""

import functools
import math

import pytest
import torch

from fastcl import InfoNCELoss, info_nce


def _pair(n=8, d=4, device="cpu", dtype=torch.float32):
    return torch.randn(n, d, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference", "auto"])
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda f, a, p: f(a, p[:5]), ValueError, "positives must have the shape of anchors"),
        (lambda f, a, p: f(a, p[:, :3]), ValueError, "positives must have the shape of anchors"),
        (lambda f, a, p: f(a, p, hard_negatives=p[:7]), ValueError, "hard_negatives must have the shape"),
        (lambda f, a, p: f(a, p, extra_negatives=torch.randn(5, 3)), ValueError, "embedding dim 3"),
        (lambda f, a, p: f(a[0], p[0]), ValueError, "must be 2-D"),
        (lambda f, a, p: f(a[None], p[None]), ValueError, "must be 2-D"),
        (lambda f, a, p: f(a[:0], p[:0]), ValueError, "empty batch"),
        (lambda f, a, p: f(a[:, :0], p[:, :0]), ValueError, "empty batch"),
        (lambda f, a, p: f(a, p.double()), TypeError, "positives is torch.float64 but anchors are torch.float32"),
        (lambda f, a, p: f(a.long(), p.long()), TypeError, "must be float16, bfloat16, float32 or float64"),
        (lambda f, a, p: f(a.bool(), p.bool()), TypeError, "must be float16"),
        (lambda f, a, p: f(a, p.to(torch.complex64)), TypeError, "must be float16"),
        (lambda f, a, p: f(a.tolist(), p), TypeError, "must be a torch.Tensor"),
        (lambda f, a, p: f(a, p.index_fill(0, torch.tensor([3]), math.nan)), ValueError,
         "positives contains NaN or infinite"),
        (lambda f, a, p: f(a.index_fill(1, torch.tensor([1]), math.inf), p), ValueError,
         "anchors contains NaN or infinite"),
        (lambda f, a, p: f(a, p, hard_negatives=torch.full_like(p, math.nan)), ValueError,
         "hard_negatives contains NaN"),
        (lambda f, a, p: f(a, p, extra_negatives=torch.full((3, 4), -math.inf)), ValueError,
         "extra_negatives contains NaN"),
        (lambda f, a, p: f(a, p, temperature=0.0), ValueError, "temperature must be a finite number >= 1e-06"),
        (lambda f, a, p: f(a, p, temperature=-0.1), ValueError, "temperature must be a finite number >= 1e-06"),
        (lambda f, a, p: f(a, p, temperature=math.nan), ValueError, "temperature must be a finite number >= 1e-06"),
        (lambda f, a, p: f(a, p, temperature=1e-39), ValueError, "temperature must be a finite number >= 1e-06"),
        (lambda f, a, p: f(a, p, temperature=torch.tensor(-1.0)), ValueError, "temperature must be a finite"),
        (lambda f, a, p: f(a, p, temperature=torch.tensor(1e-39)), ValueError, "temperature must be a finite"),
        (lambda f, a, p: f(a, p, temperature=torch.tensor(2)), TypeError, "floating-point tensor"),
        (lambda f, a, p: f(a, p, eps=math.nan), ValueError, r"eps must be a finite number in \[1e-15, 1e\+15\]"),
        (lambda f, a, p: f(a, p, eps=0.0), ValueError, "eps must be a finite number"),
        (lambda f, a, p: f(a, p, eps="1e-12"), TypeError, "eps must be a real number"),
        (lambda f, a, p: f(a, p, symmetric="False"), TypeError, "symmetric must be True or False"),
        (lambda f, a, p: f(a, p, normalize="no"), TypeError, "normalize must be True or False"),
        (lambda f, a, p: f(a, p, temperature=torch.tensor([0.1, 0.2])), ValueError, "one-element"),
        (lambda f, a, p: f(a, p, hard_negative_weight=0.0), ValueError, "hard_negative_weight must be"),
        (lambda f, a, p: f(a, p, gaussian_weight=-1.0), ValueError, "gaussian_weight must be"),
        (lambda f, a, p: f(a, p, gaussian_negatives=-3), ValueError, "gaussian_negatives must be an int"),
        (lambda f, a, p: f(a, p, gaussian_negatives=2.5), ValueError, "gaussian_negatives must be an int"),
        (lambda f, a, p: f(a, p, labels=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])), ValueError,
         r"labels must lie in \[0, 8\)"),
        (lambda f, a, p: f(a, p, labels=torch.full((8,), -1)), ValueError, "labels must lie in"),
        (lambda f, a, p: f(a, p, labels=torch.zeros(7, dtype=torch.long)), ValueError,
         "one target column per anchor"),
        (lambda f, a, p: f(a, p, labels=torch.zeros(8)), TypeError, "labels must be an integer tensor"),
        (lambda f, a, p: f(a, p, labels=torch.zeros(8, dtype=torch.long), symmetric=True), ValueError,
         "not supported with symmetric"),
        (lambda f, a, p: f(a, p, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda f, a, p: f(a, p, backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_rejected(make, error, match, backend):
    a, p = _pair()
    with pytest.raises(error, match=match):
        make(functools.partial(info_nce, backend=backend), a, p)


def test_hard_negative_labels_may_point_anywhere_in_range():
    a, p = _pair()
    h = torch.randn(8, 4)
    labels = torch.arange(8) + 8  # each anchor's own hard negative as its target
    assert torch.isfinite(info_nce(a, p, h, labels=labels, backend="torch"))


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 1e-06"):
        InfoNCELoss(temperature=torch.tensor(-0.5))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 1e-06"):
        InfoNCELoss(temperature=torch.tensor(math.nan))
    with pytest.raises(ValueError, match="eps"):
        InfoNCELoss(eps=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        InfoNCELoss(reduction="batchmean")
    with pytest.raises(ValueError, match="hard_negative_weight"):
        InfoNCELoss(hard_negative_weight=-2)
    with pytest.raises(ValueError, match="gaussian_negatives"):
        InfoNCELoss(gaussian_negatives=-1)


def test_check_finite_can_be_turned_off():
    a, p = _pair()
    a[0, 0] = math.nan
    out = info_nce(a, p, check_finite=False, backend="torch", reduction="none")
    assert torch.isnan(out[0])  # computed, not rejected: the NaN propagates to its row


def test_generator_on_another_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    a, p = _pair(device="cuda")
    with pytest.raises(ValueError, match="generator is on"):
        info_nce(a, p, gaussian_negatives=4, generator=torch.Generator())


def test_mixed_devices_are_rejected():
    if not torch.cuda.is_available():
        a, p = _pair()
        with pytest.raises(ValueError, match="positives is on meta but anchors are on cpu"):
            info_nce(a, p.to("meta"))
        return
    a, p = _pair()
    with pytest.raises(ValueError, match="positives is on cuda"):
        info_nce(a, p.cuda())
