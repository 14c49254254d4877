"""The implementations bench.py times: fastcl, the dense loss, its compiled form, the peers.

Every implementation is a factory ``make(spec) -> loss_fn`` where ``loss_fn(a, p, h)``
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
    import torch._dynamo

    # A fresh compilation per size: shapes are static (dynamic=False gives the kernels
    # the compiler would pick for this one size), and the old graphs are dropped.
    torch._dynamo.reset()
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))

    def loss_fn(a, p, h):
        return dense_loss(a, p, h, temperature=spec.temperature, symmetric=spec.symmetric)

    return torch.compile(loss_fn, dynamic=False, fullgraph=True, mode=spec.compile_mode)


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
    return _choose_backend(backend, spec.device, spec.n * spec.m)


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

        def loss_fn(a, p, h):
            return fastcl.info_nce(a, p, h, temperature=spec.temperature, symmetric=spec.symmetric,
                                   backend=backend)

        return loss_fn

    return make


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


# ---------------------------------------------------------------------------- registry

IMPLS: dict[str, Impl] = {impl.name: impl for impl in [
    Impl("fastcl", "fastcl.info_nce, default backend for the device", _fastcl_factory("auto")),
    Impl("fastcl-triton", "fastcl.info_nce(backend='triton'): the Triton kernels", _fastcl_factory("triton")),
    Impl("fastcl-torch", "fastcl.info_nce(backend='torch'): chunked PyTorch", _fastcl_factory("torch")),
    Impl("fastcl-native", "fastcl.info_nce(backend='native'): the compiled CPU extension",
         _fastcl_factory("native")),
    Impl("dense", "dense PyTorch: normalize, a @ c.T / tau, F.cross_entropy", _make_dense, real_work=6),
    Impl("compiled", "torch.compile of the dense loss (fullgraph, static shapes)", _make_compiled,
         real_work=6),
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


def default_impls(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fastcl", "fastcl-triton", "dense", "compiled", *PEERS]
    names = ["fastcl", "fastcl-torch"]
    try:
        if "native" in fastcl_backends():
            names.append("fastcl-native")
    except ImportError:
        pass
    return [*names, "dense", "compiled", *PEERS]
