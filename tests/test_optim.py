"""Child-Tuning: ChildTuningAdamW (F and D) and the Fisher-information mask."""

import copy
import math

import pytest
import torch
from torch import nn

from fastcl.optim import ChildTuningAdamW, fisher_information, fisher_mask, top_fraction_mask

LR, WD = 1e-2, 0.1


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _grads(model, step, scale=1.0):
    """Deterministic random gradients for one step (not from a loss: any values do)."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in model.parameters()]


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def _run(model, opt, steps, first=0):
    for step in range(first, first + steps):
        _set_grads(model, _grads(model, step))
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_p_one_equals_torch_adamw_exactly(amsgrad):
    ours, theirs, d_model = _model(), _model(), _model()
    opt = ChildTuningAdamW(ours.parameters(), lr=LR, weight_decay=WD, mode="f", reserve_p=1.0, seed=3,
                           amsgrad=amsgrad)
    ref = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=WD, amsgrad=amsgrad)
    all_ones = {p: torch.ones_like(p, dtype=torch.bool) for p in d_model.parameters()}
    opt_d = ChildTuningAdamW(d_model.parameters(), lr=LR, weight_decay=WD, mode="d", masks=all_ones,
                             amsgrad=amsgrad)
    for m, o in ((ours, opt), (theirs, ref), (d_model, opt_d)):
        _run(m, o, 5)
    for a, b, c in zip(ours.parameters(), theirs.parameters(), d_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(c, b)


def test_task_free_scales_kept_gradients_by_one_over_p_and_draws_fresh_masks():
    p_keep = 0.3
    w = nn.Parameter(torch.zeros(400, 250, dtype=torch.float64))
    opt = ChildTuningAdamW([w], lr=LR, mode="f", reserve_p=p_keep, seed=0)
    masks = []
    for step in range(2):
        grad = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step)) + 5.0
        w.grad = grad.clone()
        opt.step()
        kept = w.grad != 0
        masks.append(kept)
        # Kept entries are exactly g / p; the rest exactly 0.
        assert torch.equal(w.grad[kept], grad[kept] / p_keep)
        assert torch.all(w.grad[~kept] == 0)
        assert abs(kept.double().mean().item() - p_keep) < 0.01  # 100k Bernoulli draws: sd 0.0014
    assert not torch.equal(masks[0], masks[1])  # a fresh mask every step
    overlap = (masks[0] & masks[1]).double().mean().item()
    assert abs(overlap - p_keep ** 2) < 0.01  # independent draws


def test_task_free_masks_follow_the_seed():
    runs = []
    for seed in (7, 7, 8):
        model = _model()
        opt = ChildTuningAdamW(model.parameters(), lr=LR, mode="f", reserve_p=0.5, seed=seed)
        _run(model, opt, 3)
        runs.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_task_free_masked_entries_ignore_this_steps_gradient():
    """Two optimizers in the same state and with the same seed draw the same mask; feed
    them gradients that differ only where that mask is 0: every parameter and every
    moment must come out identical, i.e. the masked gradient entries had no effect."""
    model_a = _model()
    opt_a = ChildTuningAdamW(model_a.parameters(), lr=LR, weight_decay=WD, mode="f", reserve_p=0.4, seed=5)
    _run(model_a, opt_a, 2)
    model_b = copy.deepcopy(model_a)
    opt_b = ChildTuningAdamW(model_b.parameters(), lr=LR, weight_decay=WD, mode="f", reserve_p=0.4, seed=0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # state_dict() shares tensors

    grads = _grads(model_a, 2)
    _set_grads(model_a, grads)
    opt_a.step()
    kept = [p.grad != 0 for p in model_a.parameters()]
    assert any(not k.all() for k in kept) and any(k.any() for k in kept)
    noise = _grads(model_a, 99, scale=100.0)
    _set_grads(model_b, [g + n * (~k) for g, n, k in zip(grads, noise, kept)])
    opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


def test_task_driven_masked_entries_move_only_by_weight_decay():
    model = _model()
    start = _params(model)
    g = torch.Generator().manual_seed(11)
    masks = {p: torch.rand(p.shape, generator=g) < 0.3 for p in model.parameters()}
    first = next(model.parameters())
    del masks[first]  # a parameter without a mask trains fully
    opt = ChildTuningAdamW(model.parameters(), lr=LR, weight_decay=WD, mode="d", masks=masks)
    steps = 4
    _run(model, opt, steps)
    for p, p0 in zip(model.parameters(), start):
        if p is first:
            assert (p != p0).all()
            continue
        m = masks[p]
        decayed = p0.clone()
        for _ in range(steps):
            decayed.mul_(1 - LR * WD)  # AdamW's decoupled decay, the same operation
        assert torch.equal(p[~m], decayed[~m])
        assert torch.all(opt.state[p]["exp_avg"][~m] == 0)
        assert (p[m] != decayed[m]).all()


def test_task_driven_gradient_is_masked_without_scaling():
    model = _model()
    g = torch.Generator().manual_seed(2)
    masks = {p: torch.rand(p.shape, generator=g) < 0.5 for p in model.parameters()}
    opt = ChildTuningAdamW(model.parameters(), lr=LR, mode="d", reserve_p=0.5, masks=masks)
    grads = _grads(model, 0)
    _set_grads(model, grads)
    opt.step()
    for p, grad in zip(model.parameters(), grads):
        assert torch.equal(p.grad, grad * masks[p])


def test_masks_keyed_by_name_with_named_parameters():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    masks = {names[0]: torch.zeros_like(model[0].weight, dtype=torch.bool)}
    opt = ChildTuningAdamW(model.named_parameters(), lr=LR, weight_decay=0.0, mode="d", masks=masks)
    before = model[0].weight.detach().clone()
    _run(model, opt, 2)
    assert torch.equal(model[0].weight, before)
    assert not torch.equal(model[0].bias, before[:, 0])


@pytest.mark.parametrize("mode", ["f", "d"])
def test_state_dict_round_trip_resumes_exactly(mode):
    model = _model()
    g = torch.Generator().manual_seed(4)
    masks = {p: torch.rand(p.shape, generator=g) < 0.3 for p in model.parameters()} if mode == "d" else None
    opt = ChildTuningAdamW(model.parameters(), lr=LR, weight_decay=WD, mode=mode, reserve_p=0.3,
                           masks=masks, seed=21)
    _run(model, opt, 2)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _run(model, opt, 3, first=2)

    resumed = _model(seed=1)
    resumed.load_state_dict(saved_model)
    # A different seed, and for D masks of all ones: both must be replaced by the saved ones.
    other = {p: torch.ones_like(p, dtype=torch.bool) for p in resumed.parameters()} if mode == "d" else None
    opt2 = ChildTuningAdamW(resumed.parameters(), lr=LR, weight_decay=WD, mode=mode, reserve_p=0.3,
                            masks=other, seed=99)
    opt2.load_state_dict(saved_opt)
    _run(resumed, opt2, 3, first=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="reserve probability"):
        ChildTuningAdamW(model.parameters(), reserve_p=0.0)
    with pytest.raises(ValueError, match="reserve probability"):
        ChildTuningAdamW(model.parameters(), reserve_p=1.5)
    with pytest.raises(ValueError, match="mode"):
        ChildTuningAdamW(model.parameters(), mode="x")
    with pytest.raises(ValueError, match="needs masks"):
        ChildTuningAdamW(model.parameters(), mode="d")
    with pytest.raises(ValueError, match="bool tensor"):
        ChildTuningAdamW(model.parameters(), mode="d", masks={model[0].weight: torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(KeyError):
        ChildTuningAdamW(model.parameters(), mode="d", masks={"0.weight": torch.ones(7, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mode"):
        ChildTuningAdamW(model.parameters(), mode="f").load_state_dict(
            ChildTuningAdamW(model.parameters(), mode="d", masks={}).state_dict())


# ----------------------------------------------------------------------- Fisher mask


class _Affine(nn.Module):
    """y = W x + b with W 2 x 3, b 2: gradients of 0.5 ||y - t||^2 are known in closed form."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.75, -0.5]], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor([0.1, -0.2], dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.T + self.bias


