"""Backend names, the public backward strategy, and the dispatch table that both select."""

import pytest
import torch

from fastcl import InfoNCELoss, NTXentLoss, info_nce, info_nce_reference, nt_xent
from fastcl import plan as plan_module
from fastcl.ops import dispatch
from fastcl.ops.chunked import chunked_backward, chunked_forward
from fastcl.plan import LossOptions, plan_info_nce

from .helpers import NATIVE


def _inputs(n=40, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3)]


def _loss_and_grads(fn, **options):
    a, p, h = _inputs()
    loss = fn(a, p, h, **options)
    loss.backward()
    return loss.detach(), a.grad, p.grad, h.grad


@pytest.mark.parametrize("new, old", [("chunked", "torch"), ("dense", "reference"),
                                      pytest.param("cpp", "native", marks=NATIVE.marks)])
def test_backend_names_and_their_aliases_run_the_same(new, old):
    ours, theirs = _loss_and_grads(info_nce, backend=new), _loss_and_grads(info_nce, backend=old)
    for x, y in zip(ours, theirs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend, strategy", [("triton", "slab"), ("triton", "workspace"), ("chunked", "workspace"),
                                               pytest.param("cpp", "workspace", marks=NATIVE.marks)])
def test_each_backward_strategy_matches_the_reference(backend, strategy):
    ours = _loss_and_grads(info_nce, backend=backend, backward_strategy=strategy, hard_negative_weight=1.5)
    ref = _loss_and_grads(info_nce_reference, hard_negative_weight=1.5)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_the_strategy_argument_wins_over_the_environment(monkeypatch):
    # FASTCL_BACKWARD overrides "auto" only.
    monkeypatch.setenv("FASTCL_BACKWARD", "workspace")
    options = LossOptions(backend="triton", backward_strategy="slab").checked()
    a, p, _ = _inputs()
    assert plan_info_nce(options, a, p).rows.plan.backward == "slab"
    options = LossOptions(backend="triton").checked()
    assert plan_info_nce(options, a, p).rows.plan.backward == "workspace"


def test_an_explicit_strategy_takes_a_fused_backend_for_tiny_batches():
    a, p, _ = _inputs(n=8)
    assert plan_info_nce(LossOptions().checked(), a, p).rows is None  # the dense path
    plan = plan_info_nce(LossOptions(backward_strategy="workspace").checked(), a, p).rows.plan
    assert plan.backend != "dense" and plan.backward == "workspace"


@pytest.mark.parametrize("make", [
    lambda: InfoNCELoss(backend="cpp", backward_strategy="slab"),
    lambda: InfoNCELoss(backend="torch", backward_strategy="slab"),
    lambda: NTXentLoss(backend="dense", backward_strategy="workspace"),
    lambda: InfoNCELoss(backward_strategy="fast"),
    lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), backward_strategy="recompute"),
])
def test_a_strategy_the_backend_does_not_offer_is_refused(make):
    with pytest.raises(ValueError, match="backward_strategy"):
        make()


def test_unknown_backend_names_every_accepted_name():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpp', 'chunked', 'dense', "
                                         r"'native', 'torch', 'reference'\)"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="cuda")


def test_triton_without_a_gpu_or_the_interpreter_says_where_it_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
        info_nce(torch.randn(300, 8), torch.randn(300, 8), backend="triton")


# A strategy that forms the gradients in the forward (one pass, for losses reduced to a
# scalar) is one more entry of the table; here the chunked path stands in for its kernel.


def _forward_with_gradients(q, k, params, targets, layout, groups=None, normalize_eps=None, need_dq=True,
                            need_dk=True):
    lse, target_logit = chunked_forward(q, k, params, targets, layout, groups, normalize_eps)
    ones = torch.ones_like(lse)
    dq, dk, row_dot = chunked_backward(q, k, params, targets, layout, lse, ones, need_dq, need_dk, groups,
                                       normalize_eps)
    return lse - target_logit, dq, dk, row_dot


@pytest.fixture
def one_pass(monkeypatch):
    monkeypatch.setitem(dispatch.TABLE, ("cpu", "chunked", "one_pass"),
                        lambda: dispatch.Kernels(_forward_with_gradients, None))
    monkeypatch.setattr(dispatch, "GRADIENTS_IN_FORWARD", frozenset({"one_pass"}))
    monkeypatch.setattr(plan_module, "BACKWARD_STRATEGIES", plan_module.BACKWARD_STRATEGIES + ("one_pass",))


@pytest.mark.parametrize("options", [dict(), dict(reduction="sum", symmetric=True),
                                     dict(temperature="learnable", extra=True, gaussian_negatives=3)])
def test_a_strategy_with_gradients_in_the_forward_plugs_into_the_table(one_pass, options):
    options = dict(options)
    extra = torch.randn(5, 12, dtype=torch.float64) if options.pop("extra", False) else None

    def run(strategy):
        a, p, h = _inputs()
        tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True) if options.get("temperature") else 0.1
        kwargs = {**options, "temperature": tau}
        loss = info_nce(a, p, h, extra, backend="chunked", backward_strategy=strategy,
                        generator=torch.Generator().manual_seed(3), **kwargs)
        (2.5 * loss).backward()
        return [loss.detach(), a.grad, p.grad, h.grad] + ([tau.grad] if isinstance(tau, torch.Tensor) else [])

    for x, y in zip(run("one_pass"), run("workspace")):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_gradients_in_the_forward_are_refused_for_per_row_losses(one_pass):
    a, p, _ = _inputs()
    with pytest.raises(ValueError, match="'one_pass' forms the gradients in the forward.*reduction='none'"):
        info_nce(a, p, backend="chunked", backward_strategy="one_pass", reduction="none")


@pytest.mark.parametrize("key", list(dispatch.TABLE))
def test_every_table_entry_takes_the_keywords_the_autograd_function_passes(key):
    # ops/function.py calls every entry the same way; an entry that misses a keyword
    # (the guide, the margin's thresholds) fails only on its own device, which for the
    # CUDA entries no CPU test reaches otherwise.
    import inspect

    entry = dispatch.TABLE[key]()
    positional = ("q", "k", "params", "targets", "layout")
    forward_keywords = dict(groups=None, normalize_eps=None, thresholds=None, guide=None)
    if entry.backward is None:
        forward_keywords.update(need_dq=True, need_dk=True)
    inspect.signature(entry.forward).bind(*positional, **forward_keywords)
    if entry.backward is not None:
        inspect.signature(entry.backward).bind(*positional, "lse", "grad_rows", need_dq=True, need_dk=True,
                                               groups=None, normalize_eps=None, thresholds=None, guide=None)
