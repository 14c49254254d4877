"""The Triton kernels compute the loss family's per-entry rules: K hard negatives per row,
the hardness penalty (each mode), the false-negative margin, targets of -1 and rows with
every entry masked, in the forward, both recomputing backwards and the one pass.

Held to the dense reference in float64 (fastcl/reference.py), at tiny ragged sizes: the
kernels run in Triton's interpreter here.
"""

from __future__ import annotations

import pytest
import torch

from fastcl.ops.function import kernel_params
from fastcl.ops.infonce_bwd_slab import infonce_backward_slab
from fastcl.ops.infonce_bwd_workspace import infonce_backward_workspace
from fastcl.ops.infonce_fwd import infonce_forward
from fastcl.ops.infonce_one_pass import infonce_forward_grad
from fastcl.ops.layout import HARDNESS_MODES, ColumnLayout
from fastcl.reference import layout_loss_reference

from .test_family import ALL4, OPTION_CASES, Q2D, D2Q, _inputs, _layout_case, _loss_and_grads

#: The loss-level tests below run the Triton entries of CPU tensors (the interpreter). On
#: a GPU, test_launchers_equal_layout_reference runs the compiled kernels on CUDA tensors,
#: and test_cuda_operators_pass_every_rule_to_the_launchers checks the operators between.
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="written for CPU tensors under the interpreter; "
                                 "on a GPU the launcher tests run the compiled kernels")

# ------------------------------------------------------------------ the launchers


def _case(n, d, k_blocks, n_extra, mode, strength, margin, masked_hard, seed):
    """Queries, columns [p; K hard blocks; extra], the layout and the thresholds."""
    return _layout_case(n, d, k_blocks, n_extra, mode, strength, margin, masked_hard, seed, hard_weight=0.4)


CASES = [
    # n, d, K, extra, hardness mode, strength, margin, -inf own hard weight
    (5, 3, 3, 0, None, 0.0, None, False),
    (7, 16, 1, 2, "in_batch_negatives", 2.5, None, False),
    (7, 5, 3, 3, "in_batch_negatives", 2.0, None, False),
    (6, 16, 3, 0, "hard_negatives", 4.0, None, False),
    (13, 3, 1, 2, "all_negatives", 1.5, None, False),
    (13, 16, 2, 4, None, 0.0, 0.05, False),
    (7, 3, 3, 2, "all_negatives", 3.0, -0.1, False),
    (5, 7, 1, 0, "hard_negatives", 0.7, 0.02, False),
    (7, 3, 2, 0, None, 0.0, 0.03, True),
    (6, 4, 3, 1, "in_batch_negatives", 1.0, -3.0, False),  # every entry dropped but the targets
]


