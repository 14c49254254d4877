"""The implementations bench.py times: fastcl, the dense loss, its compiled form, the peers.

There is one registry per benchmarked loss (``--loss``): :data:`IMPLS` for InfoNCE,
:data:`NT_XENT_IMPLS` for NT-Xent and :data:`GROUP_IMPLS` for token-level groups (see
the end of this file); :func:`registry` picks one.

InfoNCE (``--loss infonce``): every implementation is a factory ``make(spec) -> loss_fn`` where ``loss_fn(a, p, h)``
takes the raw (unnormalized) anchors, positives and optional hard negatives, and
returns the scalar one-directional InfoNCE loss (mean over rows) with cosine
similarity and temperature ``spec.temperature``:

    c = [p; h]                 (h only with hard negatives, M = 2N; else M = N)
    logit[i, j] = cos(a_i, c_j) / tau,   loss = mean_i (logsumexp_j logit[i, j] - logit[i, i])

The normalization is part of every loss function, so each one is timed from the raw
embeddings to their gradients. A factory raises :class:`Unsupported` (with the reason)
for a configuration the implementation cannot compute as this loss; ``available()``
says whether its package can be imported at all.

The peers are thin adapters over their public APIs (read from their released code):

- memeff 0.3.1: ``MemoryEfficientQwen3Loss`` is a one-directional query->document
  InfoNCE; with ``margin`` >= 2 its false-negative mask can never fire (cosines lie in
  [-1, 1]), and ``stable=False`` gives the textbook gradient (its default rescales
  gradients by sqrt(batch * tau)). Its hard negatives are row-specific (anchor i sees
  only its own), not shared negatives, so the supervised shape is not this loss.
  ``symmetric`` uses ``MemoryEfficientCLIPLoss`` (the mean of both directions).
- inf-cl 1.2.1: ``cal_inf_loss(q, k, labels, scale, head_dim)`` on normalized rows with
  ``scale = 1 / tau``; it reshapes D into heads of ``head_dim`` (a divisor of D among
  16..256) and computes in fp32 whatever the input dtype.
- cut-cross-entropy 25.1.1: ``linear_cross_entropy(e, c, targets, filter_eps=None)``,
  i.e. exact mode (no gradient filtering), with the embeddings ``e`` = normalized
  anchors / tau and the classifier ``c`` = normalized candidates. Its backward accepts
  only bf16 / fp16 embeddings.

NT-Xent (``--loss nt_xent``): ``loss_fn(z1, z2, None)`` on two views (N x D each); all
2N rows of ``z = [z1; z2]`` are anchors, scored against the other 2N - 1 rows (itself
excluded), target the other view; mean over the 2N rows (SimCLR). memeff has it:
``MemoryEfficientQwen3Loss(use_qq_negatives=True)`` scores query i against every
document and every other query (its q-q block excludes the diagonal), which is exactly
NT-Xent's rows of one view; the mean of the two directions (z1, z2) and (z2, z1) is
NT-Xent. inf-cl and cut-cross-entropy score a row against every column of one matrix,
with no way to drop its own column, so they cannot compute it.

Token-level groups (``--loss groups``): ``loss_fn(a, p, None)`` on N tokens in N / G
sequences of G tokens each, sorted by sequence; token i's candidates are the positives
of its own sequence only (TaCL); mean over the N tokens. None of the peers has a group
or block-diagonal mask.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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
    loss: str = "infonce"  # infonce | nt_xent | groups
    group_size: int | None = None  # G, tokens per sequence (groups only)

    def n_logits(self) -> int:
        """The logits fastcl's dispatch counts for this call (it picks a backend by it)."""
        if self.loss == "nt_xent":
            return (2 * self.n) ** 2
        return self.n * self.m


