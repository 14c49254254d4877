"""The oracle itself, checked against the formulations people know it by.

Each test writes the loss the way its source does (SimCSE's code, CLIP, sentence-
transformers, GS-InfoNCE's formula) and asserts that reference.py computes the same.
"""

import math

import torch
import torch.nn.functional as F

from fastcl import info_nce_reference

N, D, TAU = 11, 7, 0.05


def _rand(rows=N):
    return torch.randn(rows, D, dtype=torch.float64)


def _cos(x, y):
    return F.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)


def test_unsupervised_simcse():
    a, p = _rand(), _rand()
    expected = F.cross_entropy(_cos(a, p) / TAU, torch.arange(N))
    torch.testing.assert_close(info_nce_reference(a, p, temperature=TAU), expected)


def test_supervised_simcse_as_its_code_writes_it():
    # SimCSE's models.py: cos_sim = cat([cos(z1, z2), cos(z1, z3)]) / temp, plus z3_weight on
    # the diagonal of the hard-negative block, where z3_weight is log(alpha) in our terms.
    a, p, h = _rand(), _rand(), _rand()
    alpha = 3.0
    cos_sim = torch.cat([_cos(a, p), _cos(a, h)], dim=1) / TAU
    weights = torch.tensor([[0.0] * N + [0.0] * i + [math.log(alpha)] + [0.0] * (N - i - 1) for i in range(N)],
                           dtype=torch.float64)
    expected = F.cross_entropy(cos_sim + weights, torch.arange(N))
    got = info_nce_reference(a, p, h, temperature=TAU, hard_negative_weight=alpha)
    torch.testing.assert_close(got, expected)


def test_clip_symmetric_loss():
    a, p = _rand(), _rand()
    logits = _cos(a, p) / TAU
    target = torch.arange(N)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(info_nce_reference(a, p, temperature=TAU, symmetric=True), expected)


def test_multiple_negatives_ranking_loss_is_tau_one_over_scale():
    # sentence-transformers: scores = cos_sim(anchors, [positives; negatives]) * scale
    a, p, h = _rand(), _rand(), _rand()
    scale = 20.0
    scores = _cos(a, torch.cat([p, h])) * scale
    expected = F.cross_entropy(scores, torch.arange(N))
    torch.testing.assert_close(info_nce_reference(a, p, h, temperature=1 / scale), expected)


def test_gaussian_negatives_follow_gs_infonce_formula():
    a, p = _rand(), _rand()
    g = torch.randn(5, D, dtype=torch.float64)
    lam = 0.3
    pos = torch.exp(_cos(a, p) / TAU)
    gauss = torch.exp(_cos(a, g) / TAU)
    expected = -torch.log(pos.diagonal() / (pos.sum(1) + lam * gauss.sum(1)))
    got = info_nce_reference(a, p, gaussian_negatives=g, temperature=TAU, gaussian_weight=lam, reduction="none")
    torch.testing.assert_close(got, expected)


def test_extra_negatives_add_to_in_batch_ones():
    a, p, queue = _rand(), _rand(), _rand(6)
    expected = F.cross_entropy(_cos(a, torch.cat([p, queue])) / TAU, torch.arange(N), reduction="sum")
    got = info_nce_reference(a, p, extra_negatives=queue, temperature=TAU, reduction="sum")
    torch.testing.assert_close(got, expected)
    alone = info_nce_reference(a, p, temperature=TAU, reduction="sum")
    assert got > alone


def test_labels_and_unnormalized_dot_products():
    a, p = _rand(), _rand()
    labels = torch.randint(0, N, (N,))
    expected = F.cross_entropy(a @ p.T / 2.0, labels, reduction="none")
    got = info_nce_reference(a, p, temperature=2.0, labels=labels, normalize=False, reduction="none")
    torch.testing.assert_close(got, expected)


def test_reference_gradients_match_design_formulas():
    # dL/da_i = g_i / tau * (sum_j P_ij c_j - c_t(i)), on unit rows (no normalize backward).
    a = F.normalize(_rand(), dim=-1).requires_grad_()
    c = F.normalize(_rand(), dim=-1).requires_grad_()
    loss = info_nce_reference(a, c, temperature=TAU, normalize=False, reduction="sum")
    loss.backward()
    probs = torch.softmax(a.detach() @ c.detach().T / TAU, dim=1)
    eye = torch.eye(N, dtype=torch.float64)
    torch.testing.assert_close(a.grad, (probs - eye) @ c.detach() / TAU)
    torch.testing.assert_close(c.grad, (probs - eye).T @ a.detach() / TAU)
