"""What the benchmarks time: fastcl, the dense loss, its compiled form, and the peers.

Every implementation is a factory ``make(spec) -> loss_fn``; ``loss_fn(a, p, h)`` takes
the raw inputs and returns the scalar loss of the family ``spec.loss`` (normalization
included, so each one is timed from the raw embeddings to their gradients): ``infonce``
(candidates ``[p; h]``, M = N or 2N), ``nt_xent`` (``loss_fn(z1, z2, None)``, the 2N rows
of ``[z1; z2]`` against the other 2N - 1) or ``groups`` (``loss_fn(a, p, None)``, N tokens
in sequences of G, negatives within the sequence). A factory raises :class:`Unsupported`
(with the reason) for a configuration it cannot compute as this loss; ``available()``
says whether its package imports. :func:`registry` lists one family's implementations.

The peers are thin adapters over their public APIs:

- memeff 0.3.1: ``MemoryEfficientQwen3Loss`` is one-directional InfoNCE; ``margin`` >= 2
  disables its false-negative mask (cosines lie in [-1, 1]), ``stable=False`` gives the
  textbook gradient. Its hard negatives are row-specific, not shared (not this loss).
  With ``use_qq_negatives=True`` it scores a query against every document and every
  other query: the mean of both directions is NT-Xent.
- inf-cl 1.2.1: ``cal_inf_loss(q, k, scale=1/tau, head_dim)`` on normalized rows (D in
  heads of a divisor of D among 16..256; fp32 inside).
- cut-cross-entropy 25.1.1: ``linear_cross_entropy(e, c, targets, filter_eps=None)``
  (exact) with ``e`` = normalized anchors / tau; bf16 / fp16 only.

inf-cl and cut-cross-entropy cannot drop a row's own column (NT-Xent), and no peer has a
group mask: those cases are recorded as unsupported, with the reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from internals import backward_strategies, chosen_backend, forced_backward

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
LOSSES = ("infonce", "nt_xent", "groups")
GTE_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
GUIDE_SEED = 1234  # the guide rows of --guide-dim
PEERS = ("memeff", "inf-cl", "cce")


class Unsupported(Exception):
    """This implementation cannot compute this configuration as the benchmarked loss."""


@dataclass(frozen=True)
class Spec:
    """What every implementation is asked to compute at one size."""

    n: int
    m: int
    d: int
    dtype: torch.dtype
    device: torch.device
    temperature: float
    hard: bool
    symmetric: bool
    compile_mode: str = "default"
    loss: str = "infonce"
    group_size: int | None = None  # G, tokens per sequence (groups only)
    k: int = 1  # hard negatives per anchor (with hard)
    gte: bool = False  # all four directions in one softmax
    margin: float | None = None  # the false-negative margin
    guide_dim: int = 0  # Dg of the guide mask's rows (0: no guide)

    @property
    def family_options(self) -> dict:
        """fastcl's keywords for the loss-family options of this spec (none by default)."""
        options = {}
        if self.gte:
            options["directions"] = GTE_DIRECTIONS
        if self.margin is not None:
            options["false_negative_margin"] = self.margin
        if self.guide_dim:
            guide_anchors, guide_candidates, threshold = guide_rows(self)
            options.update(guide_anchors=guide_anchors, guide_candidates=guide_candidates, guide_threshold=threshold)
        return options

    @property
    def plain(self) -> bool:
        """SimCSE's shape: at most one hard negative per anchor, one direction, no margin,
        no guide."""
        return self.k == 1 and not self.gte and self.margin is None and not self.guide_dim

    def n_logits(self) -> int:
        """The logits fastcl's dispatch counts for this call (it picks a backend by it)."""
        return (2 * self.n) ** 2 if self.loss == "nt_xent" else self.n * self.m