@dataclass(frozen=True)
class Impl:
    """One implementation: how to build its loss function, and what it is."""

    name: str
    description: str
    make: Callable[[Spec], LossFn]
    package: str | None = None  # import name of the peer package, None for built-ins
    dist_name: str | None = None  # its name on PyPI, for the version record
    real_work: int | None = None  # FLOPs per N*M*D it really does, where known (dense: 6)
    hidden: bool = False  # not in the default list (test hooks)
    # The FLOPs it really does at a size, where known (overrides real_work), and that
    # formula in words for the record.
    real_flops: Callable[[Spec], float | None] | None = None
    real_work_formula: str | None = None

    def available(self) -> tuple[bool, str]:
        if self.package is None:
            return True, ""
        try:
            importlib.import_module(self.package)
        except Exception as exc:  # ImportError, or a peer failing at import time
            return False, f"{self.dist_name or self.package} not importable: {type(exc).__name__}: {exc}"
        return True, ""

    def version(self) -> str | None:
        if self.dist_name is None:
            return None
        try:
            return importlib.metadata.version(self.dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None


# ----------------------------------------------------------------------- the dense loss


def dense_loss(a, p, h, *, temperature: float, symmetric: bool) -> torch.Tensor:
    """The loss as people write it in PyTorch (under autocast the product is in the input
    dtype and cross-entropy in fp32): normalize, all logits at once, cross-entropy."""
    q = F.normalize(a, dim=-1)
    c = F.normalize(p if h is None else torch.cat([p, h]), dim=-1)
    logits = q @ c.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    targets = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, targets)
    if symmetric:  # the column direction of the in-batch block, as CLIP
        loss = (loss + F.cross_entropy(logits[:, : q.shape[0]].T, targets)) / 2
    return loss


def _make_dense(spec: Spec) -> LossFn:
    def loss_fn(a, p, h):
        return dense_loss(a, p, h, temperature=spec.temperature, symmetric=spec.symmetric)

    return loss_fn


def _make_compiled(spec: Spec) -> LossFn:
    def loss_fn(a, p, h):
        return dense_loss(a, p, h, temperature=spec.temperature, symmetric=spec.symmetric)

    return _compiled(loss_fn, spec)


def _compiled(fn, spec: Spec):
    """torch.compile of ``fn`` for one size: a fresh compilation per size, with static
    shapes (dynamic=False gives the kernels the compiler would pick for this one size),
    and the old graphs dropped."""
    import torch._dynamo

    torch._dynamo.reset()
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(fn, dynamic=False, fullgraph=True, mode=spec.compile_mode)