def _targets(kind, n, masked_hard):
    if kind == "diagonal":
        return None
    if kind == "none":
        return torch.full((n,), -1, dtype=torch.int64)
    if masked_hard:  # a target under a -inf weight is no target: targets among the positives
        return torch.arange(n).flip(0)
    return torch.randperm(n, generator=torch.Generator().manual_seed(1)) + n  # hard negatives and beyond


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("targets", ["diagonal", "none", "labels"])
def test_launchers_equal_layout_reference(case, targets, device):
    n, d, k_blocks, n_extra, mode, strength, margin, masked_hard = case
    q, k, layout, thresholds = _case(n, d, k_blocks, n_extra, mode, strength, margin, masked_hard, seed=n + d)
    q, k = q.to(device), k.to(device)
    thresholds = thresholds.to(device) if thresholds is not None else None
    tgt = _targets(targets, n, masked_hard)
    tgt = tgt.to(device) if tgt is not None else None
    inv_tau = torch.tensor(6.0, dtype=torch.float64, device=device, requires_grad=True)
    params = kernel_params(inv_tau, layout, torch.float64)
    for eps in (None, 1e-12):
        qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
        expected = layout_loss_reference(qr, kr, inv_tau, layout, tgt, thresholds=thresholds, normalize_eps=eps)
        finite = torch.isfinite(expected)
        if margin == -3.0 and targets == "none":
            # Rows with every entry masked (all of them for cosines): their value is -inf.
            assert not (finite.any() if eps is not None else finite.all())
        weights = torch.linspace(0.5, 1.5, n, dtype=torch.float64, device=device).where(finite, 0)
        grads = torch.autograd.grad((expected.where(finite, 0) * weights).sum(), (qr, kr, inv_tau),
                                    retain_graph=True)
        lse, target_logit = infonce_forward(q, k, params, tgt, layout, normalize_eps=eps, thresholds=thresholds)
        torch.testing.assert_close(lse - target_logit, expected.detach(), rtol=0, atol=1e-12)
        for backward in (infonce_backward_slab, infonce_backward_workspace):
            dq, dk, row_dot = backward(q, k, params, tgt, layout, lse, weights, normalize_eps=eps,
                                       thresholds=thresholds)
            assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(row_dot).all()
            torch.testing.assert_close(dq, grads[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(dk, grads[1][: layout.n_grad_cols], rtol=0, atol=1e-12)
            torch.testing.assert_close(row_dot.sum(), grads[2], rtol=0, atol=1e-12)
        # The one pass: every row's incoming gradient is one weight (rows with no entry
        # get none from the softmax either way).
        grads = torch.autograd.grad((expected.where(finite, 0) * 0.75).sum(), (qr, kr, inv_tau))
        loss_rows, dq, dk, row_dot = infonce_forward_grad(q, k, params, tgt, layout, 0.75, normalize_eps=eps,
                                                          thresholds=thresholds)
        torch.testing.assert_close(loss_rows, expected.detach(), rtol=0, atol=1e-12)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(row_dot).all()
        torch.testing.assert_close(dq, grads[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dk, grads[1][: layout.n_grad_cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(row_dot.sum(), grads[2], rtol=0, atol=1e-12)


@interpreted
def test_rules_change_the_kernels_results():
    # Each rule moves the loss here, so the comparisons above are not vacuous.
    q, k, layout, thresholds = _case(7, 5, 3, 2, "all_negatives", 2.0, -0.05, False, seed=3)
    params = kernel_params(torch.tensor(5.0, dtype=torch.float64), layout, torch.float64)

    def loss(layout, thresholds=None):
        lse, target_logit = infonce_forward(q, k, params, None, layout, normalize_eps=1e-12, thresholds=thresholds)
        return lse - target_logit

    full = loss(layout, thresholds)
    for simpler in (loss(layout), loss(layout._replace(hardness_mode=0)),
                    loss(layout._replace(n_hard_blocks=1, hardness_mode=0), thresholds)):
        assert (full - simpler).abs().max() > 1e-3


@interpreted
def test_thresholds_are_checked():
    q, k, layout, thresholds = _case(5, 3, 1, 0, None, 0.0, 0.1, False, seed=0)
    params = kernel_params(torch.tensor(5.0, dtype=torch.float64), layout, torch.float64)
    with pytest.raises(ValueError, match="thresholds must be a tensor of one value per row"):
        infonce_forward(q, k, params, None, layout, thresholds=thresholds[:4])
    with pytest.raises(ValueError, match="thresholds must be a tensor of one value per row"):
        infonce_forward_grad(q, k, params, None, layout, 1.0, thresholds=thresholds[:, None])


# ------------------------------------------------------------------- the loss level

_BY_NAME = {c[0]: c for c in OPTION_CASES}
#: Per-row losses (slab and workspace backwards).
ROWS_CASES = ["k3", "hard-in-batch", "hard-hard", "hard-all", "margin", "margin-negative", "qwen3-gte",
              "everything", "labels-hardness-margin", "d2q-per-direction"]
#: Reduced losses (the one pass): every row's gradient is the same.
ONE_PASS_CASES = ["k3", "hard-in-batch", "hard-hard", "hard-all", "margin", "labels-hardness-margin",
                  "symmetric-margin", "d2q-per-direction"]
PARAMS = ([(name, "none", s) for name in ROWS_CASES for s in ("slab", "workspace")]
          + [(name, "mean", "one_pass") for name in ONE_PASS_CASES])


@interpreted
@pytest.mark.parametrize("name,reduction,strategy", PARAMS, ids=[f"{n}-{s}" for n, _, s in PARAMS])
def test_triton_loss_equals_reference(name, reduction, strategy):
    title, options, k, n_extra, gaussian = _BY_NAME[name]
    n, d = (7, 16) if len(name) % 2 else (13, 3)
    case = (title, dict(options, backward_strategy=strategy), k, n_extra, gaussian)
    seed = n * 100 + d
    expected, expected_grads = _loss_and_grads("dense", (title, options, k, n_extra, gaussian), n, d, seed, reduction)
    got, grads = _loss_and_grads("triton", case, n, d, seed, reduction)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    for g, e in zip(grads, expected_grads):  # the inputs' and the learnable temperature's
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


@interpreted
@pytest.mark.parametrize("strategy", ["slab", "workspace"])
def test_triton_fully_masked_rows_keep_every_gradient_finite(strategy):
    # A margin below -2 drops every entry of the same-tower rows: their terms are -inf and
    # must add nothing and no NaN, also to a learnable temperature.
    from fastcl import info_nce

    a, p, h, _ = _inputs(7, 3, 2, 0, seed=4)
    leaves = [x.clone().requires_grad_() for x in (a, p, h)]
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = info_nce(*leaves, temperature=tau, directions=ALL4, false_negative_margin=-3.0, backend="triton",
                    backward_strategy=strategy, reduction="none")
    grads = torch.autograd.grad(loss.sum(), leaves + [tau])
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss.detach(), torch.full((7,), torch.log(torch.tensor(2.0)).item(),
                                                         dtype=torch.float64))


GRADCHECK = [
    ("k3", dict(hard_negative_weight=1.7), 3, 1, "slab"),
    ("margin", dict(false_negative_margin=0.05, directions=(Q2D, D2Q)), 2, 0, "workspace"),
    ("hardness-in-batch", dict(hardness_mode="in_batch_negatives", hardness_strength=3.0), 2, 1, "workspace"),
    ("hardness-hard", dict(hardness_mode="hard_negatives", hardness_strength=3.0), 3, 0, "slab"),
    ("hardness-all", dict(hardness_mode="all_negatives", hardness_strength=2.0), 1, 1, "slab"),
]


@interpreted
@pytest.mark.parametrize("name,options,k,n_extra,strategy", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck_triton(name, options, k, n_extra, strategy):
    from torch.autograd import gradcheck

    from fastcl import info_nce

    a, p, h, e = _inputs(4, 3, k, n_extra, seed=11)
    tau = torch.tensor(0.2, dtype=torch.float64)

    def loss(a, p, h, tau):
        return info_nce(a, p, h, e, temperature=tau, backend="triton", backward_strategy=strategy,
                        reduction="none", **options)

    # The hardness penalty is a stop-gradient term that finite differences of the inputs
    # would see: there only the temperature (which the penalty does not touch) is checked;
    # the inputs' gradients are held to the reference's autograd above.
    stop_gradient = "hardness_mode" in options
    inputs = tuple(x.clone().requires_grad_(not stop_gradient or x is tau) for x in (a, p, h, tau))
    assert gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


# -------------------------------------------------------- where the rules are planned


def test_cuda_triton_is_planned_with_every_rule():
    # On CUDA tensors the Triton kernels are reached through the dispatcher operators,
    # which carry every rule: "auto" and a named "triton" keep the call there. Choosing
    # needs no device.
    from fastcl.ops import dispatch
    from fastcl.plan import choose_backend

    cuda = torch.device("cuda")
    for rule in dispatch.LAYOUT_FEATURES:
        needed = frozenset({rule})
        assert dispatch.unsupported("triton", needed) == ()
        assert choose_backend("triton", cuda, 10 ** 6, needed=needed) == "triton"
        assert choose_backend("auto", cuda, 10 ** 6, needed=needed) == "triton"


@pytest.mark.parametrize("op", ["forward", "backward", "backward_workspace", "forward_grad"])
def test_cuda_operators_pass_every_rule_to_the_launchers(op, monkeypatch):
    # The CUDA kernels of the operators are plain functions of the schema's arguments:
    # called here with CPU tensors and the launcher replaced by a recorder, they must hand
    # the launcher the whole layout (K blocks, hardness) and the thresholds.
    import importlib

    from fastcl.ops import operators

    module, name, own = {
        "forward": ("infonce_fwd", "infonce_forward", ()),
        "backward": ("infonce_bwd_slab", "infonce_backward_slab", (torch.zeros(4), torch.ones(4), True, True)),
        "backward_workspace": ("infonce_bwd_workspace", "infonce_backward_workspace",
                               (torch.zeros(4), torch.ones(4), True, True)),
        "forward_grad": ("infonce_one_pass", "infonce_forward_grad", (0.25, True, True, 0, 0)),
    }[op]
    seen = {}

    def recorder(q, k, params, targets, layout, *args, **kwargs):
        seen.update(layout=layout, thresholds=kwargs.get("thresholds"))
        return (None, None, None) if op.startswith("backward") else (None, None, None, None)

    monkeypatch.setattr(importlib.import_module(f"fastcl.ops.{module}"), name, recorder)
    layout = ColumnLayout(n_cols=12, n_grad_cols=12, hard_start=4, n_hard=4, n_hard_blocks=2, gauss_start=12,
                          log_hard_weight=0.5, hardness_mode=HARDNESS_MODES["in_batch_negatives"],
                          hardness_strength=3.0)
    q, k, thresholds = torch.randn(4, 3), torch.randn(12, 3), torch.full((4,), 0.5)
    rest = (*layout[:operators.N_LAYOUT_FIELDS], None, None, *own, None,
            *(getattr(layout, f) for f in operators.RULE_FIELDS), thresholds)
    getattr(operators, f"_cuda_{op}")(q, k, torch.ones(3), None, *rest)
    assert seen["layout"] == layout
    assert seen["thresholds"] is thresholds