@dataclass(frozen=True)
class Impl:
    """One implementation: how to build its loss function, and what it is."""

    name: str
    description: str
    make: Callable[[Spec], LossFn]
    package: str | None = None  # import name of a peer package
    dist_name: str | None = None  # its distribution name, for the version record
    hidden: bool = False  # a test hook, not listed
    real_flops: Callable[[Spec], float | None] | None = None  # the FLOPs it really does
    real_work_formula: str | None = None
    backend: str | None = None  # fastcl's backend argument
    strategy: str | None = None  # fastcl's Triton backward strategy, forced

    def available(self) -> tuple[bool, str]:
        if self.backend == "native":
            return _native_available()
        if self.package is None:
            return True, ""
        try:
            importlib.import_module(self.package)
        except Exception as exc:  # ImportError, or a peer failing at import time
            return False, f"{self.dist_name or self.package} not importable: {type(exc).__name__}: {exc}"
        return True, ""

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.dist_name) if self.dist_name else None
        except importlib.metadata.PackageNotFoundError:
            return None

    def context(self):
        """Held around every call of a case (the forced backward strategy)."""
        return forced_backward(self.strategy)


# ----------------------------------------------------------------------- dense forms


def _logits_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Products in the input dtype, cross-entropy in fp32, as under autocast."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits / temperature


