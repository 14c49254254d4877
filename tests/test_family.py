"""The loss family beyond SimCSE's shape: K hard negatives per anchor, directions and
partition modes, the hardness penalty and the false-negative margin.

The dense reference is held to sentence-transformers' own MultipleNegativesRankingLoss in
float64 (loss and gradients); every other backend is held to the reference.
"""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STLoss
from sentence_transformers.util import cos_sim, dot_score

from fastcl.reference import info_nce_reference

Q2D, Q2Q, D2Q, D2D = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
DIRECTION_SETS = [(Q2D,), (Q2D, D2Q), (Q2D, Q2Q), (Q2D, D2D), (Q2D, Q2Q, D2Q), (Q2D, Q2Q, D2Q, D2D)]
SAME_TOWER = {Q2Q, D2D}
#: Every direction set with every partition mode sentence-transformers accepts for it.
PARTITIONS = [(d, m) for d in DIRECTION_SETS for m in ("joint", "per_direction")
              if m == "joint" or not set(d) & SAME_TOWER]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]


def _name(directions, mode) -> str:
    return "+".join(x.replace("_to_", "2") for x in directions) + "-" + mode


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("directions,partition_mode", PARTITIONS, ids=[_name(d, m) for d, m in PARTITIONS])
def test_reference_equals_sentence_transformers(k, similarity, directions, partition_mode):
    n, d, scale = 6, 5, 7.0
    fct = cos_sim if similarity == "cos_sim" else dot_score
    for seed, mode in enumerate(HARDNESS):
        size = 1.0 if similarity == "cos_sim" else 0.4  # dot products of a moderate size
        q, p, h = _rand(n, d, seed=seed, scale=size), _rand(n, d, seed=seed + 10, scale=size), \
            _rand(n, k, d, seed=seed + 20, scale=size)
        strength = 3.0 if mode else 0.0
        st = STLoss(None, scale=scale, similarity_fct=fct, directions=directions, partition_mode=partition_mode,
                    hardness_mode=mode, hardness_strength=strength)
        columns = [q.clone().requires_grad_(), p.clone().requires_grad_()]
        columns += [h[:, j].clone().requires_grad_() for j in range(k)]
        expected = st.compute_loss_from_embeddings(columns, None)
        expected_grads = _grads(expected, columns)
        ours_in = [x.clone().requires_grad_() for x in (q, p, h)]
        got = info_nce_reference(*ours_in, temperature=1 / scale, normalize=fct is cos_sim, directions=directions,
                                 partition_mode=partition_mode, hardness_mode=mode, hardness_strength=strength)
        got_grads = _grads(got, ours_in)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
        torch.testing.assert_close(got_grads[0], expected_grads[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(got_grads[1], expected_grads[1], rtol=0, atol=1e-13)
        torch.testing.assert_close(got_grads[2], torch.stack(expected_grads[2:], dim=1), rtol=0, atol=1e-13)


def test_per_direction_with_same_tower_refused_by_sentence_transformers():
    # The refusal fastcl mirrors: the same-tower directions never hold the positive.
    with pytest.raises(ValueError, match="per_direction"):
        STLoss(None, directions=(Q2D, Q2Q), partition_mode="per_direction")


# ----------------------------------------------------------------- the layout level


def _layout_case(n, d, k_blocks, n_extra, mode, strength, margin, masked_hard, seed,
                 hard_weight=0.3):
    """Queries, columns [p; h blocks; extra], a layout with every new rule (own hard
    negatives at log weight ``hard_weight``, or -inf when ``masked_hard``), thresholds."""
    from fastcl.ops.layout import HARDNESS_MODES, ColumnLayout

    g = torch.Generator().manual_seed(seed)
    n_grad = n + k_blocks * n
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(n_grad + n_extra, d, generator=g, dtype=torch.float64)
    layout = ColumnLayout(n_cols=n_grad + n_extra, n_grad_cols=n_grad, hard_start=n, n_hard=n if k_blocks else 0,
                          n_hard_blocks=max(k_blocks, 1), gauss_start=n_grad + n_extra,
                          log_hard_weight=float("-inf") if masked_hard else hard_weight,
                          hardness_mode=HARDNESS_MODES[mode] if mode else 0, hardness_strength=strength)
    thresholds = None
    if margin is not None:
        unit = torch.nn.functional.normalize
        thresholds = (unit(q, dim=-1) * unit(k[:n], dim=-1)).sum(-1) + margin
    return q, k, layout, thresholds


LAYOUT_CASES = [
    # n, d, K, extra, hardness mode, strength, margin, -inf own hard weight
    (5, 3, 3, 0, None, 0.0, None, False),
    (7, 16, 2, 3, "in_batch_negatives", 2.0, None, False),
    (7, 16, 3, 0, "hard_negatives", 4.0, None, False),
    (13, 3, 1, 2, "all_negatives", 1.5, None, False),
    (13, 16, 2, 4, None, 0.0, 0.05, False),
    (7, 3, 3, 2, "all_negatives", 3.0, -0.1, False),
    (5, 16, 2, 0, None, 0.0, None, True),
    (7, 3, 2, 0, None, 0.0, 0.03, True),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[f"case{i}" for i in range(len(LAYOUT_CASES))])
@pytest.mark.parametrize("targets", ["diagonal", "none", "labels"])
def test_chunked_kernels_equal_layout_reference(case, targets, monkeypatch):
    from fastcl.ops.chunked import chunked_backward, chunked_forward
    from fastcl.ops.function import kernel_params
    from fastcl.reference import layout_loss_reference

    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", "40")  # several chunks of rows
    n, d, k_blocks, n_extra, mode, strength, margin, masked_hard = case
    q, k, layout, thresholds = _layout_case(n, d, k_blocks, n_extra, mode, strength, margin, masked_hard, seed=n)
    tgt = {"diagonal": None, "none": torch.full((n,), -1, dtype=torch.int64),
           "labels": torch.randperm(n, generator=torch.Generator().manual_seed(1)) + n}[targets]
    if targets == "labels" and masked_hard:
        tgt = torch.arange(n).flip(0)  # a target under a -inf weight is no target
    inv_tau = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    for eps in (None, 1e-12):
        qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
        expected = layout_loss_reference(qr, kr, inv_tau, layout, tgt, thresholds=thresholds, normalize_eps=eps)
        weights = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
        finite = torch.isfinite(expected)
        grads = torch.autograd.grad((expected.where(finite, 0) * weights).sum(), (qr, kr, inv_tau))
        params = kernel_params(inv_tau, layout, torch.float64)
        lse, target_logit = chunked_forward(q, k, params, tgt, layout, normalize_eps=eps, thresholds=thresholds)
        torch.testing.assert_close(lse - target_logit, expected.detach(), rtol=0, atol=1e-12)
        dq, dk, row_dot = chunked_backward(q, k, params, tgt, layout, lse, weights.where(finite, 0),
                                           normalize_eps=eps, thresholds=thresholds)
        torch.testing.assert_close(dq, grads[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dk, grads[1][: layout.n_grad_cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(row_dot.sum(), grads[2], rtol=0, atol=1e-12)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


# ------------------------------------------------------------------- the loss level

ALL4 = (Q2D, Q2Q, D2Q, D2D)

#: (name, options, K hard negatives per anchor (0: none), extra negatives, Gaussian negatives)
OPTION_CASES = [
    ("k3", dict(), 3, 0, 0),
    ("k1-weighted", dict(hard_negative_weight=2.0), 1, 0, 0),
    ("q2q", dict(directions=(Q2D, Q2Q)), 2, 0, 0),
    ("d2q-joint", dict(directions=(Q2D, D2Q)), 0, 2, 0),
    ("d2q-per-direction", dict(directions=(Q2D, D2Q), partition_mode="per_direction"), 3, 0, 0),
    ("d2d", dict(directions=(Q2D, D2D)), 3, 0, 0),
    ("gte", dict(directions=ALL4), 2, 3, 4),
    ("hard-in-batch", dict(hardness_mode="in_batch_negatives", hardness_strength=3.0), 3, 2, 0),
    ("hard-hard", dict(hardness_mode="hard_negatives", hardness_strength=5.0, hard_negative_weight=0.5), 3, 0, 0),
    ("hard-all", dict(hardness_mode="all_negatives", hardness_strength=2.0), 1, 2, 3),
    ("margin", dict(false_negative_margin=0.1), 3, 2, 0),
    ("margin-negative", dict(false_negative_margin=-0.15), 2, 0, 0),
    ("qwen3-gte", dict(directions=ALL4, false_negative_margin=0.1), 3, 0, 0),
    ("everything", dict(directions=ALL4, false_negative_margin=0.05, hardness_mode="all_negatives",
                        hardness_strength=1.0, hard_negative_weight=1.5), 2, 2, 2),
    ("symmetric-margin", dict(symmetric=True, false_negative_margin=0.1), 1, 0, 0),
    ("labels-hardness-margin", dict(labels=True, hardness_mode="in_batch_negatives", hardness_strength=2.0,
                                    false_negative_margin=0.1), 3, 2, 0),
    ("groups-symmetric-margin", dict(groups=True, symmetric=True, false_negative_margin=0.0), 1, 0, 0),
]


def _inputs(n, d, k, n_extra, seed, dtype=torch.float64, normalize=True):
    """Random rows, the positives closer to their anchors than chance. The margin's
    decisions compare float64 cosines of random rows, which lie far from any tie; the
    dense and chunked paths form them differently only in the last bits."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    p = a + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)  # positives closer than chance
    h = torch.randn(n, k, d, generator=g, dtype=dtype) if k else None
    e = torch.randn(n_extra, d, generator=g, dtype=dtype) if n_extra else None
    if not normalize:
        a, p = a * 0.5, p * 0.5
    return a, p, h, e


def _call(backend, a, p, h, e, gaussian, options, tau, n, seed, reduction="mean"):
    from fastcl import info_nce

    options = dict(options)
    if options.pop("labels", False):
        options["labels"] = torch.randint(0, n * (1 + (h.shape[1] if h is not None else 0)) + (
            e.shape[0] if e is not None else 0), (n,), generator=torch.Generator().manual_seed(seed))
    if options.pop("groups", False):
        options["groups"] = torch.arange(n) // 3
    generator = torch.Generator().manual_seed(seed)
    if h is not None and h.shape[1] == 1 and seed % 2:
        h = h[:, 0]  # N x D is K = 1
    return info_nce(a, p, h, e, temperature=tau, gaussian_negatives=gaussian, generator=generator,
                    backend=backend, reduction=reduction, **options)


def _loss_and_grads(backend, case, n, d, seed, reduction="mean", normalize=True):
    name, options, k, n_extra, gaussian = case
    a, p, h, e = _inputs(n, d, k, n_extra, seed, normalize=normalize)
    leaves = [x.clone().requires_grad_() for x in (a, p) + ((h,) if h is not None else ())]
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    options = dict(options, normalize=normalize)
    loss = _call(backend, *leaves[:2], leaves[2] if h is not None else None, e, gaussian, options, tau, n, seed,
                 reduction)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), leaves + [tau])
    return loss.detach(), grads


def _assert_matches(got, grads, expected, expected_grads):
    """A loss and its gradients (finite) equal the expected ones to float64 rounding."""
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    for g, e in zip(grads, expected_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


SIZES = [(5, 3), (7, 16), (13, 3)]
#: Every option case at two of the ragged sizes, in turn.
SIZED_CASES = [(case, SIZES[(i + j) % 3]) for i, case in enumerate(OPTION_CASES) for j in (0, 1)]


@pytest.mark.parametrize("case,size", SIZED_CASES, ids=[f"{c[0]}-{n}x{d}" for c, (n, d) in SIZED_CASES])
def test_chunked_equals_reference(case, size, monkeypatch):
    n, d = size
    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", "64")  # several chunks of rows
    seed = n * 100 + d
    for reduction in ("mean", "none"):
        expected, expected_grads = _loss_and_grads("dense", case, n, d, seed, reduction)
        got, grads = _loss_and_grads("chunked", case, n, d, seed, reduction)
        _assert_matches(got, grads, expected, expected_grads)


@pytest.mark.parametrize("case", [c for c in OPTION_CASES if c[0] in ("gte", "hard-all", "qwen3-gte", "k3")],
                         ids=lambda c: c[0])
def test_chunked_equals_reference_without_normalization(case):
    expected, expected_grads = _loss_and_grads("dense", case, 7, 5, 3, normalize=False)
    got, grads = _loss_and_grads("chunked", case, 7, 5, 3, normalize=False)
    _assert_matches(got, grads, expected, expected_grads)


def test_dense_backend_passes_every_option_to_the_reference():
    a, p, h, e = _inputs(6, 4, 3, 2, seed=5)
    options = dict(directions=ALL4, hardness_mode="all_negatives", hardness_strength=2.0, false_negative_margin=0.1)
    from fastcl import info_nce

    got = info_nce(a, p, h, e, temperature=0.1, backend="dense", reduction="none", **options)
    expected = info_nce_reference(a, p, h, e, temperature=0.1, reduction="none", **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, info_nce(a, p, h, e, temperature=0.1, backend="dense", reduction="none"))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("directions", [ALL4, (Q2D, D2D), (Q2D, Q2Q, D2Q)], ids=["gte", "d2d", "q2q-d2q"])
def test_fused_backends_compute_directions(backend, directions):
    # The directions need no new kernel rule with one hard negative per anchor (a -inf
    # weight masks a document's own hard negative): the fused kernels compute them.
    from fastcl import native

    if backend == "cpp" and not native.available():
        pytest.skip(f"native extension unavailable: {native.status().reason}")
    case = ("directions", dict(directions=directions), 1, 0, 0)
    expected, expected_grads = _loss_and_grads("dense", case, 13, 16, seed=2)
    got, grads = _loss_and_grads(backend, case, 13, 16, seed=2)
    _assert_matches(got, grads, expected, expected_grads)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-first", "cpp-first"])
@pytest.mark.parametrize("options,k", [
    (dict(hardness_mode="all_negatives", hardness_strength=2.0), 1),
    (dict(false_negative_margin=0.1), 1),
    (dict(), 2),
], ids=["hardness", "margin", "k2"])
def test_auto_keeps_a_kernel_that_computes_the_rules_and_falls_back_when_it_lacks_one(options, k, interpret,
                                                                                       monkeypatch):
    # "auto" on CPU tensors picks Triton's interpreter under TRITON_INTERPRET=1, else the
    # native kernel. Both compute every rule, so the call stays there; with the rule taken
    # out of that backend's entry in FEATURES, "auto" takes the chunked path and naming
    # the backend is refused, naming the option.
    from fastcl import info_nce, native
    from fastcl.ops import dispatch
    from fastcl.plan import LossOptions, plan_info_nce

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    a, p, h, _ = _inputs(300, 4, k, 0, seed=1)  # above the dense path's size
    hard = h if k > 1 else h[:, 0]

    def planned():
        return plan_info_nce(LossOptions(**options).checked(), a, p, hard).rows.plan

    needed = dispatch.layout_features(planned().layout, "false_negative_margin" in options)
    assert needed  # the case needs a rule beyond the original layout
    first = "triton" if interpret == "1" else ("cpp" if native.available() else "chunked")
    assert planned().backend == first
    if first == "chunked":
        return
    monkeypatch.setitem(dispatch.FEATURES, first, dispatch.FEATURES[first] - needed)
    assert planned().backend == "chunked"
    with pytest.raises(ValueError, match=f"backend '{first}' does not compute"):
        info_nce(a, p, hard, backend=first, **options)


REFUSALS = [
    (dict(directions="query_to_doc"), TypeError, "directions must be a tuple"),
    (dict(directions=("doc_to_query",)), ValueError, "must include 'query_to_doc'"),
    (dict(directions=(Q2D, "query_to_everything")), ValueError, "query_to_everything"),
    (dict(partition_mode="separate"), ValueError, "partition_mode must be one of"),
    (dict(directions=(Q2D, Q2Q), partition_mode="per_direction"), ValueError, "never do"),
    (dict(directions=(Q2D, D2D), partition_mode="per_direction"), ValueError, "never do"),
    (dict(symmetric=True, directions=(Q2D, Q2Q)), ValueError, "symmetric=True is directions"),
    (dict(hardness_mode="hardest"), ValueError, "hardness_mode must be None or one of"),
    (dict(hardness_mode="all_negatives", hardness_strength=-1.0), ValueError, "hardness_strength must be"),
    (dict(hardness_strength=float("inf")), ValueError, "hardness_strength must be"),
    (dict(hardness_strength="2"), TypeError, "hardness_strength must be a real number"),
    (dict(false_negative_margin=float("nan")), ValueError, "false_negative_margin must be None or a finite"),
    (dict(false_negative_margin=True), TypeError, "false_negative_margin must be a real number"),
    (dict(directions=(Q2D, D2Q), labels=True), ValueError, "labels are not supported with directions"),
    (dict(directions=(Q2D, Q2Q), groups=True), ValueError, "groups are not supported with directions"),
    (dict(groups=True, k=2), ValueError, "groups are not supported with several hard negatives"),
]


@pytest.mark.parametrize("options,error,message", REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_refusals_name_the_argument(options, error, message):
    from fastcl import InfoNCELoss, info_nce

    options = dict(options)
    k = options.pop("k", 1)
    a, p, h, _ = _inputs(6, 4, k, 0, seed=0)
    if options.pop("labels", False):
        options["labels"] = torch.zeros(6, dtype=torch.int64)
    if options.pop("groups", False):
        options["groups"] = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(error, match=message):
        info_nce(a, p, h, **options)
    module_options = {k: v for k, v in options.items() if k not in ("labels", "groups", "backend")}
    if module_options and "backend" not in options and "labels" not in options and "groups" not in options:
        with pytest.raises(error, match=message):  # refused at construction, before any batch
            InfoNCELoss(**module_options)


def test_hard_negatives_shape_is_checked():
    from fastcl import info_nce

    a, p, _, _ = _inputs(6, 4, 0, 0, seed=0)
    with pytest.raises(ValueError, match="N x D or N x K x D"):
        info_nce(a, p, torch.randn(5, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="N x D or N x K x D"):
        info_nce(a, p, torch.randn(6, 0, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 24\)"):  # N + K N = 6 + 3 * 6
        info_nce(a, p, torch.randn(6, 3, 4, dtype=torch.float64), labels=torch.full((6,), 24))


GRADCHECK_CASES = [
    ("k3-weighted", dict(hard_negative_weight=1.7), 3, 2),
    ("gte-joint", dict(directions=ALL4), 2, 0),
    ("d2q-per-direction", dict(directions=(Q2D, D2Q), partition_mode="per_direction"), 2, 0),
    ("hardness-in-batch", dict(hardness_mode="in_batch_negatives", hardness_strength=3.0), 2, 2),
    ("hardness-hard", dict(hardness_mode="hard_negatives", hardness_strength=3.0), 2, 0),
    ("margin-gte", dict(directions=ALL4, false_negative_margin=0.05), 2, 1),
]


@pytest.mark.parametrize("name,options,k,n_extra", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck_chunked(name, options, k, n_extra):
    from torch.autograd import gradcheck

    from fastcl import info_nce

    a, p, h, e = _inputs(5, 3, k, n_extra, seed=11)
    tau = torch.tensor(0.2, dtype=torch.float64)

    def loss(a, p, h, tau):
        return info_nce(a, p, h, e, temperature=tau, backend="chunked", reduction="none", **options)

    # Finite differences move the cosines by ~1e-6, far less than any gap to a margin
    # threshold at these inputs. The hardness penalty is a stop-gradient term, which
    # finite differences of the inputs cannot see: there only the temperature (on which
    # the penalty does not depend) is checked; the inputs' gradients are held to the
    # reference's autograd above.
    stop_gradient = "hardness_mode" in options
    inputs = tuple(x.clone().requires_grad_(not stop_gradient or x is tau) for x in (a, p, h, tau))
    assert gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_fully_masked_rows_keep_every_gradient_finite(backend):
    # A margin below -2 drops every entry of the same-tower rows (and doc_to_query's but
    # the positive pair): their terms are -inf, which must add nothing and no NaN, also to
    # a learnable temperature.
    from fastcl import info_nce

    a, p, h, _ = _inputs(7, 3, 2, 0, seed=4)
    leaves = [x.clone().requires_grad_() for x in (a, p, h)]
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = info_nce(*leaves, temperature=tau, directions=ALL4, false_negative_margin=-3.0, backend=backend,
                    reduction="none")
    grads = torch.autograd.grad(loss.sum(), leaves + [tau])
    assert all(torch.isfinite(g).all() for g in grads)
    # Only the positive survives, in query_to_doc and doc_to_query: loss_i = log 2.
    torch.testing.assert_close(loss.detach(), torch.full((7,), torch.log(torch.tensor(2.0)).item(),
                                                         dtype=torch.float64))


def test_one_hard_negative_as_n_by_1_by_d_is_n_by_d():
    from fastcl import info_nce

    a, p, h, _ = _inputs(9, 5, 1, 0, seed=3)
    for backend in ("chunked", "dense"):
        torch.testing.assert_close(info_nce(a, p, h, backend=backend, hard_negative_weight=2.0),
                                   info_nce(a, p, h[:, 0], backend=backend, hard_negative_weight=2.0),
                                   rtol=0, atol=1e-15)


def test_hardness_leaves_the_temperature_gradient_alone():
    # d logit / d (1/tau) is the cosine whatever the penalty: with strength s the loss is
    # that of logits cos/tau + s cos, so d loss / d tau equals the finite difference of
    # the reference with the penalty held fixed.
    from fastcl import info_nce

    a, p, h, _ = _inputs(6, 4, 2, 0, seed=8)
    options = dict(hardness_mode="all_negatives", hardness_strength=4.0)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(info_nce(a, p, h, temperature=tau, backend="chunked", **options), tau)
    step = 1e-6
    plus = info_nce_reference(a, p, h, temperature=0.1 + step, **options)
    minus = info_nce_reference(a, p, h, temperature=0.1 - step, **options)
    torch.testing.assert_close(grad, (plus - minus) / (2 * step), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("margin", [0.02, -0.1])
@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_nt_xent_margin(margin, backend):
    from fastcl import nt_xent
    from fastcl.reference import nt_xent_reference

    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    z2 = z1 + 1.2 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    leaves = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    got = nt_xent(*leaves, false_negative_margin=margin, backend=backend, reduction="none")
    ref_leaves = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    expected = nt_xent_reference(*ref_leaves, temperature=0.1, false_negative_margin=margin, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    for x, y in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), ref_leaves)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)
    # The margin drops something here: the loss differs from plain NT-Xent.
    assert not torch.allclose(got, nt_xent_reference(z1, z2, temperature=0.1, reduction="none"))


def test_margin_drops_exactly_the_entries_above_the_threshold():
    # One planted false negative: positive 1 is anchor 0 itself, closer to it than its
    # own positive.
    from fastcl import info_nce

    a, p, _, _ = _inputs(6, 8, 0, 0, seed=9)
    p = p.clone()
    p[1] = a[0]
    with_margin = info_nce(a, p, temperature=0.1, false_negative_margin=0.01, backend="chunked", reduction="none")
    cos = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T
    keep = ~(cos > cos.diagonal()[:, None] + 0.01) | torch.eye(6, dtype=torch.bool)
    assert not keep.all()  # something is dropped
    expected = torch.logsumexp((cos / 0.1).masked_fill(~keep, float("-inf")), dim=1) - cos.diagonal() / 0.1
    torch.testing.assert_close(with_margin, expected, rtol=1e-13, atol=1e-13)


def test_module_takes_the_options():
    from fastcl import InfoNCELoss, info_nce

    a, p, h, _ = _inputs(7, 4, 3, 0, seed=6)
    options = dict(directions=ALL4, hardness_mode="hard_negatives", hardness_strength=2.0, false_negative_margin=0.1)
    module = InfoNCELoss(temperature=0.05, **options)
    torch.testing.assert_close(module(a, p, h), info_nce(a, p, h, temperature=0.05, **options), rtol=0, atol=0)
    text = repr(module)
    assert "directions=" in text and "hardness_mode='hard_negatives'" in text and "false_negative_margin=0.1" in text


def test_chunked_path_never_holds_n_by_m_with_the_options(monkeypatch):
    # Every direction's block is at least N x N (1 MiB in float32 here); the inputs and
    # their gradients are a few KiB, the chunks 32 KiB: a peak under half the smallest
    # block leaves no room for any of them.
    from fastcl import info_nce

    from .test_memory import _peak_cpu_bytes

    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", str(1 << 13))
    n, d, k = 512, 4, 3
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g, requires_grad=True)
    h = torch.randn(n, k, d, generator=g, requires_grad=True)
    smallest_block = n * n * 4

    def step(backend):
        def run():
            info_nce(a, p, h, backend=backend, directions=ALL4, hardness_mode="all_negatives", hardness_strength=1.0,
                     false_negative_margin=0.1).backward()
        return run

    assert _peak_cpu_bytes(step("dense")) > smallest_block  # the measurement sees a dense matrix
    peak = _peak_cpu_bytes(step("chunked"))
    assert peak < smallest_block // 2, f"peak {peak} bytes; one N x N block would be {smallest_block}"


@pytest.mark.parametrize("options,message", [
    (dict(directions=ALL4), "directions="),
    (dict(directions=(Q2D, D2Q)), "partition_mode='joint'"),
    (dict(hardness_mode="hard_negatives", hardness_strength=1.0), "hardness_mode"),
    (dict(false_negative_margin=0.1), "false_negative_margin"),
    (dict(k=2), "K > 1"),
    (dict(guide_anchors=torch.ones(4, 2), guide_candidates=torch.ones(8, 2), guide_threshold=0.5), "the guide"),
], ids=["gte", "d2q-joint", "hardness", "margin", "k2", "guide"])
def test_ring_refuses_what_it_does_not_compute(options, message):
    from fastcl.distributed import ring_info_nce

    from .helpers import free_port, gloo_group

    options = dict(options)
    a, p, h, _ = _inputs(4, 3, options.pop("k", 1), 0, seed=0)
    with gloo_group(0, 1, free_port()):
        with pytest.raises(ValueError, match=f"ring_info_nce does not compute .*{message}"):
            ring_info_nce(a, p, h, **options)
        # What it computes still runs: one hard negative per anchor, both directions.
        ring_info_nce(a, p, h[:, 0], directions=(Q2D, D2Q), partition_mode="per_direction")
