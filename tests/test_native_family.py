"""The native C++ CPU kernels compute the loss family's per-entry rules: K hard-negative
blocks per row, the hardness penalty (on the logit's value only) and the false-negative
margin (per-row thresholds), in the forward, the recomputing backward and the one pass.

Held to the float64 reference at ragged sizes and several tilings (the operators to
fastcl.reference.layout_loss_reference, the loss to the dense backend), gradcheck
through the native operator, opcheck of the extended schemas, and the CUDA wrappers'
refusal of the rules the Triton kernels lack.
"""

from __future__ import annotations


import pytest
import torch
from torch.autograd import gradcheck

from fastcl import info_nce
from fastcl.ops import dispatch, operators
from fastcl.ops.function import kernel_params
from fastcl.ops.layout import HARDNESS_ALL, HARDNESS_HARD, HARDNESS_IN_BATCH
from fastcl.reference import layout_loss_reference

from .helpers import cpu_tiles, needs_native
from .test_family import ALL4, LAYOUT_CASES, OPTION_CASES, _assert_matches, _inputs, _layout_case, _loss_and_grads
from .test_one_pass import count_paths  # noqa: F401 - a fixture

pytestmark = needs_native

TILES = [None, (3, 4)]
TILE_IDS = ["default_tiles", "tiles3x4"]


def _targets(kind, n, masked_hard):
    if kind == "labels":
        if masked_hard:
            return torch.arange(n).flip(0)
        return torch.randperm(n, generator=torch.Generator().manual_seed(1)) + n
    return {"diagonal": None, "none": torch.full((n,), -1, dtype=torch.int64)}[kind]


def _one_pass(q, k, params, targets, layout, row_weight, eps, thresholds, blocks=(0, 0)):
    return operators._call(torch.ops.fastcl.infonce_fwd_grad, q, k, params, targets, layout, None,
                           (row_weight, True, True, *blocks), eps, thresholds)


# ------------------------------------------------------------------ the operators


