"""The guide mask (guide_anchors / guide_candidates / guide_threshold) on every backend
that computes it, against a plain dense float64 computation of the rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcl import info_nce, native
from fastcl.ops import dispatch
from fastcl.ops.layout import ColumnLayout, GuideMask

Q2D, Q2Q, D2Q, D2D = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL4 = (Q2D, Q2Q, D2Q, D2D)
needs_cpp = pytest.mark.skipif(not native.available(), reason="the native extension is not built")


def dense_guided(a, p, h, e, ga, gc, threshold, tau, directions=(Q2D,), labels=None, margin=None,
                 d2d_negatives=True):
    """The rule written out entry by entry: each row's list of kept logits (joint)."""
    n = a.shape[0]
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    blocks = [] if h is None else ([h] if h.dim() == 2 else list(h.unbind(1)))
    A, docs = unit(a), unit(torch.cat([p, *blocks]))
    cand = docs if e is None else torch.cat([docs, unit(e.detach())])
    GA, GD = unit(ga.double()), unit(gc.double())
    thr = torch.as_tensor(threshold, dtype=torch.float64).expand(n)
    m_grad = docs.shape[0]
    losses = []
    for i in range(n):
        t = int(labels[i]) if labels is not None else i
        pos = A[i] @ cand[t]
        cut = pos.detach() + margin if margin is not None else float("inf")
        kept = []

        def keep(sim, guide_sim, protected=False):
            if protected or (guide_sim <= thr[i] and sim.detach() <= cut):
                kept.append(sim / tau)

        for j in range(cand.shape[0]):
            s = A[i] @ cand[j]
            if j < m_grad:
                keep(s, GA[i] @ GD[j], protected=j == t)
            elif s.detach() <= cut or j == t:
                kept.append(s / tau)  # constant columns: never the guide's
        if Q2Q in directions:
            for j in range(n):
                if j != i:
                    keep(A[i] @ A[j], GA[i] @ GA[j])
        if D2Q in directions:
            P = docs[:n]
            for j in range(n):
                keep(P[i] @ A[j], GD[i] @ GA[j], protected=j == i)
        if D2D in directions:
            for j in range(m_grad if d2d_negatives else n):
                if j % n != i:
                    keep(docs[i] @ docs[j], GD[i] @ GD[j])
        losses.append(torch.logsumexp(torch.stack(kept), 0) - pos / tau)
    return torch.stack(losses)


def _case(n, d, dg, k, n_extra, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    a, p = rand(n, d), rand(n, d)
    p = p + 1.5 * a  # positives nearer their anchors than chance
    h = None if k == 0 else (rand(n, d) if k == 1 else rand(n, k, d))
    e = rand(n_extra, d) if n_extra else None
    ga = rand(n, dg)
    gc = rand(n * (1 + k), dg)
    gc[:n] += ga  # guide positives near their guide anchors
    return a, p, h, e, ga, gc


#: (name, n, d, Dg, K, extra, directions, threshold kind, labels, margin, doc_to_doc_negatives)
CASES = [
    ("pairs-scalar", 7, 8, 5, 0, 0, (Q2D,), "scalar", False, None, True),
    ("k2-extra-rows", 9, 6, 11, 2, 3, (Q2D,), "rows", False, None, True),
    ("gte-k1", 8, 8, 4, 1, 2, ALL4, "rows", False, None, True),
    ("q2q-d2d-k3", 6, 5, 7, 3, 0, (Q2D, Q2Q, D2D), "scalar", False, None, True),
    ("gist-k2", 6, 5, 7, 2, 0, (Q2D, Q2Q, D2D), "rows", False, None, False),
    ("d2q", 7, 4, 4, 1, 0, (Q2D, D2Q), "rows", False, None, True),
    ("labels", 7, 8, 3, 1, 2, (Q2D,), "rows", True, None, True),
    ("with-margin", 8, 6, 5, 1, 2, ALL4, "rows", False, 0.05, True),
]


def _threshold(kind, n, seed=1):
    if kind == "scalar":
        return 0.25
    g = torch.Generator().manual_seed(seed)
    thr = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 - 0.3
    thr[0] = -1.5  # every guide column of row 0 but its target masked
    thr[1] = 1.5  # none of row 1's
    return thr


def _labels(n, k, n_extra):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, n * (1 + k) + n_extra, (n,), generator=g)