def _affine_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 3, generator=g, dtype=torch.float64), torch.randn(1, 2, generator=g, dtype=torch.float64))
            for _ in range(4)]


def _affine_loss(model, batch):
    x, t = batch
    return 0.5 * ((model(x) - t) ** 2).sum()


def _expected_fisher(model, batches):
    """Closed form: dL/dW = r x^T, dL/db = r with r = W x + b - t; Fisher = mean of squares."""
    fw = torch.zeros(2, 3, dtype=torch.float64)
    fb = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for x, t in batches:
            r = (model(x) - t)[0]
            fw += torch.outer(r, x[0]) ** 2
            fb += r ** 2
    return {"weight": fw / len(batches), "bias": fb / len(batches)}


def test_fisher_information_matches_closed_form_and_leaves_grads_alone():
    model, batches = _Affine(), _affine_batches()
    fisher = fisher_information(model, batches, _affine_loss, progress=False)
    expected = _expected_fisher(model, batches)
    assert set(fisher) == {"weight", "bias"}  # the frozen parameter is not scored
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-14, atol=0)
    assert model.weight.grad is None and model.bias.grad is None


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75, 1.0])
def test_fisher_mask_keeps_the_global_top_fraction(p):
    model, batches = _Affine(), _affine_batches()
    masks = fisher_mask(model, batches, _affine_loss, p, progress=False)
    expected = _expected_fisher(model, batches)
    flat = torch.cat([expected["weight"].reshape(-1), expected["bias"]])
    assert len(set(flat.tolist())) == flat.numel()  # distinct scores: the answer is unique
    keep = math.ceil(p * flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: -flat[i].item())
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[order[:keep]] = True
    got = torch.cat([masks["weight"].reshape(-1), masks["bias"]])
    assert masks["weight"].dtype == torch.bool and masks["weight"].shape == (2, 3)
    assert torch.equal(got, want)
    assert int(got.sum()) == keep


