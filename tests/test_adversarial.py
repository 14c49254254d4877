"""Adversarial inputs: extreme magnitudes per dtype and bad values, on every backend.

The accuracy bound for float16 / bfloat16 inputs (``u`` is the input dtype's unit
roundoff: 2^-11 for float16, 2^-8 for bfloat16). Every backend accumulates in float32;
the gradients come back in the input dtype, so rounding the exact gradient to that dtype
(``rep``) is a floor no backend can beat. Row by row, against the float64 reference on
the same (rounded) inputs, for every gradient row x_i:

    reference, torch, native:  |dx_i - ref_i| <= rep_i + floor_i + 0.1 u |ref_i|
    triton (slab, workspace,   |dx_i - ref_i| <= rep_i + floor_i + 2 u |ref_i|
    one pass):                 (the 16-bit logit-gradient operand of the tensor-core
                               products is rounded once more)
    every backend:             |loss - ref| <= 1e-6 (|ref| + sqrt(rows) / tau)   (float32 loss)
                               temperature gradient within 1e-5 (relative)

rep_i = |fl(ref_i) - ref_i| (at most u |ref_i| for normal numbers, more where the true
gradient is subnormal in the input dtype); floor_i = 16 u32 g r_i / tau^2 is what
float32 logits allow (``_float32_floor``; it only matters for confident rows, whose
P - 1 at the target is below float32's resolution of logits near 1/tau). Where autograd
adds two gradients that each come back in the input dtype (symmetric: both directions;
NT-Xent: each row as anchor and as candidate) rep counts twice and 1 u more is allowed;
the reference computes the whole graph in float32 and rounds once. Checked at row norms
from 1e-3 to 1e4, with every option, near-duplicate positives, norms spread over seven
decades in one batch, NT-Xent and groups. Measured worst rows on this suite (beyond rep
and floor): 0.0 u for the float32 backends; Triton 0.66 u in float16, 1.35 u in bfloat16.

Triton runs in its interpreter here. Its bf16 tl.dot is wrong and its fp32 -> bf16 cast
truncates, so with bf16 inputs the kernels upcast their operands and round the
logit-gradient operand to bf16 by hand, to nearest even as the GPU does
(tiles.matmul_operand; test_interpreter_bf16_rounding_matches_torch checks the rounding):
the products then see the GPU's operand values, accumulated in fp32. The ``gpu`` tests at
the end repeat the bound with the compiled kernels at N = 4096.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl

from fastcl import (
    InfoNCELoss, NTXentLoss, draw_gaussian_negatives, info_nce, info_nce_reference, nt_xent, nt_xent_reference,
    token_info_nce,
)

from fastcl.ops.tiles import matmul_operand

from .conftest import DEVICE
from .helpers import NATIVE, free_port, gloo_group

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
#: Allowed excess over rep, in units of u (module docstring).
EXCESS = {"reference": 0.1, "torch": 0.1, "native": 0.1, "triton-slab": 2.0, "triton-workspace": 2.0,
          "triton-one_pass": 2.0}
BACKENDS = ["reference", "torch", NATIVE, "triton-slab", "triton-workspace"]
TAU = 0.05


def _use(backend: str, monkeypatch) -> str:
    if backend.startswith("triton-"):
        monkeypatch.setenv("FASTCL_BACKWARD", backend.split("-", 1)[1])
        return "triton"
    return backend


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.norm().item()
    return (out - ref).norm().item() / scale if scale > 0 else (out - ref).norm().item()


def _rows(g, n, d, scale, dtype=torch.float64):
    return torch.randn(n, d, generator=g, dtype=dtype) * scale


# ------------------------------------------------------------------ cases
#
# A case builds float64 inputs (already rounded to the test dtype) and says how to call
# fastcl and the reference on them: fn(inputs, leaves, tau, backend) -> loss.

def _case_inputs(name: str, scale: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, d = 9, 20
    x = {}
    if name == "spread":
        # Norms over seven decades within one batch, each anchor with its positive at
        # its own scale; "sum" keeps the largest rows' gradients within float16's range.
        # Unrelated positives keep every row unconfident (softmax well below 1), so the
        # float32 floor stays small and the operand's range is what is tested.
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        p = torch.randn(n, d, generator=g, dtype=torch.float64)
        norms = torch.logspace(-3, 4, n, dtype=torch.float64)[torch.randperm(n, generator=g)][:, None]
        x["anchors"] = a / a.norm(dim=1, keepdim=True) * norms
        x["positives"] = p / p.norm(dim=1, keepdim=True) * norms
    elif name == "two_scales":
        # Half the pairs at norm 1e-2, half at 1e3: in one 16-bit operand holding both the
        # row and the column factor, the large pairs' entries would underflow.
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        p = a + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        norms = torch.where(torch.arange(n) % 2 == 0, 1e-2, 1e3).double()[:, None]
        x["anchors"] = a / a.norm(dim=1, keepdim=True) * norms
        x["positives"] = p / p.norm(dim=1, keepdim=True) * norms
    else:
        x["anchors"] = _rows(g, n, d, scale)
        x["positives"] = _rows(g, n, d, scale)
        if name == "near_duplicate":
            x["positives"] = x["anchors"] + 0.01 * x["positives"]
        if name == "all_options":
            x["hard_negatives"] = _rows(g, n, d, scale)
            x["extra_negatives"] = _rows(g, 5, d, scale)
        if name == "groups":
            x["groups"] = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for key in ("anchors", "positives", "hard_negatives", "extra_negatives"):
        if key in x:
            x[key] = x[key].to(dtype).double()  # exactly what the test dtype holds
    x["weights"] = torch.randn(n, generator=g, dtype=torch.float64)
    return x


def _call(name: str, x: dict, leaves: dict, tau, backend: str | None, dtype):
    """The loss (``backend`` None: the float64 reference)."""
    ref = backend is None
    extra = x.get("extra_negatives")  # float64 (exactly the rounded values) for the reference
    if extra is not None and not ref:
        extra = extra.to(dtype)
    if name == "nt_xent":
        if ref:
            return nt_xent_reference(leaves["anchors"], leaves["positives"], temperature=tau)
        return nt_xent(leaves["anchors"], leaves["positives"], temperature=tau, backend=backend)
    options = dict(temperature=tau)
    if name == "all_options":
        options.update(hard_negative_weight=2.5, gaussian_weight=0.7, reduction="none")
    if name == "symmetric":
        options.update(symmetric=True)
    if name in ("spread", "two_scales"):
        options.update(reduction="sum")
    if name == "groups":
        options.update(groups=x["groups"])
    hard = leaves.get("hard_negatives")
    if ref:
        gauss = (draw_gaussian_negatives(3, x["anchors"].shape[1], dtype, torch.device("cpu"),
                                         torch.Generator().manual_seed(7)).double()
                 if name == "all_options" else None)
        return info_nce_reference(leaves["anchors"], leaves["positives"], hard, extra, gauss, **options)
    if name == "all_options":
        options.update(gaussian_negatives=3, generator=torch.Generator().manual_seed(7))
    return info_nce(leaves["anchors"], leaves["positives"], hard, extra, backend=backend, **options)


LEARNABLE = ("all_options", "symmetric")
#: Cases whose inputs get two gradients from the kernels, each rounded to the input dtype.
TWO_ROUNDINGS = ("symmetric", "nt_xent")


def _run(name, x, dtype, backend):
    """(loss, {name: gradient}) of fastcl in ``dtype`` (backend) or of the float64 reference."""
    cast = torch.float64 if backend is None else dtype
    leaves = {k: x[k].to(cast).requires_grad_() for k in ("anchors", "positives", "hard_negatives") if k in x}
    tau = TAU
    if name in LEARNABLE:
        # The same float32 value for both; float64 for the reference's arithmetic.
        tau = torch.tensor(TAU, dtype=torch.float32 if backend is not None else torch.float64)
        tau = tau.to(torch.float32).to(tau.dtype).requires_grad_()
    loss = _call(name, x, leaves, tau, backend, dtype)
    objective = (loss.double() * x["weights"]).sum() if loss.dim() else loss.double()
    wrt = list(leaves.values()) + ([tau] if name in LEARNABLE else [])
    grads = torch.autograd.grad(objective, wrt)
    return loss.detach(), dict(zip(list(leaves) + ["temperature"], grads))


def _float32_floor(name: str, x: dict, key: str) -> torch.Tensor:
    """Per row of input ``key``, the absolute gradient error float32 logits allow.

    A logit near 1/tau carries an absolute rounding error of about u32 / tau, and so does
    every entry of softmax - onehot computed from it; above all the target's P - 1 of a
    confident row (P within u32 / tau of 1), whose true value is far smaller. Through
    dx_i = (1/tau) g r (sum of those entries times unit rows) that is an absolute error
    near u32 g r / tau^2 for row i (g: the row losses' incoming gradient, r: 1 / |x_i|),
    shared by every float32 backend: the accuracy float32 accumulation allows. It only
    matters for confident rows; elsewhere it is far below u |gradient|."""
    g = {"all_options": x["weights"].abs().max().item(), "spread": 1.0, "two_scales": 1.0}.get(
        name, 1.0 / x["anchors"].shape[0])
    return 16 * 2.0 ** -24 / TAU ** 2 * g / x[key].norm(dim=1)


def _check_bound(name, scale, dtype, backend, monkeypatch):
    """The bound of the module docstring, row by row (a norm over all rows would let the
    rows of small norm, whose gradients are the largest, hide errors in all others)."""
    x = _case_inputs(name, scale, dtype)
    loss, grads = _run(name, x, dtype, _use(backend, monkeypatch))
    ref_loss, ref_grads = _run(name, x, dtype, None)
    u = UNIT_ROUNDOFF[dtype]
    rows = ref_loss.numel()
    loss_err = (loss.double() - ref_loss).norm().item()
    assert loss_err <= 1e-6 * (ref_loss.norm().item() + math.sqrt(rows) / TAU), f"loss: {loss_err:.3g}"
    excess = {}
    for key, ref in ref_grads.items():
        if key == "temperature":
            err = _rel(grads[key], ref)
            assert err <= 1e-5, f"temperature gradient: relative error {err:.3g}"
            continue
        mine = grads[key].double()
        assert torch.isfinite(mine).all(), f"{key}: not finite"
        err = (mine - ref).norm(dim=1)
        rep = (ref.to(dtype).double() - ref).norm(dim=1)
        size = ref.norm(dim=1)
        floor = _float32_floor(name, x, key)
        # Two gradients, each rounded to the input dtype, then their sum: up to twice the
        # rounding error (more than 1 u where the gradient is subnormal in that dtype).
        roundings = 2 if name in TWO_ROUNDINGS and backend != "reference" else 1
        allowed = EXCESS[backend] + roundings - 1
        slack = roundings * rep + floor + allowed * u * size - err
        excess[key] = ((err - rep - floor) / (u * size)).max().item()
        worst = int(slack.argmin())
        assert slack[worst] >= 0, (
            f"{key} row {worst}: error {err[worst]:.3g} > {roundings} x {rep[worst]:.3g} (rounding to {dtype}) "
            f"+ {floor[worst]:.3g} (float32 logits) + {allowed} u x {size[worst]:.3g}")
    return excess


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 3e3, 1e4])
@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("name", ["plain", "all_options"])
def test_half_precision_bound_over_row_norms(name, dtype_name, scale, backend, monkeypatch):
    _check_bound(name, scale, HALF[dtype_name], backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("name, scale", [("symmetric", 1e-3), ("near_duplicate", 30.0), ("near_duplicate", 3e3),
                                         ("spread", None), ("two_scales", None), ("nt_xent", 1e4),
                                         ("groups", 3e3)])
def test_half_precision_bound_hard_cases(name, scale, dtype_name, backend, monkeypatch):
    _check_bound(name, scale, HALF[dtype_name], backend, monkeypatch)


@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("name, scale", [("plain", 1e-3), ("plain", 1e4), ("symmetric", 1e-3),
                                         ("near_duplicate", 3e3), ("spread", None), ("two_scales", None)])
def test_one_pass_half_precision_bound(name, scale, dtype_name, monkeypatch):
    # The Triton one pass (bf16: every factor in its logit-gradient operand; fp16: one
    # operand per product, scaled into range): the same bound as the recomputing
    # backwards, at the extremes of norm (cases with a reduced loss: per-row losses never
    # take the one pass).
    from fastcl.ops import function

    lookup, strategies = function.kernels, []
    monkeypatch.setattr(function, "kernels", lambda *key: strategies.append(key[2]) or lookup(*key))
    _check_bound(name, scale, HALF[dtype_name], "triton-one_pass", monkeypatch)
    assert strategies and set(strategies) == {"one_pass"}, strategies


# ------------------------------------------------------- extreme magnitudes per dtype
#
# With normalize=True a row enters the loss only through its direction. The oracle is
# the float64 reference on rows multiplied by powers of two (exact) that bring them to
# norm ~1; autograd carries the same powers of two into the gradients of the raw rows.

ALL_BACKENDS = ["auto"] + BACKENDS


def _pow2_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x times, per row whose norm exceeds eps, a power of two near 2^t / max|x_row| (two
    factors: one could overflow float64 for rows of subnormal entries). Rows below eps
    are unchanged: F.normalize divides them by eps, so their scale matters."""
    m = x.detach().abs().amax(dim=1)
    target = max(1, math.ceil(math.log2(eps)) + 1)  # rescaled rows must stay above eps
    e = torch.where(m > 0, torch.floor(torch.log2(torch.where(m > 0, m, 1.0))) - target, 0.0)
    first = torch.floor(-e / 2)
    scaled = x * torch.exp2(first)[:, None] * torch.exp2(-e - first)[:, None]
    above_eps = scaled.detach().norm(dim=1) * torch.exp2(e) > eps
    return torch.where(above_eps[:, None], scaled, x)


def _extreme_case(dtype, scales, seed=0, d=12):
    """float64 rows (exactly representable in ``dtype``), row i of each input at scales[i]."""
    g = torch.Generator().manual_seed(seed)
    n = len(scales)
    s = torch.tensor(scales, dtype=torch.float64)[:, None]
    limit = torch.finfo(dtype).max / 4
    return [(torch.randn(n, d, generator=g, dtype=torch.float64) * s).clamp(-limit, limit).to(dtype).double()
            for _ in range(2)]


def _compare_extreme(dtype, backend, scales, monkeypatch, eps=1e-12, fn="info_nce", oracle_scaled=True):
    a, p = _extreme_case(dtype, scales)
    leaves = [x.to(dtype).clone().requires_grad_() for x in (a, p)]
    ref_leaves = [x.clone().requires_grad_() for x in (a, p)]
    name = _use(backend, monkeypatch)
    if fn == "info_nce":
        loss = info_nce(*leaves, eps=eps, backend=name, reduction="sum")
        ref = info_nce_reference(*[_pow2_unit(x, eps) if oracle_scaled else x for x in ref_leaves], eps=eps,
                                 reduction="sum")
    elif fn == "nt_xent":
        loss = nt_xent(*leaves, eps=eps, backend=name, reduction="sum")
        ref = nt_xent_reference(*[_pow2_unit(x, eps) if oracle_scaled else x for x in ref_leaves], eps=eps,
                                reduction="sum")
    else:  # token_info_nce: two sequences, one padding token
        mask = torch.ones(2, len(scales) // 2, dtype=torch.bool)
        mask[1, -1] = False
        shaped = [x.reshape(2, -1, x.shape[1]) for x in leaves]
        loss = token_info_nce(*shaped, mask, eps=eps, backend=name, reduction="sum")
        keep = mask.reshape(-1)
        groups = torch.arange(2)[:, None].expand(2, len(scales) // 2).reshape(-1)[keep]
        ref = info_nce_reference(*[_pow2_unit(x, eps)[keep] for x in ref_leaves], eps=eps, groups=groups,
                                 reduction="sum")
    loss.backward()
    ref.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= tol * (abs(ref.item()) + 1 / 0.05), (
        f"loss {loss.item()} vs {ref.item()}")
    u = UNIT_ROUNDOFF.get(dtype, 0.0)
    for mine, theirs in zip(leaves, ref_leaves):
        g_ref = theirs.grad
        rep = _rel(g_ref.to(dtype), g_ref)
        err = _rel(mine.grad, g_ref)
        assert err <= 2 * rep + 1.5 * u + tol, f"gradient: relative error {err:.3g} (rounding alone {rep:.3g})"


EXTREMES = {
    # name: (dtype, per-row scales, eps)
    "fp32_norm_1e19": (torch.float32, [1e19] * 6, 1e-12),
    "fp32_norm_1e25": (torch.float32, [1e25] * 6, 1e-12),
    "fp32_near_max": (torch.float32, [3e37] * 6, 1e-12),
    "fp32_mixed": (torch.float32, [1e30, 1e-20, 1.0, 0.0, 3e18, 2.0], 1e-12),
    "fp32_tiny_above_eps": (torch.float32, [1e-15] * 6, 1e-15),
    "fp32_rows_near_eps": (torch.float32, [3.5e-16] * 6, 1e-15),  # some above eps, entries below 2^-50
    "fp32_below_eps": (torch.float32, [1e-40, 1e-17, 3e-16, 1e-40, 1.0, 0.0], 1e-15),
    "fp32_huge_with_large_eps": (torch.float32, [1e30, 1e30, 1.0, 1e20, 50.0, 3e3], 1e3),
    "fp64_norm_1e160": (torch.float64, [1e160] * 6, 1e-12),
    "fp64_norm_1e300": (torch.float64, [1e300, 1e300, 1.0, 1e-300, 1e200, 1e155], 1e-12),
    "bf16_norm_1e30": (torch.bfloat16, [1e30] * 6, 1e-12),
    "bf16_tiny_and_huge": (torch.bfloat16, [1e-15, 1e-15, 1.0, 3e-28, 1e30, 1e-15], 1e-15),
    "fp16_norm_above_65504": (torch.float16, [2e4] * 6, 1e-12),
    "fp16_subnormal": (torch.float16, [1e-6, 1e-7, 1.0, 3e-6, 2e4, 1e-5], 1e-12),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(EXTREMES))
def test_extreme_row_norms_match_the_exact_loss(case, backend, monkeypatch):
    dtype, scales, eps = EXTREMES[case]
    _compare_extreme(dtype, backend, scales, monkeypatch, eps=eps)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fn", ["nt_xent", "token_info_nce"])
@pytest.mark.parametrize("case", ["fp32_mixed", "fp16_norm_above_65504", "bf16_norm_1e30"])
def test_extreme_row_norms_in_nt_xent_and_token_loss(case, fn, backend, monkeypatch):
    dtype, scales, eps = EXTREMES[case]
    _compare_extreme(dtype, backend, scales, monkeypatch, eps=eps, fn=fn)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp16_rows_above_65504_small_batch(backend, monkeypatch):
    """Rows whose norm overflows float16 (every entry finite) at a small batch, where
    "auto" takes the dense path: the loss and gradient of the exact computation."""
    g = torch.Generator().manual_seed(3)
    def rows():  # entries of magnitude 2e4 .. 6e4, random signs: norms 5.7e4 .. 1.7e5
        magnitude = 2e4 + 4e4 * torch.rand(6, 8, generator=g)
        return (magnitude * torch.randn(6, 8, generator=g).sign()).half()

    a, p = rows(), rows()
    assert (a.float().norm(dim=1) > 65504).sum() >= 4
    x, y = a.clone().requires_grad_(), p.clone().requires_grad_()
    loss = info_nce(x, y, backend=_use(backend, monkeypatch), reduction="sum")
    loss.backward()
    ra, rp = a.double().requires_grad_(), p.double().requires_grad_()
    ref = info_nce_reference(ra, rp, reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= 1e-5 * (ref.item() + 20)
    for mine, theirs in ((x.grad, ra.grad), (y.grad, rp.grad)):
        assert theirs.half().abs().sum() > 0  # a gradient float16 can hold, so a real check
        assert _rel(mine, theirs) <= _rel(theirs.half(), theirs) + 1.5 * 2 ** -11


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unnormalized_logits_that_overflow_are_refused(backend, monkeypatch):
    a, p = torch.randn(6, 8) * 1e19, torch.randn(6, 8)
    with pytest.raises(ValueError, match="logits q.k / temperature can overflow"):
        info_nce(a, p, normalize=False, backend=_use(backend, monkeypatch))
    # The same rows are fine when normalized: only their direction counts.
    assert torch.isfinite(info_nce(a, p, backend=_use(backend, monkeypatch)))


# ------------------------------------------------------------------ bad values

def _pair(n=6, d=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("eps, error", [
    (math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError), (0.0, ValueError), (-0.0, ValueError),
    (-1e-12, ValueError), (1e-16, ValueError), (2e15, ValueError), (True, TypeError), ("1e-12", TypeError),
    (None, TypeError), (torch.tensor(1e-12), TypeError),
])
@pytest.mark.parametrize("where", ["info_nce", "nt_xent", "InfoNCELoss", "NTXentLoss", "token_info_nce"])
def test_bad_eps_is_rejected(eps, error, where):
    a, p = _pair()
    with pytest.raises(error, match="eps"):
        if where == "info_nce":
            info_nce(a, p, eps=eps)
        elif where == "nt_xent":
            nt_xent(a, p, eps=eps)
        elif where == "InfoNCELoss":
            InfoNCELoss(eps=eps)
        elif where == "NTXentLoss":
            NTXentLoss(eps=eps)
        else:
            token_info_nce(a[None], p[None], eps=eps)


@pytest.mark.parametrize("eps", [1e-15, 1e-12, 1e-6, 1.0, 1.5, 1e15])
def test_eps_range_ends_are_accepted(eps):
    a, p = _pair()
    a[0] = 0.0
    for backend in ("reference", "torch"):
        ours = info_nce(a.double(), p.double(), eps=eps, backend=backend)
        assert torch.allclose(ours, info_nce_reference(a.double(), p.double(), eps=eps), rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature, error", [
    (1e-39, ValueError), (1e-7, ValueError), (5e-324, ValueError), (-0.0, ValueError), (0.0, ValueError),
    (math.nan, ValueError), (math.inf, ValueError), (-0.05, ValueError), (True, TypeError), ("0.05", TypeError),
    (None, TypeError),
    (torch.tensor(1e-39), ValueError), (torch.tensor(1e-7, dtype=torch.float64), ValueError),
    (torch.tensor(-0.0), ValueError), (torch.tensor(math.nan), ValueError), (torch.tensor(math.inf), ValueError),
    (torch.tensor(5), TypeError), (torch.tensor(True), TypeError), (torch.tensor(0.05 + 0j), TypeError),
    (torch.tensor([0.05, 0.05]), ValueError),
])
@pytest.mark.parametrize("check_finite", [True, False])
def test_bad_temperature_is_rejected_up_front(temperature, error, check_finite):
    a, p = _pair()
    for fn in (info_nce, nt_xent):
        with pytest.raises(error, match="temperature"):
            fn(a, p, temperature=temperature, check_finite=check_finite)
    if not isinstance(temperature, torch.Tensor) or temperature.dtype.is_floating_point:
        with pytest.raises(error, match="temperature"):
            InfoNCELoss(temperature=temperature)


def _accepted_temperatures() -> list[tuple[float, torch.dtype]]:
    """(tau, dtype) pairs whose tensor is an accepted temperature: positive, finite and
    >= 1e-6 once rounded to the dtype (1e30 overflows float16; 1e-6 rounds below 1e-6 in
    float16 and bfloat16). The others are refused (test_bad_temperature_is_rejected_up_front)."""
    pairs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for tau in (1e-6, 1e-4, 0.05, 1e3, 1e30):
            t = torch.tensor(tau, dtype=dtype)
            if torch.isfinite(t) and t.double() >= 1e-6:
                pairs.append((tau, dtype))
    return pairs


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tau, tau_dtype", _accepted_temperatures())
def test_learnable_temperature_at_extremes(tau, tau_dtype, backend, monkeypatch):
    """No NaN anywhere at any accepted temperature, and the exact loss; the gradients too
    where float32 logits of size 1/tau leave them any precision (a float16 temperature of
    1e-4 is subnormal; its 1/tau, 1e4, is computed in float32)."""
    t = torch.tensor(tau, dtype=tau_dtype)
    a, p = _extreme_case(torch.float32, [1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    x, y = a.float().requires_grad_(), p.float().requires_grad_()
    mine = t.clone().requires_grad_()
    loss = info_nce(x, y, temperature=mine, backend=_use(backend, monkeypatch), symmetric=True)
    loss.backward()
    rx, ry = a.clone().requires_grad_(), p.float().double().requires_grad_()
    theirs = t.double().requires_grad_()
    ref = info_nce_reference(rx, ry, temperature=theirs, symmetric=True)
    ref.backward()
    for value in (loss, x.grad, y.grad, mine.grad):
        assert not torch.isnan(value).any()
    tau = t.double().item()
    assert abs(loss.item() - ref.item()) <= 1e-5 * (abs(ref.item()) + 1 / tau)
    if 0.01 <= tau <= 1e3:
        assert _rel(x.grad, rx.grad) <= 1e-4 and _rel(y.grad, ry.grad) <= 1e-4
        expected = theirs.grad.to(tau_dtype).double()  # what the temperature's dtype can hold
        assert abs(mine.grad.double().item() - theirs.grad.item()) <= (
            1e-4 * abs(theirs.grad.item()) + abs(expected.item() - theirs.grad.item()))


@pytest.mark.parametrize("flag", ["symmetric", "normalize", "check_finite"])
@pytest.mark.parametrize("value", ["False", "no", 1, 0, None, torch.tensor(True)])
def test_switches_must_be_bools(flag, value):
    a, p = _pair()
    with pytest.raises(TypeError, match=flag):
        info_nce(a, p, **{flag: value})
    with pytest.raises(TypeError, match=flag):
        InfoNCELoss(**{flag: value})
    if flag != "symmetric":
        with pytest.raises(TypeError, match=flag):
            nt_xent(a, p, **{flag: value})
        with pytest.raises(TypeError, match=flag):
            NTXentLoss(**{flag: value})


def test_numpy_bools_and_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    a, p = _pair()
    out = info_nce(a, p, symmetric=np.bool_(True), normalize=np.True_, temperature=np.float32(0.1),
                   eps=np.float64(1e-8), gaussian_negatives=np.int64(3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_labels_of_any_integer_dtype(dtype, backend, monkeypatch):
    """Small integer dtypes are valid labels; the dense path's gather took only int64."""
    n = 130 if dtype in (torch.int8, torch.uint8) else 9  # more columns than int8 holds
    g = torch.Generator().manual_seed(2)
    a, p, h = (torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    wide = torch.randint(0, min(2 * n, 127), (n,), generator=g)
    expected = info_nce_reference(a, p, h, labels=wide)
    labels = wide.to(dtype)
    assert torch.allclose(info_nce(a, p, h, labels=labels, backend=_use(backend, monkeypatch)), expected,
                          rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_labels_out_of_range_in_narrow_dtypes(dtype):
    a, p = _pair()
    bad = torch.full((6,), 100, dtype=dtype)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        info_nce(a, p, labels=bad)


@pytest.mark.parametrize("count", [2 ** 31, 10 ** 20, -1])
def test_huge_gaussian_negatives_are_rejected(count):
    a, p = _pair()
    with pytest.raises(ValueError, match="gaussian_negatives"):
        info_nce(a, p, gaussian_negatives=count)


@pytest.mark.parametrize("weight", [math.inf, math.nan, 0.0, -0.0, -1.0])
@pytest.mark.parametrize("name", ["hard_negative_weight", "gaussian_weight"])
def test_bad_weights_are_rejected(name, weight):
    a, p = _pair()
    with pytest.raises(ValueError, match=name):
        info_nce(a, p, a, **{name: weight})


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weight", [1e300, 5e-324, 1e-300])
def test_extreme_weights_match_the_reference(weight, backend, monkeypatch):
    a, p = _pair(dtype=torch.float64)
    h = torch.randn_like(a)
    ours = info_nce(a, p, h, hard_negative_weight=weight, backend=_use(backend, monkeypatch), reduction="none")
    ref = info_nce_reference(a, p, h, hard_negative_weight=weight, reduction="none")
    assert torch.allclose(ours, ref, rtol=1e-10, atol=0)


# --------------------------------------------------------- layouts, signs, autograd

def _layouts(x: torch.Tensor) -> dict:
    """The same values as ``x`` (n x d) in other memory layouts."""
    n, d = x.shape
    wide = torch.zeros(2 * n, 3 * d, dtype=x.dtype)
    wide[::2, ::3] = x
    return {
        "transposed": x.t().contiguous().t(),
        "strided": wide[::2, ::3],
        "offset": torch.cat([torch.zeros(1, d, dtype=x.dtype), x])[1:],
    }


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_non_contiguous_inputs_give_the_same_result(layout, backend, monkeypatch):
    a, p = _pair(n=7, d=6, dtype=torch.float64)
    name = _use(backend, monkeypatch)
    ref = info_nce(a, p, a.flip(0), backend=name, reduction="none")
    xs = [_layouts(t)[layout].requires_grad_() for t in (a, p)]
    out = info_nce(xs[0], xs[1], _layouts(a.flip(0))[layout], backend=name, reduction="none")
    assert torch.allclose(out, ref, rtol=1e-13, atol=0)
    out.sum().backward()
    a2, p2 = a.clone().requires_grad_(), p.clone().requires_grad_()
    info_nce(a2, p2, a.flip(0), backend=name, reduction="none").sum().backward()
    assert torch.allclose(xs[0].grad, a2.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(xs[1].grad, p2.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_expanded_zero_stride_inputs(backend, monkeypatch):
    """Rows that share memory (stride 0): every anchor the same row; a zero-stride column."""
    g = torch.Generator().manual_seed(4)
    one = torch.randn(1, 5, generator=g, dtype=torch.float64).requires_grad_()
    col = torch.randn(6, 1, generator=g, dtype=torch.float64).requires_grad_()
    p = torch.randn(6, 5, generator=g, dtype=torch.float64)
    name = _use(backend, monkeypatch)
    out = info_nce(one.expand(6, 5), col.expand(6, 5), p, backend=name)
    out.backward()
    one2, col2 = one.detach().clone().requires_grad_(), col.detach().clone().requires_grad_()
    ref = info_nce_reference(one2.expand(6, 5).contiguous(), col2.expand(6, 5).contiguous(), p)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-12)
    assert torch.allclose(one.grad, one2.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(col.grad, col2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_negative_zero_and_zero_rows(backend, monkeypatch):
    a, p = _pair(dtype=torch.float64)
    a[1] = -0.0
    p[2] = 0.0
    a[3, ::2] = -0.0
    name = _use(backend, monkeypatch)
    x, y = a.clone().requires_grad_(), p.clone().requires_grad_()
    out = info_nce(x, y, backend=name, reduction="none")
    out.sum().backward()
    rx, ry = a.clone().requires_grad_(), p.clone().requires_grad_()
    ref = info_nce_reference(rx, ry, reduction="none")
    ref.sum().backward()
    assert torch.allclose(out, ref, rtol=1e-12) and torch.equal(out, info_nce(a.abs() * a.sign(), p, backend=name,
                                                                            reduction="none"))
    assert torch.allclose(x.grad, rx.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(y.grad, ry.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("wants", [(), ("a",), ("p",), ("h",), ("tau",), ("a", "tau"), ("p", "h"),
                                   ("a", "p", "h", "tau")])
def test_requires_grad_combinations(wants, backend, monkeypatch):
    a, p = _pair(dtype=torch.float64)
    h, e = torch.randn_like(a), torch.randn(3, a.shape[1], dtype=torch.float64)
    name = _use(backend, monkeypatch)

    def leaves():
        return {"a": a.clone().requires_grad_("a" in wants), "p": p.clone().requires_grad_("p" in wants),
                "h": h.clone().requires_grad_("h" in wants),
                "tau": torch.tensor(0.07, dtype=torch.float64).requires_grad_("tau" in wants),
                "e": e.clone().requires_grad_()}  # extra negatives never get a gradient

    ours, ref = leaves(), leaves()
    out = info_nce(ours["a"], ours["p"], ours["h"], ours["e"], temperature=ours["tau"], backend=name)
    expected = info_nce_reference(ref["a"], ref["p"], ref["h"], ref["e"], temperature=ref["tau"])
    assert torch.allclose(out, expected, rtol=1e-12)
    if not wants:
        assert not out.requires_grad
        return
    out.backward()
    expected.backward()
    for key in ("a", "p", "h", "tau"):
        assert (ours[key].grad is None) == (key not in wants)
        if key in wants:
            assert torch.allclose(ours[key].grad, ref[key].grad, rtol=1e-10, atol=1e-14)
    assert ours["e"].grad is None


def test_empty_extra_negatives_are_no_negatives():
    a, p = _pair(dtype=torch.float64)
    for backend in ("reference", "torch", "triton"):
        assert torch.allclose(info_nce(a, p, extra_negatives=a[:0], backend=backend), info_nce_reference(a, p),
                              rtol=1e-12)


def test_inputs_too_large_for_32_bit_offsets_are_refused_by_triton():
    from fastcl.ops.infonce_fwd import infonce_forward
    from fastcl.ops.layout import ColumnLayout

    q = torch.empty(2 ** 22, 1024, device="meta")
    params = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="too large for the Triton kernels"):
        infonce_forward(q, q, params, None, ColumnLayout.plain(q.shape[0]))


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, matmul_operand(tl.load(x_ptr + i), tl.bfloat16, True))


def test_interpreter_bf16_rounding_matches_torch():
    """The interpreter's bf16 emulation (tiles.matmul_operand) rounds to nearest even, as
    the GPU's cast and torch's do: ties, subnormals, large and negative values."""
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the emulation runs under the interpreter only")
    g = torch.Generator().manual_seed(5)
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3e-39, 1e-40, 6.5e4, 2.9e38, 0.0])
    x = torch.cat([ties, torch.randn(248, generator=g) * torch.logspace(-30, 30, 248)]).float()
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, N=256)
    assert torch.equal(y, x.to(torch.bfloat16).float())


# ------------------------------------------------------- the bound at real sizes (GPU)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["slab", "workspace"])
@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("scale", [1e-3, 1.0, 3e3, 1e4, "spread"])
@pytest.mark.parametrize("d", [128, 768])
def test_half_precision_bound_at_scale_on_gpu(d, scale, dtype_name, strategy, monkeypatch):
    """The compiled kernels (tensor-core 16-bit operands) against the float64 chunked
    path on the same rounded inputs, N = 4096, hard negatives and a mean reduction
    (g = 1/N, the case that sent the old operand below float16's range)."""
    monkeypatch.setenv("FASTCL_BACKWARD", strategy)
    dtype = HALF[dtype_name]
    n = 4096
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rows = [torch.randn(n, d, device=DEVICE, dtype=torch.float64, generator=g) for _ in range(3)]
    if scale == "spread":
        norms = torch.logspace(-3, 4, n, device=DEVICE, dtype=torch.float64)
        norms = norms[torch.randperm(n, device=DEVICE, generator=g)][:, None]
        rows = [x / x.norm(dim=1, keepdim=True) * norms for x in rows]
    else:
        rows = [x * scale for x in rows]
    rows = [x.to(dtype) for x in rows]

    def run(xs, backend):
        leaves = [x.clone().requires_grad_() for x in xs]
        loss = info_nce(*leaves, hard_negative_weight=2.0, backend=backend)
        return loss.detach(), torch.autograd.grad(loss, leaves)

    loss, grads = run(rows, "triton")
    ref_loss, ref_grads = run([x.double() for x in rows], "torch")
    u = UNIT_ROUNDOFF[dtype]
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * (abs(ref_loss.item()) + 1 / TAU)
    for x, mine, ref in zip(rows, grads, ref_grads):
        # Row by row, as in _check_bound (g = 1/N under the mean).
        err = (mine.double() - ref).norm(dim=1)
        rep = (ref.to(dtype).double() - ref).norm(dim=1)
        size = ref.norm(dim=1)
        floor = 16 * 2.0 ** -24 / TAU ** 2 / n / x.double().norm(dim=1)
        excess = ((err - rep - floor) / (u * size)).max().item()
        print(f"D={d} {dtype_name} scale={scale} {strategy}: worst row {excess:.2f} u")
        assert excess <= EXCESS["triton-slab"], f"a row {excess:.2f} u beyond rounding and float32 floor"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_temperature_with_float64_inputs_is_exact(backend, monkeypatch):
    """1 / tau is formed in the wider dtype: a float32 temperature with float64 inputs
    used to reach the kernels as 1 / tau rounded to float32 (6e-8 off)."""
    a, p = _pair(dtype=torch.float64)
    tau = torch.tensor(0.07, dtype=torch.float32, requires_grad=True)
    ours = info_nce(a, p, temperature=tau, backend=_use(backend, monkeypatch), reduction="none")
    ref = info_nce_reference(a, p, temperature=tau.detach().double(), reduction="none")
    assert torch.allclose(ours, ref, rtol=1e-13, atol=0)


# ------------------------------------------- gathered and ring losses with the extremes

DIST_CASES = {"fp32_mixed": EXTREMES["fp32_mixed"], "fp16_norm_above_65504": EXTREMES["fp16_norm_above_65504"]}


def _dist_worker(rank, world, port, results):
    from fastcl.distributed import gathered_info_nce, ring_info_nce

    with gloo_group(rank, world, port):
        out = {}
        for case, (dtype, scales, eps) in DIST_CASES.items():
            full = _extreme_case(dtype, scales)
            local = len(scales) // world
            for fn in (gathered_info_nce, ring_info_nce):
                leaves = [x[rank * local:(rank + 1) * local].to(dtype).clone().requires_grad_() for x in full]
                loss = fn(*leaves, eps=eps, backend="torch", reduction="sum")
                loss.backward()
                out[(case, fn.__name__)] = (loss.detach(), [x.grad for x in leaves])
        results[rank] = out


def test_gathered_and_ring_losses_with_extreme_rows():
    import torch.multiprocessing as mp

    world = 2
    results = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(world, free_port(), results), nprocs=world, join=True)
    for case, (dtype, scales, eps) in DIST_CASES.items():
        full = [x.to(dtype).clone().requires_grad_() for x in _extreme_case(dtype, scales)]
        expected = info_nce(*full, eps=eps, backend="torch", reduction="sum")
        expected.backward()
        local = len(scales) // world
        for name in ("gathered_info_nce", "ring_info_nce"):
            # Each rank returns W times its local sum, and gets W times the global gradient (DDP averages).
            total = sum(results[r][(case, name)][0] for r in range(world)) / world
            assert torch.isfinite(total) and abs(total.item() - expected.item()) <= 1e-5 * abs(expected.item()), name
            for r in range(world):
                for grad, x in zip(results[r][(case, name)][1], full):
                    ref = x.grad[r * local:(r + 1) * local]
                    assert _rel(grad.double() / world, ref) <= 2 * _rel(ref.double(), ref) + 1e-5 + 2 ** -10, name


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_meta_tensors_give_shapes(backend):
    """Meta tensors carry no values: the value checks are skipped (they used to fail with
    "Cannot copy out of meta tensor") and the loss and gradients come out as shapes on
    the backends with shape-only kernels (the dense reference; the operators' fake
    kernels). The chunked path and Triton need values."""
    a = torch.empty(300, 8, device="meta", requires_grad=True)
    p = torch.empty(300, 8, device="meta")
    loss = info_nce(a, p, backend=backend, reduction="none")
    assert loss.device.type == "meta" and loss.shape == (300,)
    loss.sum().backward()
    assert a.grad.shape == a.shape
    assert nt_xent(a.detach(), p, backend=backend).shape == ()