def dense_nt_xent(z1, z2, *, temperature: float) -> torch.Tensor:
    """NT-Xent as people write it in PyTorch: normalize both views, the (2N x 2N) logits
    of z = [z1; z2] against itself, the diagonal masked with an identity mask, and
    cross-entropy against the other view (products in the input dtype, cross-entropy in
    fp32, as under autocast)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def _make_dense_nt_xent(spec: Spec) -> LossFn:
    def loss_fn(z1, z2, _):
        return dense_nt_xent(z1, z2, temperature=spec.temperature)

    return loss_fn


def _make_compiled_nt_xent(spec: Spec) -> LossFn:
    def loss_fn(z1, z2, _):
        return dense_nt_xent(z1, z2, temperature=spec.temperature)

    return _compiled(loss_fn, spec)


def sequence_ids(spec: Spec) -> torch.Tensor:
    """The group of each token: N / G sequences of G tokens, in sequence order."""
    return torch.arange(spec.n, device=spec.device) // spec.group_size


def dense_grouped(a, p, *, group_size: int, temperature: float) -> torch.Tensor:
    """Token-level InfoNCE as people write it in PyTorch for sequences of equal length:
    batched per sequence, (B, G, D) x (B, D, G) -> (B, G, G) logits with ``torch.bmm``,
    cross-entropy per token against its own position (memory B G^2 = N G, not N^2)."""
    n, d = a.shape
    b = n // group_size
    q = F.normalize(a, dim=-1).view(b, group_size, d)
    c = F.normalize(p, dim=-1).view(b, group_size, d)
    logits = torch.bmm(q, c.transpose(1, 2))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    targets = torch.arange(group_size, device=a.device).repeat(b)
    return F.cross_entropy(logits.reshape(n, group_size), targets)


def dense_masked_grouped(a, p, groups, *, temperature: float) -> torch.Tensor:
    """The same loss over the full N x N logits, other sequences' columns masked to -inf
    (the form that also handles sequences of any lengths; memory N^2)."""
    q = F.normalize(a, dim=-1)
    c = F.normalize(p, dim=-1)
    logits = q @ c.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    logits = logits.masked_fill(groups[:, None] != groups[None, :], float("-inf"))
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def _make_dense_grouped(spec: Spec) -> LossFn:
    def loss_fn(a, p, _):
        return dense_grouped(a, p, group_size=spec.group_size, temperature=spec.temperature)

    return loss_fn


def _make_dense_masked_grouped(spec: Spec) -> LossFn:
    groups = sequence_ids(spec)

    def loss_fn(a, p, _):
        return dense_masked_grouped(a, p, groups, temperature=spec.temperature)

    return loss_fn


def _make_compiled_grouped(spec: Spec) -> LossFn:
    def loss_fn(a, p, _):
        return dense_grouped(a, p, group_size=spec.group_size, temperature=spec.temperature)

    return _compiled(loss_fn, spec)


# ----------------------------------------------------------------------------- fastcl


def fastcl_backends() -> tuple[str, ...]:
    from fastcl import loss

    return tuple(loss.BACKENDS)


def resolved_fastcl_backend(backend: str, spec: Spec) -> str | None:
    """Which backend fastcl's dispatch picks for ``backend`` at this size (None if the
    library does not say)."""
    try:
        from fastcl.loss import _choose_backend
    except ImportError:
        return None
    return _choose_backend(backend, spec.device, spec.n_logits())


def _fastcl_factory(backend: str) -> Callable[[Spec], LossFn]:
    def make(spec: Spec) -> LossFn:
        import fastcl

        if backend not in fastcl_backends():
            raise Unsupported(f"fastcl has no {backend!r} backend in this build "
                              f"(it has {', '.join(fastcl_backends())})")
        if backend == "triton" and spec.device.type != "cuda":
            from fastcl.ops.utils import interpreting

            if not interpreting():
                raise Unsupported("the Triton backend needs CUDA (or TRITON_INTERPRET=1, "
                                  "which bench.py sets only when fastcl-triton is asked for on CPU)")

        if spec.loss == "nt_xent":
            def loss_fn(z1, z2, _):
                return fastcl.nt_xent(z1, z2, temperature=spec.temperature, backend=backend)
        elif spec.loss == "groups":
            groups = sequence_ids(spec)  # built once: part of the data, not of the loss

            def loss_fn(a, p, _):
                return fastcl.info_nce(a, p, temperature=spec.temperature, groups=groups, backend=backend)
        else:
            def loss_fn(a, p, h):
                return fastcl.info_nce(a, p, h, temperature=spec.temperature, symmetric=spec.symmetric,
                                       backend=backend)

        return loss_fn

    return make


def _fastcl_group_flops(backend: str) -> Callable[[Spec], float | None]:
    """fastcl's real work with groups: the chunked PyTorch path (and the dense reference
    it uses for tiny batches) computes every logit of the N x N matrix and masks the other
    sequences' (8 N^2 D, 6 N^2 D); the Triton kernels skip the tiles that share no group,
    so theirs is 8 N G D up to the rounding of sequences to tiles (not counted here)."""

    def real(spec: Spec) -> float | None:
        chosen = resolved_fastcl_backend(backend, spec)
        if chosen == "torch":
            return 8.0 * spec.n * spec.n * spec.d
        if chosen == "reference":
            return 6.0 * spec.n * spec.n * spec.d
        return None

    return real


# ------------------------------------------------------------------------------ peers


def _needs_cuda(spec: Spec, name: str) -> None:
    if spec.device.type != "cuda":
        raise Unsupported(f"{name} runs only on CUDA tensors (Triton kernels)")


def _make_memeff(spec: Spec) -> LossFn:
    _needs_cuda(spec, "memeff")
    if spec.hard:
        raise Unsupported("memeff's hard negatives are row-specific (anchor i scores only its own), "
                          "not negatives shared by every anchor as in this loss")
    import memeff

    if spec.symmetric:
        module = memeff.MemoryEfficientCLIPLoss(temperature=spec.temperature, stable=False)
    else:
        # margin >= 2 disables the false-negative mask: s_ij <= s_ii + margin always holds.
        module = memeff.MemoryEfficientQwen3Loss(temperature=spec.temperature, margin=4.0, stable=False)

    def loss_fn(a, p, h):
        return module(a, p)

    return loss_fn


INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)


def _make_inf_cl(spec: Spec) -> LossFn:
    _needs_cuda(spec, "inf-cl")
    head_dim = next((hd for hd in INF_CL_HEAD_DIMS if spec.d % hd == 0), None)
    if head_dim is None:
        raise Unsupported(f"inf-cl needs D divisible by one of its head sizes {INF_CL_HEAD_DIMS}; D = {spec.d}")
    from inf_cl import cal_inf_loss

    inv_tau = 1.0 / spec.temperature

    def loss_fn(a, p, h):
        q = F.normalize(a, dim=-1)
        pn = F.normalize(p, dim=-1)
        k = pn if h is None else torch.cat([pn, F.normalize(h, dim=-1)])
        loss = cal_inf_loss(q, k, scale=inv_tau, head_dim=head_dim)
        if spec.symmetric:
            loss = (loss + cal_inf_loss(pn, q, scale=inv_tau, head_dim=head_dim)) / 2
        return loss

    return loss_fn


def _make_cce(spec: Spec) -> LossFn:
    _needs_cuda(spec, "cut-cross-entropy")
    if spec.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported(f"cut-cross-entropy's backward takes only bf16 / fp16 embeddings, not {spec.dtype}")
    from cut_cross_entropy import linear_cross_entropy

    inv_tau = 1.0 / spec.temperature

    def loss_fn(a, p, h):
        q = F.normalize(a, dim=-1)
        pn = F.normalize(p, dim=-1)
        c = pn if h is None else torch.cat([pn, F.normalize(h, dim=-1)])
        targets = torch.arange(q.shape[0], device=q.device)
        # filter_eps=None: exact gradients (its default filters small softmax entries out).
        loss = linear_cross_entropy(q * inv_tau, c, targets, filter_eps=None, impl="cce")
        if spec.symmetric:
            loss = (loss + linear_cross_entropy(pn * inv_tau, q, targets, filter_eps=None, impl="cce")) / 2
        return loss

    return loss_fn


def _make_memeff_nt_xent(spec: Spec) -> LossFn:
    """NT-Xent from memeff's Qwen3 loss with q-q negatives: query i against every document
    and every other query (diagonal excluded) is NT-Xent's row i of one view; the mean of
    both directions is NT-Xent over the 2N rows. margin >= 2 disables the false-negative
    mask, stable=False gives the textbook gradient (see the InfoNCE adapter)."""
    _needs_cuda(spec, "memeff")
    import memeff

    module = memeff.MemoryEfficientQwen3Loss(temperature=spec.temperature, margin=4.0, use_qq_negatives=True,
                                             stable=False)

    def loss_fn(z1, z2, _):
        return (module(z1, z2) + module(z2, z1)) / 2

    return loss_fn


def _cannot(reason: str) -> Callable[[Spec], LossFn]:
    """A peer that cannot compute this loss whatever the configuration."""

    def make(spec: Spec) -> LossFn:
        raise Unsupported(reason)

    return make


_NO_SELF_EXCLUSION = ("scores each row against every column of one candidate matrix, with no way to drop "
                      "the row's own column; NT-Xent needs z against z with the diagonal excluded")
_NO_GROUPS = ("has no group (block-diagonal) mask: every anchor scores every candidate; token-level groups "
              "would take one call per sequence")


# --------------------------------------------------------------- a planted error (tests)


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


def _make_planted_error(spec: Spec) -> LossFn:
    """The dense loss with the positives' gradient 10% too large and the loss exact: the
    agreement check must flag it on the gradient alone."""

    def loss_fn(a, p, h):
        return dense_loss(a, _ScaleGradient.apply(p, PLANTED_GRADIENT_SCALE), h,
                          temperature=spec.temperature, symmetric=spec.symmetric)

    return loss_fn


def _make_planted_error_nt_xent(spec: Spec) -> LossFn:
    """The dense NT-Xent with z2's gradient 10% too large, the loss exact."""

    def loss_fn(z1, z2, _):
        return dense_nt_xent(z1, _ScaleGradient.apply(z2, PLANTED_GRADIENT_SCALE), temperature=spec.temperature)

    return loss_fn