@pytest.mark.parametrize("tiles", TILES, ids=TILE_IDS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[f"case{i}" for i in range(len(LAYOUT_CASES))])
@pytest.mark.parametrize("targets", ["diagonal", "none", "labels"])
def test_operators_equal_layout_reference(case, targets, tiles, monkeypatch):
    # Every rule and their combinations (LAYOUT_CASES: K = 1, 2, 3, each hardness mode,
    # the margin, a -inf own-hard weight), with and without fused normalization: the
    # forward, the recomputing backward (per-row gradients) and the one pass (uniform
    # row gradients) against the reference's autograd.
    cpu_tiles(monkeypatch, tiles)
    n, d, k_blocks, n_extra, mode, strength, margin, masked_hard = case
    q, k, layout, thresholds = _layout_case(n, d, k_blocks, n_extra, mode, strength, margin, masked_hard, seed=n)
    tgt = _targets(targets, n, masked_hard)
    for eps in (None, 1e-12):
        inv_tau = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
        expected = layout_loss_reference(qr, kr, inv_tau, layout, tgt, thresholds=thresholds, normalize_eps=eps)
        finite = torch.isfinite(expected)
        assert not (expected == float("inf")).any()  # no row whose target is masked here
        weights = torch.linspace(0.5, 1.5, n, dtype=torch.float64).where(finite, 0)
        grads = torch.autograd.grad((expected.where(finite, 0) * weights).sum(), (qr, kr, inv_tau),
                                    retain_graph=True)
        params = kernel_params(inv_tau, layout, torch.float64)

        lse, target_logit = operators.operator_forward(q, k, params, tgt, layout, normalize_eps=eps,
                                                       thresholds=thresholds)
        torch.testing.assert_close(lse - target_logit, expected.detach(), rtol=0, atol=1e-12)
        dq, dk, row_dot = operators.operator_backward(q, k, params, tgt, layout, lse, weights, normalize_eps=eps,
                                                      thresholds=thresholds)
        torch.testing.assert_close(dq, grads[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dk, grads[1][:layout.n_grad_cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(row_dot.sum(), grads[2], rtol=0, atol=1e-12)

        row_weight = 0.25  # the one pass: every row's gradient is the same
        grads = torch.autograd.grad(expected.where(finite, 0).sum() * row_weight, (qr, kr, inv_tau))
        loss_rows, dq, dk, row_dot = _one_pass(q, k, params, tgt, layout, row_weight, eps, thresholds,
                                               blocks=tiles or (0, 0))
        torch.testing.assert_close(loss_rows, expected.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(dq, grads[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dk, grads[1][:layout.n_grad_cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(row_dot.sum(), grads[2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", [HARDNESS_IN_BATCH, HARDNESS_HARD, HARDNESS_ALL])
def test_each_hardness_mode_penalizes_exactly_its_entries(mode):
    # The penalty's value, entry by entry: with K = 3 blocks and labels that point into
    # the hard blocks (a row's target may be one of its own hard negatives, never
    # penalized), the forward equals the log-sum-exp of logits built by hand.
    n, d, k_blocks, n_extra, strength = 6, 5, 3, 2, 2.5
    q, k, layout, _ = _layout_case(n, d, k_blocks, n_extra, None, 0.0, None, False, seed=3)
    layout = layout._replace(hardness_mode=mode, hardness_strength=strength, log_hard_weight=0.0)
    tgt = torch.tensor([n + 0, 2 * n + 1, 0, 3, 3 * n + 4, n + 2])  # own hard, own hard, ..., another's hard
    params = kernel_params(torch.tensor(5.0, dtype=torch.float64), layout, torch.float64)
    lse, target_logit = operators.operator_forward(q, k, params, tgt, layout)
    sim = q @ k.T
    rows, cols = torch.arange(n), torch.arange(layout.n_cols)
    own = layout.own_hard(rows, cols)
    assert own.sum() == n * k_blocks
    not_target = cols[None, :] != tgt[:, None]
    penalized = not_target & {HARDNESS_IN_BATCH: ~own, HARDNESS_HARD: own, HARDNESS_ALL: torch.ones_like(own)}[mode]
    logits = sim * 5.0 + strength * sim * penalized
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(target_logit, logits.gather(1, tgt[:, None])[:, 0], rtol=0, atol=1e-12)


def test_fully_masked_rows_give_zero_probabilities_in_every_kernel():
    # Target -1 and a margin below every similarity: each entry is dropped. The row's
    # value is -inf; the backward and the one pass give it no gradient and no NaN.
    n, d = 5, 4
    q, k, layout, thresholds = _layout_case(n, d, 2, 1, "all_negatives", 1.0, None, False, seed=2)
    thresholds = torch.full((n,), -1e9, dtype=torch.float64)  # below every raw product too
    thresholds[0] = 1e9  # row 0 keeps every entry
    tgt = torch.full((n,), -1, dtype=torch.int64)
    params = kernel_params(torch.tensor(3.0, dtype=torch.float64), layout, torch.float64)
    for eps in (None, 1e-12):
        lse, target_logit = operators.operator_forward(q, k, params, tgt, layout, normalize_eps=eps,
                                                       thresholds=thresholds)
        assert torch.isfinite(lse[0]) and (lse[1:] == float("-inf")).all() and (target_logit == 0).all()
        grad_rows = torch.ones(n, dtype=torch.float64)
        dq, dk, row_dot = operators.operator_backward(q, k, params, tgt, layout, lse, grad_rows, normalize_eps=eps,
                                                      thresholds=thresholds)
        loss_rows, dq1, dk1, row_dot1 = _one_pass(q, k, params, tgt, layout, 1.0, eps, thresholds)
        for x in (dq, dk, row_dot, dq1, dk1, row_dot1):
            assert torch.isfinite(x).all()
        assert (dq[1:] == 0).all() and (row_dot[1:] == 0).all() and (dq1[1:] == 0).all() and (row_dot1[1:] == 0).all()
        torch.testing.assert_close(loss_rows, lse, rtol=0, atol=1e-12)
        torch.testing.assert_close(dq1, dq, rtol=0, atol=1e-12)
        torch.testing.assert_close(dk1, dk, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------ the loss

#: Cases of test_family.OPTION_CASES that need a rule the native kernels gained.
NATIVE_CASES = [c for c in OPTION_CASES if c[2] > 1 or "hardness_mode" in c[1] or "false_negative_margin" in c[1]]


@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_loss_equals_dense(case, monkeypatch, count_paths):  # noqa: F811 - the fixture
    # Through info_nce with backend="cpp", learnable temperature, labels where the case
    # has them: reduction "none" takes the recomputing backward; "mean" and "sum" take
    # the one pass wherever every row's gradient is equal (small tiles make "auto" take
    # it at these sizes).
    cpu_tiles(monkeypatch, (4, 5))
    n, d = 13, 7
    seed = 17
    for reduction in ("none", "mean", "sum"):
        before = dict(count_paths)
        expected, expected_grads = _loss_and_grads("dense", case, n, d, seed, reduction)
        got, grads = _loss_and_grads("cpp", case, n, d, seed, reduction)
        _assert_matches(got, grads, expected, expected_grads)
        ran = {p: count_paths[p] - before[p] for p in count_paths}
        assert ran["one_pass"] + ran["recompute"] > 0
        if reduction == "none":
            assert ran["one_pass"] == 0


def test_one_pass_serves_the_rules(monkeypatch, count_paths):  # noqa: F811 - the fixture
    # A reduced loss with one term and every rule runs the native one pass alone.
    cpu_tiles(monkeypatch, (4, 5))
    case = ("all-rules", dict(hardness_mode="in_batch_negatives", hardness_strength=2.0,
                              false_negative_margin=0.05, labels=True), 3, 2, 2)
    expected, expected_grads = _loss_and_grads("dense", case, 11, 6, 5)
    got, grads = _loss_and_grads("cpp", case, 11, 6, 5)
    assert count_paths == {"one_pass": 1, "recompute": 0}
    _assert_matches(got, grads, expected, expected_grads)


def test_auto_takes_the_native_kernels_for_the_rules(monkeypatch):
    from fastcl.plan import LossOptions, plan_info_nce

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # else "auto" picks Triton's interpreter on CPU

    a, p, h, _ = _inputs(300, 4, 3, 0, seed=1)  # above the dense path's size
    options = LossOptions(directions=ALL4, hardness_mode="all_negatives", hardness_strength=1.0,
                          false_negative_margin=0.1).checked()
    plan = plan_info_nce(options, a, p, h)
    assert plan.rows.plan.backend == "cpp"


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fully_masked_rows_keep_every_gradient_finite(reduction, monkeypatch):
    # As in test_family for the chunked path: a margin below -2 drops every entry of the
    # same-tower rows; their -inf terms add nothing and no NaN, also to the temperature.
    cpu_tiles(monkeypatch, (4, 5))
    a, p, h, _ = _inputs(7, 3, 2, 0, seed=4)
    results = {}
    for backend in ("dense", "cpp"):
        leaves = [x.clone().requires_grad_() for x in (a, p, h)]
        tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        loss = info_nce(*leaves, temperature=tau, directions=ALL4, false_negative_margin=-3.0, backend=backend,
                        reduction=reduction, partition_mode="joint")
        results[backend] = loss.detach(), torch.autograd.grad(loss.sum(), leaves + [tau])
    _assert_matches(*results["cpp"], *results["dense"])


# ----------------------------------------------------------------------- gradcheck

GRADCHECK_CASES = [
    ("k3-weighted", dict(hard_negative_weight=1.7), 3, 2),
    ("k3-labels", dict(labels=True), 3, 0),
    ("margin", dict(false_negative_margin=0.05), 2, 1),
    ("margin-gte", dict(directions=ALL4, false_negative_margin=0.05), 2, 0),
    ("hardness-in-batch", dict(hardness_mode="in_batch_negatives", hardness_strength=3.0), 2, 2),
    ("hardness-hard", dict(hardness_mode="hard_negatives", hardness_strength=3.0), 3, 0),
    ("hardness-all", dict(hardness_mode="all_negatives", hardness_strength=3.0), 1, 1),
]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name,options,k,n_extra", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck_native(name, options, k, n_extra, reduction, monkeypatch):
    # Through the native operators: "none" recomputes, "mean" takes the one pass (small
    # tiles make "auto" take it). The hardness penalty is a stop-gradient term that
    # finite differences of the inputs cannot see: there only the temperature (on which
    # it does not depend) is checked; the inputs' gradients are held to the reference's
    # autograd above.
    cpu_tiles(monkeypatch, (2, 3))
    a, p, h, e = _inputs(5, 3, k, n_extra, seed=11)
    options = dict(options)
    if options.pop("labels", False):
        options["labels"] = torch.tensor([5, 0, 9, 13, 4])  # positives and hard negatives
    tau = torch.tensor(0.2, dtype=torch.float64)

    def loss(a, p, h, tau):
        return info_nce(a, p, h, e, temperature=tau, backend="cpp", reduction=reduction, **options)

    stop_gradient = "hardness_mode" in options
    inputs = tuple(x.clone().requires_grad_(not stop_gradient or x is tau) for x in (a, p, h, tau))
    assert gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- opcheck


def _rule_args(dtype, hardness_mode, margin, k_blocks=3, n=9, d=6):
    q, k, layout, thresholds = _layout_case(n, d, k_blocks, 2, None, 0.0, 0.05 if margin else None, False, seed=4)
    layout = layout._replace(hardness_mode=hardness_mode, hardness_strength=1.5 if hardness_mode else 0.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    params = torch.tensor([4.0, layout.log_hard_weight, layout.log_gauss_weight], dtype=acc)
    tgt = torch.randint(-1, layout.n_cols, (n,), generator=torch.Generator().manual_seed(2))
    head = (q.to(dtype), k.to(dtype), params, tgt, *layout[:operators.N_LAYOUT_FIELDS], None, None)
    tail = (*layout[operators.N_LAYOUT_FIELDS:], thresholds.to(acc) if thresholds is not None else None)
    return head, tail


OPCHECK_RULES = {
    "k3_fp64": (torch.float64, 0, False),
    "hardness_in_batch_fp32": (torch.float32, HARDNESS_IN_BATCH, False),
    "margin_fp64": (torch.float64, 0, True),
    "everything_bf16": (torch.bfloat16, HARDNESS_HARD, True),
}


@pytest.mark.parametrize("normalize_eps", [None, 1e-12], ids=["raw", "fused_normalize"])
@pytest.mark.parametrize("variant", list(OPCHECK_RULES))
def test_opcheck_extended_schemas(variant, normalize_eps):
    head, tail = _rule_args(*OPCHECK_RULES[variant])
    torch.library.opcheck(torch.ops.fastcl.infonce_fwd.default, (*head, normalize_eps, *tail))
    lse, _ = torch.ops.fastcl.infonce_fwd(*head, normalize_eps, *tail)
    grad_rows = torch.linspace(0.5, 1.5, lse.shape[0], dtype=lse.dtype)
    torch.library.opcheck(torch.ops.fastcl.infonce_bwd.default,
                          (*head, lse, grad_rows, True, True, normalize_eps, *tail))
    torch.library.opcheck(torch.ops.fastcl.infonce_fwd_grad.default,
                          (*head, 0.5, True, True, 4, 5, normalize_eps, *tail))


def test_nine_field_calls_keep_their_meaning():
    # The trailing arguments have defaults: a call written for the nine-field schemas
    # equals one that spells the defaults out.
    head, _ = _rule_args(torch.float64, 0, False, k_blocks=1)
    short = torch.ops.fastcl.infonce_fwd(*head)
    spelled = torch.ops.fastcl.infonce_fwd(*head, None, 1, 0, 0.0, None)
    for x, y in zip(short, spelled):
        assert torch.equal(x, y)


@pytest.mark.parametrize("change,message", [
    (dict(n_hard_blocks=0), "n_hard_blocks must be >= 1"),
    (dict(n_hard_blocks=9), "hard-negative columns"),
    (dict(hardness_mode=4), "hardness_mode must be 0, 1, 2 or 3"),
    (dict(hardness_strength=float("nan")), "hardness_strength must be finite"),
    (dict(thresholds=torch.zeros(3, dtype=torch.float64)), "thresholds must be a 1-D floating CPU tensor"),
    (dict(thresholds=torch.zeros(9, dtype=torch.int64)), "thresholds must be a 1-D floating CPU tensor"),
])
def test_operators_reject_bad_rules(change, message):
    head, (n_hard_blocks, hardness_mode, hardness_strength, thresholds) = _rule_args(torch.float64, 0, True)
    rules = dict(n_hard_blocks=n_hard_blocks, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
                 thresholds=thresholds)
    rules.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastcl.infonce_fwd(*head, None, *rules.values())


def test_features_name_the_native_rules():
    assert {"hard_blocks", "hardness", "margin", "masked_hard"} <= dispatch.FEATURES["cpp"]