def dense_loss(a, p, h, *, temperature: float, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE as people write it: normalize, all logits at once, cross-entropy."""
    q = F.normalize(a, dim=-1)
    c = F.normalize(p if h is None else torch.cat([p, h]), dim=-1)
    logits = _logits_fp32(q @ c.T, temperature)
    targets = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, targets)
    if symmetric:  # the column direction of the in-batch block, as CLIP
        loss = (loss + F.cross_entropy(logits[:, : q.shape[0]].T, targets)) / 2
    return loss


@functools.lru_cache(maxsize=2)
def guide_rows(spec: Spec) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``--guide-dim``: a guide model's rows for the N anchors and the M candidates
    (random +-1, float32, the same for every implementation of a case) and the
    threshold. A cosine of two such rows is an integer of Dg's parity over Dg; the
    threshold, near 0.1, has the other parity, so every precision (fp64, fp32, tf32)
    drops the same entries (about 2% of them at Dg = 384)."""
    g = torch.Generator(device=spec.device).manual_seed(GUIDE_SEED)

    def signs(rows: int) -> torch.Tensor:
        bits = torch.randint(0, 2, (rows, spec.guide_dim), generator=g, device=spec.device)
        return (bits * 2 - 1).to(torch.float32)

    numerator = round(0.1 * spec.guide_dim)
    numerator += (numerator - spec.guide_dim) % 2 == 0
    return signs(spec.n), signs(spec.m), numerator / spec.guide_dim


def dense_family_loss(a, p, h, *, temperature: float, gte: bool, margin: float | None,
                      guide: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """The loss family as people write it (sentence-transformers' MultipleNegativesRankingLoss
    with a margin mask, as Qwen3-Embedding's training code does; the guide mask as its
    GISTEmbedLoss does): every similarity matrix at once, masks, one log-sum-exp. ``h``
    is N x K x D (or N x D, or None); ``guide`` (query_to_doc only): the guide's anchor
    and candidate rows and the threshold."""
    n = a.shape[0]
    q, d = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    hard = [] if h is None else [F.normalize(x, dim=-1) for x in (h.unbind(1) if h.dim() == 3 else [h])]
    docs = torch.cat([d, *hard])
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    scores = {"query_to_doc": q @ docs.T}
    if gte:
        scores["query_to_query"] = (q @ q.T).masked_fill(eye, float("-inf"))
        scores["doc_to_query"] = d @ q.T
        scores["doc_to_doc"] = (d @ docs.T).masked_fill(eye.repeat(1, 1 + len(hard)), float("-inf"))
    positive = scores["query_to_doc"].diagonal()
    if guide is not None:
        guide_anchors, guide_candidates, threshold = guide
        dropped = F.normalize(guide_anchors, dim=-1) @ F.normalize(guide_candidates, dim=-1).T > threshold
        dropped.fill_diagonal_(False)  # the positive pair is never dropped
        scores["query_to_doc"] = scores["query_to_doc"].masked_fill(dropped, float("-inf"))
    if margin is not None:
        threshold = positive.detach()[:, None] + margin
        for name, s in scores.items():
            # The positive pair (column i of query_to_doc and doc_to_query) is never dropped.
            keep = torch.arange(s.shape[1], device=a.device)[None, :] == torch.arange(n, device=a.device)[:, None]
            if name in ("query_to_query", "doc_to_doc"):
                keep = torch.zeros_like(keep)
            scores[name] = s.masked_fill((s.detach() > threshold) & ~keep, float("-inf"))
    logits = _logits_fp32(torch.cat(list(scores.values()), dim=1), temperature)
    return (torch.logsumexp(logits, dim=1) - _logits_fp32(positive, temperature)).mean()


def dense_nt_xent(z1, z2, *, temperature: float) -> torch.Tensor:
    """NT-Xent as people write it: the 2N x 2N logits of z = [z1; z2], the diagonal
    masked, cross-entropy against the other view."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = _logits_fp32(z @ z.T, temperature)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    return F.cross_entropy(logits, (torch.arange(2 * n, device=z.device) + n) % (2 * n))


def sequence_ids(spec: Spec) -> torch.Tensor:
    """The group of each token: N / G sequences of G tokens, in sequence order."""
    return torch.arange(spec.n, device=spec.device) // spec.group_size


def dense_grouped(a, p, *, group_size: int, temperature: float) -> torch.Tensor:
    """Token-level InfoNCE per sequence of equal length: (B, G, D) x (B, D, G) logits
    with ``torch.bmm`` (memory B G^2 = N G, not N^2)."""
    n, d = a.shape
    b = n // group_size
    q = F.normalize(a, dim=-1).view(b, group_size, d)
    c = F.normalize(p, dim=-1).view(b, group_size, d)
    logits = _logits_fp32(torch.bmm(q, c.transpose(1, 2)), temperature)
    targets = torch.arange(group_size, device=a.device).repeat(b)
    return F.cross_entropy(logits.reshape(n, group_size), targets)


def dense_masked_grouped(a, p, groups, *, temperature: float) -> torch.Tensor:
    """The same over all N x N logits, other sequences masked (any lengths; memory N^2)."""
    logits = _logits_fp32(F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T, temperature)
    logits = logits.masked_fill(groups[:, None] != groups[None, :], float("-inf"))
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def dense_form(spec: Spec, masked: bool = False) -> LossFn:
    """The dense loss of ``spec.loss`` as ``loss_fn(a, p, h)``."""
    tau = spec.temperature
    if spec.loss == "nt_xent":
        return lambda z1, z2, _: dense_nt_xent(z1, z2, temperature=tau)
    if spec.loss == "groups":
        if masked:
            groups = sequence_ids(spec)
            return lambda a, p, _: dense_masked_grouped(a, p, groups, temperature=tau)
        return lambda a, p, _: dense_grouped(a, p, group_size=spec.group_size, temperature=tau)
    if not spec.plain:
        guide = guide_rows(spec) if spec.guide_dim else None  # data: built once, outside the timed call
        return lambda a, p, h: dense_family_loss(a, p, h, temperature=tau, gte=spec.gte, margin=spec.margin,
                                                 guide=guide)
    return lambda a, p, h: dense_loss(a, p, h, temperature=tau, symmetric=spec.symmetric)


def compiled(spec: Spec, fn: LossFn) -> LossFn:
    """torch.compile of ``fn`` for one size: static shapes, old graphs dropped."""
    import torch._dynamo

    torch._dynamo.reset()
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(fn, dynamic=False, fullgraph=True, mode=spec.compile_mode)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward scales the gradient (a deliberately wrong op)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


PLANTED_GRADIENT_SCALE = 1.1


def planted_error(spec: Spec) -> LossFn:
    """The dense loss with the second input's gradient 10% too large and the loss exact:
    the agreement check must flag it on that gradient alone."""
    base = dense_form(spec)
    return lambda a, p, h: base(a, _ScaleGradient.apply(p, PLANTED_GRADIENT_SCALE), h)


# ---------------------------------------------------------------------------- fastcl


@functools.lru_cache(maxsize=None)
def _native_available() -> tuple[bool, str]:
    """Whether fastcl's compiled CPU kernel runs here (one tiny call)."""
    import fastcl

    try:
        x = torch.randn(2, 4)
        fastcl.info_nce(x, x, backend="native")
    except Exception as exc:
        return False, f"fastcl's native CPU kernel is not available: {type(exc).__name__}: {exc}"
    return True, ""


def _fastcl_factory(backend: str, strategy: str = "auto") -> Callable[[Spec], LossFn]:
    def make(spec: Spec) -> LossFn:
        import fastcl

        if backend == "triton" and spec.device.type != "cuda" and \
                os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise Unsupported("the Triton backend needs CUDA (or TRITON_INTERPRET=1, which bench.py sets on "
                              "CPU when a Triton implementation is asked for)")
        tau, options = spec.temperature, {"backend": backend, "backward_strategy": strategy}
        if spec.loss == "nt_xent":
            return lambda z1, z2, _: fastcl.nt_xent(z1, z2, temperature=tau, **options)
        if spec.loss == "groups":
            groups = sequence_ids(spec)  # built once: part of the data, not of the loss
            return lambda a, p, _: fastcl.info_nce(a, p, temperature=tau, groups=groups, **options)
        options = {**options, **spec.family_options}
        return lambda a, p, h: fastcl.info_nce(a, p, h, temperature=tau, symmetric=spec.symmetric, **options)

    return make


def _needed_rules(spec: Spec) -> frozenset[str]:
    """The layout rules (fastcl.ops.dispatch.LAYOUT_FEATURES) the spec's options need."""
    needed = set()
    if spec.hard and spec.k > 1:
        needed.add("hard_blocks")
    if spec.gte and spec.hard:
        needed.add("masked_hard")
    if spec.margin is not None:
        needed.add("margin")
    if spec.guide_dim:
        needed.add("guide")
    return frozenset(needed)


def fastcl_backend(impl: Impl, spec: Spec) -> str | None:
    """The backend a fastcl implementation runs at this size (None for the others)."""
    if not impl.backend:
        return None
    return chosen_backend(impl.backend, spec.device, spec.n_logits(), _needed_rules(spec))


def _group_flops(impl_backend: str) -> Callable[[Spec], float | None]:
    """fastcl's real work with groups: the chunked path (and the dense reference for tiny
    batches) computes every logit of the N x N matrix; the Triton kernels skip the tiles
    that share no group (8 N G D up to the rounding of sequences to tiles)."""

    def real(spec: Spec) -> float | None:
        chosen = chosen_backend(impl_backend, spec.device, spec.n_logits())
        return {"chunked": 8.0, "dense": 6.0}.get(chosen, 0) * spec.n * spec.n * spec.d or None

    return real


def _fastcl_impls(loss: str) -> list[Impl]:
    """fastcl with its default backend, each explicit one and each backward strategy."""
    function = "fastcl.nt_xent" if loss == "nt_xent" else "fastcl.info_nce"
    options = "a, p, groups=sequence, " if loss == "groups" else ""
    flops = _group_flops if loss == "groups" else (lambda backend: None)
    what = {"auto": "default backend for the device", "triton": "the Triton kernels",
            "torch": "chunked PyTorch", "native": "the compiled CPU kernel",
            "dense": "its dense path (N x M logits, what 'auto' takes for tiny batches)"}
    impls = [Impl("fastcl" if b == "auto" else f"fastcl-{b}", f"{function}({options}backend='{b}'): {words}",
                  _fastcl_factory(b), real_flops=flops(b), backend=b) for b, words in what.items()]
    for strategy in backward_strategies():
        impls.append(Impl(f"fastcl-{strategy}", f"{function}({options}backend='triton', "
                          f"backward_strategy={strategy!r})", _fastcl_factory("triton", strategy),
                          real_flops=flops("triton"), backend="triton", strategy=strategy))
    # The native kernel's recomputing path (forward, then a backward that forms S again),
    # next to its default one pass for reduced losses.
    impls.append(Impl("fastcl-native-recompute", f"{function}({options}backend='native', "
                      "backward_strategy='workspace'): forward, then the recomputing backward (8NMD)",
                      _fastcl_factory("native", "workspace"), real_flops=flops("native"), backend="native"))
    return impls


# ------------------------------------------------------------------------------ peers


def _needs_cuda(spec: Spec, name: str) -> None:
    if spec.device.type != "cuda":
        raise Unsupported(f"{name} runs only on CUDA tensors (Triton kernels)")


def _plain_only(spec: Spec, name: str) -> None:
    if not spec.plain:
        raise Unsupported(f"{name}: the benchmark has no adapter for K > 1 hard negatives per anchor, the GTE "
                          "directions, the false-negative margin or the guide mask")


def _make_memeff(spec: Spec) -> LossFn:
    _needs_cuda(spec, "memeff")
    _plain_only(spec, "memeff")
    import memeff

    if spec.loss == "nt_xent":
        module = memeff.MemoryEfficientQwen3Loss(temperature=spec.temperature, margin=4.0, use_qq_negatives=True,
                                                 stable=False)
        return lambda z1, z2, _: (module(z1, z2) + module(z2, z1)) / 2
    if spec.hard:
        raise Unsupported("memeff's hard negatives are row-specific (anchor i scores only its own), "
                          "not negatives shared by every anchor as in this loss")
    if spec.symmetric:
        module = memeff.MemoryEfficientCLIPLoss(temperature=spec.temperature, stable=False)
    else:  # margin >= 2: s_ij <= s_ii + margin always holds, the mask never fires
        module = memeff.MemoryEfficientQwen3Loss(temperature=spec.temperature, margin=4.0, stable=False)
    return lambda a, p, h: module(a, p)


INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)


def _make_inf_cl(spec: Spec) -> LossFn:
    _needs_cuda(spec, "inf-cl")
    _plain_only(spec, "inf-cl")
    head_dim = next((hd for hd in INF_CL_HEAD_DIMS if spec.d % hd == 0), None)
    if head_dim is None:
        raise Unsupported(f"inf-cl needs D divisible by one of its head sizes {INF_CL_HEAD_DIMS}; D = {spec.d}")
    from inf_cl import cal_inf_loss

    scale = 1.0 / spec.temperature

    def loss_fn(a, p, h):
        q, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
        k = pn if h is None else torch.cat([pn, F.normalize(h, dim=-1)])
        loss = cal_inf_loss(q, k, scale=scale, head_dim=head_dim)
        if spec.symmetric:
            loss = (loss + cal_inf_loss(pn, q, scale=scale, head_dim=head_dim)) / 2
        return loss

    return loss_fn


def _make_cce(spec: Spec) -> LossFn:
    _needs_cuda(spec, "cut-cross-entropy")
    _plain_only(spec, "cut-cross-entropy")
    if spec.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported(f"cut-cross-entropy's backward takes only bf16 / fp16 embeddings, not {spec.dtype}")
    from cut_cross_entropy import linear_cross_entropy

    scale = 1.0 / spec.temperature

    def loss_fn(a, p, h):
        q, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
        c = pn if h is None else torch.cat([pn, F.normalize(h, dim=-1)])
        targets = torch.arange(q.shape[0], device=q.device)
        loss = linear_cross_entropy(q * scale, c, targets, filter_eps=None, impl="cce")
        if spec.symmetric:
            loss = (loss + linear_cross_entropy(pn * scale, q, targets, filter_eps=None, impl="cce")) / 2
        return loss

    return loss_fn


def _cannot(reason: str) -> Callable[[Spec], LossFn]:
    def make(spec: Spec) -> LossFn:
        raise Unsupported(reason)

    return make


_NO_SELF_EXCLUSION = ("scores each row against every column of one candidate matrix, with no way to drop "
                      "the row's own column; NT-Xent needs z against z with the diagonal excluded")
_NO_GROUPS = ("has no group (block-diagonal) mask: every anchor scores every candidate; token-level groups "
              "would take one call per sequence")


# ---------------------------------------------------------------------------- registry


def _work(words: str, per_spec: Callable[[Spec], float]) -> dict:
    return dict(real_flops=per_spec, real_work_formula=words)


_DENSE_WORK = {
    "infonce": _work("6 N M D (+ 6 N (2N + M) D with --gte)", lambda s: 6.0 * s.d * (
        s.n * s.m + (s.n * s.n if s.symmetric else 0) + (s.n * (2 * s.n + s.m) if s.gte else 0))),
    "nt_xent": _work("6 (2N)^2 D", lambda s: 6.0 * (2 * s.n) ** 2 * s.d),
    "groups": _work("6 N G D", lambda s: 6.0 * s.n * s.group_size * s.d),
}
_DENSE_WORDS = {
    "infonce": "dense PyTorch: normalize, a @ c.T / tau, F.cross_entropy (--hard-k > 1, --gte, --margin, "
               "--guide-dim: every similarity matrix, its masks, one log-sum-exp, as sentence-transformers writes "
               "it)",
    "nt_xent": "dense PyTorch NT-Xent: normalize, z @ z.T / tau (2N x 2N), identity mask, F.cross_entropy",
    "groups": "dense PyTorch per sequence: (B, G, D) x (B, D, G) torch.bmm logits, F.cross_entropy per token",
}
_PEERS = {
    "infonce": [("memeff", "memeff MemoryEfficientQwen3Loss(margin=4, stable=False)", _make_memeff),
                ("inf-cl", "inf_cl.cal_inf_loss (flash path, fp32 inside)", _make_inf_cl),
                ("cce", "cut-cross-entropy linear_cross_entropy, exact (filter_eps=None)", _make_cce)],
    "nt_xent": [("memeff", "memeff MemoryEfficientQwen3Loss(use_qq_negatives=True, margin=4, stable=False), "
                 "mean of (z1, z2) and (z2, z1)", _make_memeff),
                ("inf-cl", "inf_cl.cal_inf_loss: cannot compute NT-Xent",
                 _cannot("inf-cl's cal_inf_loss " + _NO_SELF_EXCLUSION)),
                ("cce", "cut-cross-entropy linear_cross_entropy: cannot compute NT-Xent",
                 _cannot("cut-cross-entropy's linear_cross_entropy " + _NO_SELF_EXCLUSION))],
    "groups": [(name, f"{name}: cannot compute token-level groups", _cannot(f"{name} " + _NO_GROUPS))
               for name in PEERS],
}
_PACKAGES = {"memeff": ("memeff", "memeff"), "inf-cl": ("inf_cl", "inf-cl"), "cce": ("cut_cross_entropy",
                                                                                     "cut-cross-entropy")}


@functools.lru_cache(maxsize=None)
def registry(loss: str = "infonce") -> dict[str, Impl]:
    """The implementations of one benchmarked loss, by name."""
    impls = _fastcl_impls(loss)
    impls.append(Impl("dense", _DENSE_WORDS[loss], dense_form, **_DENSE_WORK[loss]))
    if loss == "groups":
        impls.append(Impl("dense-masked", "dense PyTorch over all N x N logits, other sequences masked to -inf, "
                          "F.cross_entropy", functools.partial(dense_form, masked=True),
                          **_work("6 N^2 D", lambda s: 6.0 * s.n * s.n * s.d)))
    impls.append(Impl("compiled", f"torch.compile of the {'per-sequence ' if loss == 'groups' else ''}dense loss "
                      "(fullgraph, static shapes)", lambda spec: compiled(spec, dense_form(spec)),
                      **_DENSE_WORK[loss]))
    for name, words, make in _PEERS[loss]:
        package, dist = _PACKAGES[name]
        # a peer that cannot compute the loss at all needs no import to say so
        impls.append(Impl(name, words, make, package=package if "cannot" not in words else None, dist_name=dist))
    impls.append(Impl("planted-error", "the dense loss with a 10% error planted in the second input's gradient "
                      "(test hook)", planted_error, hidden=True, **_DENSE_WORK[loss]))
    return {impl.name: impl for impl in impls}


def default_impls(device: torch.device, loss: str = "infonce") -> list[str]:
    dense = ["dense", "dense-masked", "compiled"] if loss == "groups" else ["dense", "compiled"]
    if device.type == "cuda":
        return ["fastcl", *(f"fastcl-{s}" for s in backward_strategies()), *dense, *PEERS]
    return ["fastcl", "fastcl-torch", "fastcl-native", *dense, *PEERS]