def _make_planted_error_grouped(spec: Spec) -> LossFn:
    """The batched dense grouped loss with the positives' gradient 10% too large."""

    def loss_fn(a, p, _):
        return dense_grouped(a, _ScaleGradient.apply(p, PLANTED_GRADIENT_SCALE), group_size=spec.group_size,
                             temperature=spec.temperature)

    return loss_fn


# ---------------------------------------------------------------------------- registry

IMPLS: dict[str, Impl] = {impl.name: impl for impl in [
    Impl("fastcl", "fastcl.info_nce, default backend for the device", _fastcl_factory("auto")),
    Impl("fastcl-triton", "fastcl.info_nce(backend='triton'): the Triton kernels", _fastcl_factory("triton")),
    Impl("fastcl-torch", "fastcl.info_nce(backend='torch'): chunked PyTorch", _fastcl_factory("torch")),
    Impl("fastcl-native", "fastcl.info_nce(backend='native'): the compiled CPU extension",
         _fastcl_factory("native")),
    Impl("dense", "dense PyTorch: normalize, a @ c.T / tau, F.cross_entropy", _make_dense, real_work=6,
         real_work_formula="6 N M D"),
    Impl("compiled", "torch.compile of the dense loss (fullgraph, static shapes)", _make_compiled,
         real_work=6, real_work_formula="6 N M D"),
    Impl("memeff", "memeff MemoryEfficientQwen3Loss(margin=4, stable=False)", _make_memeff,
         package="memeff", dist_name="memeff"),
    Impl("inf-cl", "inf_cl.cal_inf_loss (flash path, fp32 inside)", _make_inf_cl,
         package="inf_cl", dist_name="inf-cl"),
    Impl("cce", "cut-cross-entropy linear_cross_entropy, exact (filter_eps=None)", _make_cce,
         package="cut_cross_entropy", dist_name="cut-cross-entropy"),
    Impl("planted-error", "dense loss with a 10% error planted in the positives' gradient (test hook)",
         _make_planted_error, hidden=True),
]}