def test_top_fraction_is_global_not_per_tensor_and_breaks_ties_by_position():
    scores = {"a": torch.tensor([5.0, 6.0, 7.0, 8.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    masks = top_fraction_mask(scores, 0.5)
    assert masks["a"].all() and not masks["b"].any()  # per tensor would keep half of each
    ties = top_fraction_mask({"a": torch.tensor([1.0, 3.0, 3.0]), "b": torch.tensor([3.0, 0.0])}, 0.4)
    assert ties["a"].tolist() == [False, True, True] and ties["b"].tolist() == [False, False]
    exact = top_fraction_mask({"a": torch.arange(10.0)}, 0.3)  # 0.3 * 10 is 3.0000000000000004
    assert exact["a"].sum() == 3


def test_fisher_mask_include_filter_and_clipping():
    model, batches = _Affine(), _affine_batches()
    only_weight = fisher_information(model, batches, _affine_loss, include=lambda n: n == "weight",
                                     progress=False)
    assert set(only_weight) == {"weight"}
    clipped = fisher_information(model, batches[:1], _affine_loss, max_grad_norm=1e-3, progress=False)
    # Clipped per parameter: each parameter's squared gradient sums to (1e-3)^2.
    for name in ("weight", "bias"):
        torch.testing.assert_close(clipped[name].sum(), torch.tensor(1e-6, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="empty"):
        fisher_information(model, [], _affine_loss, progress=False)
    with pytest.raises(ValueError, match="include"):
        fisher_information(model, batches, _affine_loss, include=lambda n: False, progress=False)


def test_fisher_mask_drives_the_optimizer():
    model, batches = _Affine(), _affine_batches()
    masks = fisher_mask(model, batches, _affine_loss, 0.5, progress=False)
    opt = ChildTuningAdamW(model.named_parameters(), lr=0.1, weight_decay=0.0, mode="d", masks=masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in batches:
        opt.zero_grad()
        _affine_loss(model, batch).backward()
        opt.step()
    for name in ("weight", "bias"):
        moved = getattr(model, name) != before[name]
        assert torch.equal(moved, masks[name])