BACKENDS = [("dense", "auto"), ("chunked", "workspace"), ("cpp", "workspace"), ("cpp", "one_pass"),
            ("triton", "workspace"), ("triton", "slab"), ("triton", "one_pass")]
#: The Triton kernels run in the interpreter here (slow): the workspace backward on every
#: case, the slab backward and the one pass on two.
TRITON_SLAB_CASES = ("k2-extra-rows", "gist-k2")
TRITON_ONE_PASS_CASES = ("pairs-scalar", "k2-extra-rows")
#: Triton on CPU tensors is the interpreter; on a GPU these tests would hand it CPU tensors.
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernels in the interpreter")


def _runs(case, backend: str, strategy: str) -> bool:
    # The one pass serves one direction (a joint softmax over several gives rows unequal
    # gradients); the kernel test below runs it on the same-tower layouts.
    if strategy == "one_pass" and len(case[6]) != 1:
        return False
    if backend == "triton" and strategy != "workspace":
        return case[0] in (TRITON_SLAB_CASES if strategy == "slab" else TRITON_ONE_PASS_CASES)
    return True


BACKEND_CASES = [pytest.param(case, backend, strategy, id=f"{case[0]}-{backend}-{strategy}",
                              marks=[needs_cpp] if backend == "cpp" else [interpreted] if backend == "triton" else [])
                 for case in CASES for backend, strategy in BACKENDS if _runs(case, backend, strategy)]