PEERS = ("memeff", "inf-cl", "cce")


def _fastcl_impls(function: str, options: str = "", real_flops=None) -> list[Impl]:
    """fastcl with its default backend and each explicit one."""
    what = {"triton": "the Triton kernels", "torch": "chunked PyTorch", "native": "the compiled CPU extension"}
    impls = [Impl("fastcl", f"{function}({options.rstrip(', ')}), default backend for the device",
                  _fastcl_factory("auto"),
                  real_flops=real_flops("auto") if real_flops else None)]
    for backend, words in what.items():
        impls.append(Impl(f"fastcl-{backend}", f"{function}({options}backend='{backend}'): {words}",
                          _fastcl_factory(backend), real_flops=real_flops(backend) if real_flops else None))
    return impls


def _twice(n: int) -> int:
    return 2 * n


NT_XENT_IMPLS: dict[str, Impl] = {impl.name: impl for impl in [
    *_fastcl_impls("fastcl.nt_xent"),
    Impl("dense", "dense PyTorch NT-Xent: normalize, z @ z.T / tau (2N x 2N), identity mask, F.cross_entropy",
         _make_dense_nt_xent, real_flops=lambda s: 6.0 * _twice(s.n) ** 2 * s.d, real_work_formula="6 (2N)^2 D"),
    Impl("compiled", "torch.compile of the dense NT-Xent (fullgraph, static shapes)", _make_compiled_nt_xent,
         real_flops=lambda s: 6.0 * _twice(s.n) ** 2 * s.d, real_work_formula="6 (2N)^2 D"),
    Impl("memeff", "memeff MemoryEfficientQwen3Loss(use_qq_negatives=True, margin=4, stable=False), mean of "
         "(z1, z2) and (z2, z1)", _make_memeff_nt_xent, package="memeff", dist_name="memeff"),
    Impl("inf-cl", "inf_cl.cal_inf_loss: cannot compute NT-Xent",
         _cannot("inf-cl's cal_inf_loss " + _NO_SELF_EXCLUSION),
         dist_name="inf-cl"),
    Impl("cce", "cut-cross-entropy linear_cross_entropy: cannot compute NT-Xent",
         _cannot("cut-cross-entropy's linear_cross_entropy " + _NO_SELF_EXCLUSION), dist_name="cut-cross-entropy"),
    Impl("planted-error", "dense NT-Xent with a 10% error planted in z2's gradient (test hook)",
         _make_planted_error_nt_xent, hidden=True),
]}