@pytest.mark.parametrize("case,backend,strategy", BACKEND_CASES)
def test_every_backend_equals_the_dense_rule(case, backend, strategy, monkeypatch):
    _, n, d, dg, k, n_extra, directions, kind, with_labels, margin, d2d_negatives = case
    monkeypatch.setenv("FASTCL_CPU_TILE_ROWS", "3")  # several chunks and tiles
    monkeypatch.setenv("FASTCL_CPU_TILE_COLS", "4")
    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", "20")
    a, p, h, e, ga, gc = _case(n, d, dg, k, n_extra, seed=n + k)
    thr = _threshold(kind, n)
    labels = _labels(n, k, n_extra) if with_labels else None
    tau = 0.1
    leaves = [x.clone().requires_grad_() for x in (a, p) + ((h,) if h is not None else ())]
    ha = leaves[2] if h is not None else None
    expected = dense_guided(leaves[0], leaves[1], ha, e, ga, gc, thr, tau, directions, labels, margin,
                            d2d_negatives).mean()
    want = torch.autograd.grad(expected, leaves)
    leaves2 = [x.detach().clone().requires_grad_() for x in leaves]
    hb = leaves2[2] if h is not None else None
    options = dict(directions=directions) if directions != (Q2D,) else {}
    loss = info_nce(leaves2[0], leaves2[1], hb, e, temperature=tau, labels=labels, backend=backend,
                    backward_strategy=strategy, guide_anchors=ga, guide_candidates=gc, guide_threshold=thr,
                    false_negative_margin=margin, doc_to_doc_negatives=d2d_negatives, **options)
    got = torch.autograd.grad(loss, leaves2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_the_guide_changes_the_loss():
    """The cases above mask entries: without the guide the loss differs (so a backend
    that ignored it would fail them)."""
    a, p, h, e, ga, gc = _case(7, 8, 5, 1, 2)
    thr = _threshold("rows", 7)
    guided = info_nce(a, p, h, e, backend="chunked", guide_anchors=ga, guide_candidates=gc, guide_threshold=thr)
    assert abs(guided.item() - info_nce(a, p, h, e, backend="chunked").item()) > 1e-3


@pytest.mark.parametrize("backend", ["chunked", pytest.param("cpp", marks=needs_cpp),
                                     pytest.param("triton-slab", marks=interpreted),
                                     pytest.param("triton-workspace", marks=interpreted)])
def test_kernels_mask_fully_masked_rows_without_a_target(backend, monkeypatch):
    """Rows with no target (-1) whose every entry the guide drops: lse -inf, no gradient;
    the constant columns stay; the guide's products match the layout reference."""
    from fastcl.ops.function import kernel_params
    from fastcl.reference import layout_loss_reference

    monkeypatch.setenv("FASTCL_CPU_TILE_ROWS", "2")
    monkeypatch.setenv("FASTCL_CPU_TILE_COLS", "3")
    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", "12")
    g = torch.Generator().manual_seed(5)
    n, n_grad, n_const, d, dg = 6, 8, 0, 5, 3
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(n_grad + n_const, d, generator=g, dtype=torch.float64)
    layout = ColumnLayout.plain(n_grad + n_const, n_grad)
    thr = torch.tensor([-2.0, 2.0, 0.1, -0.2, 0.3, -2.0], dtype=torch.float64)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    guide = GuideMask(unit(torch.randn(n, dg, generator=g, dtype=torch.float64)),
                      unit(torch.randn(n_grad, dg, generator=g, dtype=torch.float64)), thr)
    targets = torch.tensor([-1, -1, 2, -1, 4, 5])
    inv_tau = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    expected = layout_loss_reference(qr, kr, inv_tau, layout, targets, normalize_eps=1e-12, guide=guide)
    assert torch.isneginf(expected[0]) and torch.isfinite(expected[5]) and torch.isfinite(expected[1])
    finite = torch.isfinite(expected)
    want = torch.autograd.grad(expected.where(finite, 0).sum(), (qr, kr, inv_tau))
    assert want[0][0].abs().max() == 0  # the fully masked row gets no gradient
    params = kernel_params(inv_tau, layout, torch.float64)
    forward, backward, one_pass = _launchers(backend)
    lse, target_logit = forward(q, k, params, targets, layout, normalize_eps=1e-12, guide=guide)
    torch.testing.assert_close(lse - target_logit, expected.detach(), rtol=0, atol=1e-12)
    ones = finite.to(torch.float64)
    dq, dk, row_dot = backward(q, k, params, targets, layout, lse, ones, normalize_eps=1e-12, guide=guide)
    torch.testing.assert_close(dq, want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(dk, want[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(row_dot.sum(), want[2], rtol=0, atol=1e-12)
    if one_pass is not None:  # for row gradients of 1 (the masked row's is 0 anyway)
        loss_rows, dq1, dk1, _ = one_pass(q, k, params, targets, layout, normalize_eps=1e-12, guide=guide)
        torch.testing.assert_close(loss_rows, expected.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(dq1, want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dk1, want[1], rtol=0, atol=1e-12)


def _launchers(backend: str):
    """(forward, backward, one pass or None) of ``backend`` on CPU tensors, as the dispatch
    table holds them ("triton-slab": Triton with its slab backward); the one pass of the
    C++ kernel and of Triton (with the workspace case only: the interpreter is slow)."""
    name, _, strategy = backend.partition("-")
    entry = dispatch.kernels("cpu", name, strategy or "workspace")
    with_one_pass = (name, strategy) in (("cpp", ""), ("triton", "workspace"))
    return entry.forward, entry.backward, dispatch.kernels("cpu", name, "one_pass").forward if with_one_pass else None


@needs_cpp
@pytest.mark.parametrize("strategy", ["workspace", "one_pass"])
def test_gradcheck_cpp(strategy):
    a, p, h, e, ga, gc = _case(4, 3, 2, 1, 1, seed=2)
    thr = torch.tensor([0.2, -1.5, 0.5, 1.5], dtype=torch.float64)

    directions = (Q2D,) if strategy == "one_pass" else (Q2D, Q2Q, D2D)  # the one pass: one direction

    def loss(a, p, h):
        return info_nce(a, p, h, e, temperature=0.5, backend="cpp", backward_strategy=strategy,
                        directions=directions, guide_anchors=ga, guide_candidates=gc, guide_threshold=thr)

    inputs = tuple(x.clone().requires_grad_() for x in (a, p, h))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


def test_no_gradient_flows_into_the_guide():
    a, p, _, _, ga, gc = _case(5, 4, 3, 0, 0)
    ga, gc = ga.clone().requires_grad_(), gc.clone().requires_grad_()
    loss = info_nce(a.requires_grad_(), p, backend="chunked", guide_anchors=ga, guide_candidates=gc,
                    guide_threshold=0.1)
    loss.backward()
    assert ga.grad is None and gc.grad is None and a.grad is not None


def test_every_kernel_backend_computes_the_guide():
    from fastcl.plan import choose_backend

    assert all("guide" in dispatch.FEATURES[b] for b in ("cpp", "chunked", "triton"))
    assert choose_backend("auto", torch.device("cuda"), 1 << 20, needed=frozenset({"guide"})) == "triton"


def test_guide_dimension_and_dtype_may_differ_from_the_inputs():
    a, p, _, _, ga, gc = _case(6, 4, 9, 0, 0)
    a32, p32 = a.float(), p.float()
    out = info_nce(a32, p32, backend="chunked", guide_anchors=ga.half(), guide_candidates=gc.half(),
                   guide_threshold=0.2)
    ref = info_nce(a32, p32, backend="dense", guide_anchors=ga.half(), guide_candidates=gc.half(),
                   guide_threshold=0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _refusal_inputs():
    a, p, h, _, ga, gc = _case(5, 4, 3, 1, 0)
    return a, p, h, ga, gc


REFUSALS = [
    (dict(guide_candidates=None), ValueError, "go together"),
    (dict(guide_threshold=None), ValueError, "guide_threshold missing"),
    (dict(guide_anchors="x"), TypeError, "guide_anchors must be a torch.Tensor"),
    (dict(guide_anchors=torch.zeros(5, 3, dtype=torch.int64)), TypeError, "guide_anchors must be float"),
    (dict(guide_anchors=torch.zeros(4, 3)), ValueError, "guide_anchors must be 5 x Dg"),
    (dict(guide_candidates=torch.zeros(5, 3)), ValueError, "guide_candidates must be 10 x Dg"),
    (dict(guide_candidates=torch.zeros(10, 4)), ValueError, "guide_candidates has dim 4"),
    (dict(guide_anchors=torch.zeros(5, 3, device="meta")), ValueError, "guide_anchors is on meta"),
    (dict(guide_threshold=float("nan")), ValueError, "guide_threshold must be finite"),
    (dict(guide_threshold=True), TypeError, "guide_threshold must be a float"),
    (dict(guide_threshold=torch.zeros(4)), ValueError, "one value per anchor"),
    (dict(guide_threshold=torch.zeros(5, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(guide_threshold=torch.tensor([0.1, 0.2, float("inf"), 0.0, 0.0])), ValueError,
     "guide_threshold contains NaN"),
    (dict(guide_anchors=torch.full((5, 3), float("nan"))), ValueError, "guide_anchors contains NaN"),
]


@pytest.mark.parametrize("change,error,message", REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_refusals_name_the_argument(change, error, message):
    a, p, h, ga, gc = _refusal_inputs()
    args = dict(guide_anchors=ga, guide_candidates=gc, guide_threshold=0.1)
    args.update(change)
    with pytest.raises(error, match=message):
        info_nce(a, p, h, backend="chunked", **args)


def test_refused_with_groups():
    a, p, _, ga, _ = _refusal_inputs()
    with pytest.raises(ValueError, match="guide_anchors is not supported with groups"):
        info_nce(a, p, groups=torch.zeros(5, dtype=torch.int64), guide_anchors=ga, guide_candidates=ga,
                 guide_threshold=0.1)


def test_module_forward_takes_the_guide():
    from fastcl import InfoNCELoss

    a, p, _, _, ga, gc = _case(5, 4, 3, 0, 0)
    module = InfoNCELoss(temperature=0.1, backend="chunked")
    torch.testing.assert_close(module(a, p, guide_anchors=ga, guide_candidates=gc, guide_threshold=0.1),
                               info_nce(a, p, temperature=0.1, backend="chunked", guide_anchors=ga,
                                        guide_candidates=gc, guide_threshold=0.1))


@pytest.mark.parametrize("backend", ["dense", "chunked", pytest.param("cpp", marks=needs_cpp)])
def test_doc_to_doc_without_negatives_scores_the_positives_only(backend):
    a, p, h, _, _, _ = _case(6, 5, 3, 2, 0)
    directions = (Q2D, D2D)
    got = info_nce(a, p, h, directions=directions, doc_to_doc_negatives=False, backend=backend, reduction="none")
    # The hard negatives enter query_to_doc only: doc_to_doc of pairs (a, p) plus them.
    plain = info_nce(a, p, h, backend="dense", reduction="none")
    pairs = info_nce(a, p, directions=directions, backend="dense", reduction="none")
    alone = info_nce(a, p, backend="dense", reduction="none")
    # joint: lse(q2d with h, d2d of p) = log(e^plain + e^pairs - e^alone) (shared positive logit)
    want = torch.log(plain.exp() + pairs.exp() - alone.exp())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with_negatives = info_nce(a, p, h, directions=directions, backend=backend, reduction="none")
    assert (with_negatives - got).abs().max() > 1e-3
    with pytest.raises(TypeError, match="doc_to_doc_negatives"):
        info_nce(a, p, directions=directions, doc_to_doc_negatives=1)


@pytest.mark.parametrize("backend,strategy", [("chunked", "workspace"),
                                              pytest.param("cpp", "workspace", marks=needs_cpp),
                                              pytest.param("cpp", "one_pass", marks=needs_cpp)])
def test_the_guide_never_holds_n_by_m(backend, strategy, monkeypatch):
    """Every direction's block is at least N x N (1 MiB in float32 here); inputs, guides
    and gradients are a few KiB, the chunks and tiles under 128 KiB."""
    from .test_memory import _peak_cpu_bytes

    monkeypatch.setenv("FASTCL_CHUNK_ELEMENTS", str(1 << 13))
    monkeypatch.setenv("FASTCL_CPU_TILE_ROWS", "16")
    monkeypatch.setenv("FASTCL_CPU_TILE_COLS", "128")
    n, d, k, dg = 512, 4, 3, 3
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g, requires_grad=True)
    h = torch.randn(n, k, d, generator=g, requires_grad=True)
    ga, gc = torch.randn(n, dg, generator=g), torch.randn(n * (1 + k), dg, generator=g)
    directions = (Q2D,) if strategy == "one_pass" else ALL4
    smallest_block = n * n * 4

    def step(backend, strategy):
        def run():
            info_nce(a, p, h, backend=backend, backward_strategy=strategy, directions=directions, guide_anchors=ga,
                     guide_candidates=gc, guide_threshold=0.2).backward()
        return run

    assert _peak_cpu_bytes(step("dense", "auto")) > smallest_block  # the measurement sees a dense matrix
    peak = _peak_cpu_bytes(step(backend, strategy))
    assert peak < smallest_block // 2, f"peak {peak} bytes; one N x N block would be {smallest_block}"