GROUP_IMPLS: dict[str, Impl] = {impl.name: impl for impl in [
    *_fastcl_impls("fastcl.info_nce", "a, p, groups=sequence, ", _fastcl_group_flops),
    Impl("dense", "dense PyTorch per sequence: (B, G, D) x (B, D, G) torch.bmm logits, F.cross_entropy per token",
         _make_dense_grouped, real_flops=lambda s: 6.0 * s.n * s.group_size * s.d, real_work_formula="6 N G D"),
    Impl("dense-masked", "dense PyTorch over all N x N logits, other sequences masked to -inf, F.cross_entropy",
         _make_dense_masked_grouped, real_flops=lambda s: 6.0 * s.n * s.n * s.d, real_work_formula="6 N^2 D"),
    Impl("compiled", "torch.compile of the per-sequence dense loss (fullgraph, static shapes)",
         _make_compiled_grouped, real_flops=lambda s: 6.0 * s.n * s.group_size * s.d, real_work_formula="6 N G D"),
    Impl("memeff", "memeff: cannot compute token-level groups", _cannot("memeff " + _NO_GROUPS), dist_name="memeff"),
    Impl("inf-cl", "inf_cl.cal_inf_loss: cannot compute token-level groups", _cannot("inf-cl " + _NO_GROUPS),
         dist_name="inf-cl"),
    Impl("cce", "cut-cross-entropy linear_cross_entropy: cannot compute token-level groups",
         _cannot("cut-cross-entropy " + _NO_GROUPS), dist_name="cut-cross-entropy"),
    Impl("planted-error", "per-sequence dense loss with a 10% error planted in the positives' gradient "
         "(test hook)", _make_planted_error_grouped, hidden=True),
]}

LOSSES = ("infonce", "nt_xent", "groups")


def registry(loss: str = "infonce") -> dict[str, Impl]:
    """The implementations of one benchmarked loss."""
    return {"infonce": IMPLS, "nt_xent": NT_XENT_IMPLS, "groups": GROUP_IMPLS}[loss]


def default_impls(device: torch.device, loss: str = "infonce") -> list[str]:
    dense = ["dense", "dense-masked", "compiled"] if loss == "groups" else ["dense", "compiled"]
    if device.type == "cuda":
        return ["fastcl", "fastcl-triton", *dense, *PEERS]
    names = ["fastcl", "fastcl-torch"]
    try:
        if "native" in fastcl_backends():
            names.append("fastcl-native")
    except ImportError:
        pass
    return [*names, *dense, *PEERS]
