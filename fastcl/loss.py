"""The InfoNCE loss: the functional form :func:`info_nce` and the module :class:`InfoNCELoss`.

Both hand their arguments to :mod:`fastcl.plan`, which checks them and decides what
runs; the autograd Function (:mod:`fastcl.ops.function`) runs it.
"""

from __future__ import annotations

import torch
from torch import nn

from .gaussian import draw_gaussian_negatives, generator_of
from .numerics import TEMPERATURE_TENSOR_MESSAGE, temperature_tensor_ok
from .directions import per_row_losses
from .plan import LossOptions, output_dtype, plan_info_nce, reduce_rows
from .reference import info_nce_reference

__all__ = ["InfoNCELoss", "draw_gaussian_negatives", "info_nce"]


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    hard_negative_weight: float = 1.0,
    gaussian_negatives: int = 0,
    gaussian_weight: float = 1.0,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    backward_strategy: str = "auto",
    check_finite: bool = True,
    groups: torch.Tensor | None = None,
    directions: tuple[str, ...] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    guide_anchors: torch.Tensor | None = None,
    guide_candidates: torch.Tensor | None = None,
    guide_threshold: float | torch.Tensor | None = None,
    doc_to_doc_negatives: bool = True,
) -> torch.Tensor:
    """InfoNCE over in-batch, hard, extra and Gaussian negatives, without an N x M matrix.

    For anchors ``a`` (N x D) and candidates ``c = [positives; hard_negatives;
    extra_negatives; gaussian]`` (M rows), with every row L2-normalized when
    ``normalize`` (as ``F.normalize(x, dim=-1, eps=eps)``)::

        logit[i, j] = cos(a_i, c_j) / temperature + w[i, j]
        loss_i      = logsumexp_j logit[i, j] - logit[i, labels[i]]

    Args:
        anchors: N x D, receives a gradient.
        positives: N x D; row i is anchor i's positive. Receives a gradient. Every
            positive is a negative for every other anchor (in-batch negatives).
        hard_negatives: optional N x D, or N x K x D for K hard negatives per anchor
            (``h[i, k]`` is anchor i's k-th; the candidate columns are then ``[positives;
            h[:, 0]; ...; h[:, K-1]]``, sentence-transformers' order). Each is also a
            negative for every other anchor (SimCSE's convention). Receives a gradient.
        extra_negatives: optional Q x D negatives shared by all anchors (a MoCo queue, a
            precomputed corpus). They always add to the in-batch negatives, never replace
            them, and receive no gradient (they are detached).
        temperature: tau, a float or a one-element tensor; a tensor that requires grad
            (a learnable temperature, e.g. ``1 / logit_scale.exp()``) gets its gradient.
            Must be finite and >= 1e-6 (:data:`fastcl.numerics.MIN_TEMPERATURE`).
        hard_negative_weight: SimCSE's alpha, as a weight (not a logit offset): the logit
            of anchor i against each of its own hard negatives gets ``log(hard_negative_weight)``
            added, so 1.0 means unweighted. (SimCSE's code adds its ``hard_negative_weight``
            directly to the logit; pass ``exp`` of that value here.)
        gaussian_negatives: G, how many vectors from N(0, I) to draw as extra negatives on
            every call (GS-InfoNCE). No gradient flows to them.
        gaussian_weight: GS-InfoNCE's lambda, as a weight: ``log(gaussian_weight)`` is
            added to every Gaussian logit.
        generator: ``torch.Generator`` (on the inputs' device) for the Gaussian draws, for
            reproducibility.
        labels: optional N integer targets, each a candidate column in ``[0, N + K N + Q)``;
            the default is ``i`` (positive i). Only with the default ``directions`` (not
            with ``symmetric``).
        symmetric: also score each positive against all anchors (the column direction of
            the in-batch block) and average the two losses per row, as CLIP does: the
            same as ``directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction"`` (not allowed with other ``directions``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-row losses, length N).
        normalize: L2-normalize every row (cosine similarity); False uses raw dot products.
        eps: the normalization's lower bound on a norm, in [1e-15, 1e15]
            (:data:`fastcl.numerics.EPS_RANGE`).
        backend: what computes the loss. ``"auto"`` (default): the dense path for tiny
            batches (below 65,536 logits), the Triton kernels on CUDA (and on CPU under
            ``TRITON_INTERPRET=1``), on CPU the native C++ kernel when the extension is
            built, else the chunked PyTorch path. Or one of them: ``"triton"``,
            ``"cpp"`` (the native C++ CPU kernel), ``"chunked"`` (PyTorch, a chunk of
            rows at a time), ``"dense"`` (the N x M reference, differentiated by
            autograd). Older names stay accepted: ``"native"`` (the C++ kernel on CPU,
            the Triton kernels on CUDA), ``"torch"`` (= ``"chunked"``), ``"reference"``
            (= ``"dense"``).
        backward_strategy: how the fused backends form the gradients. ``"auto"``
            (default; for Triton, ``"slab"`` with groups or when one gradient slab spans
            D, else ``"workspace"``; the environment variable ``FASTCL_BACKWARD``
            overrides this choice), ``"slab"`` (Triton only: each slab of D recomputes
            its similarity tiles, no buffer) or ``"workspace"`` (the logit gradients of
            a block of rows in a bounded buffer, then matrix products; every fused
            backend). With ``backend="auto"`` an explicit strategy picks a fused backend
            that offers it, also for tiny batches. Not for ``backend="dense"``.
        check_finite: check the inputs for NaN / inf before computing (one device sync
            per call, shared with the label and temperature checks). The same sync finds
            rows whose squares overflow or underflow the accumulator (float32 rows of norm
            about 1e17 and above, say): with ``normalize`` they are rescaled exactly by a
            power of two (the loss depends only on their direction), without it the call
            is refused. False skips all of it: the caller vouches for the values.
        groups: optional N integer group ids (token-level InfoNCE, e.g. TaCL: one id per
            sequence). Anchor i's positives and hard negatives are then only those of rows
            in its own group; extra and Gaussian negatives stay shared by all groups.
            Rows sorted by group (sequence after sequence) let the kernels skip every tile
            whose rows and columns share no group. See :func:`fastcl.token_info_nce` for
            the padded (batch x length x D) form. Not allowed with ``labels``, with K > 1
            hard negatives per anchor, or with the same-tower directions.
        directions: which similarities enter each row's softmax (sentence-transformers'
            ``MultipleNegativesRankingLoss``; all four joint is GTE's improved
            contrastive loss, Li et al. 2023): ``"query_to_doc"`` (required: anchor i
            against every candidate), ``"query_to_query"`` (anchor i against every other
            anchor), ``"doc_to_query"`` (positive i against every anchor),
            ``"doc_to_doc"`` (positive i against every positive and hard negative but
            anchor i's own). Extra and Gaussian negatives enter query_to_doc only.
        partition_mode: ``"joint"`` (one softmax over the union of the directions'
            entries) or ``"per_direction"`` (each direction's log-sum-exp, averaged;
            refused with query_to_query or doc_to_doc, which never hold the positive).
        hardness_mode, hardness_strength: add ``hardness_strength * cos`` (no gradient,
            not divided by the temperature; EmbeddingGemma, Lan et al. 2025) to the
            query_to_doc logits of ``"in_batch_negatives"`` (every candidate but the
            anchor's own positive and hard negatives), ``"hard_negatives"`` (its own hard
            negatives) or ``"all_negatives"`` (every candidate but its positive). The
            target is never penalized (with ``labels`` it takes the place of the
            positive); None, or strength 0, adds nothing.
        false_negative_margin: m (Qwen3-Embedding uses 0.1; NV-Retriever): in every
            direction, an entry of row i other than its positive is dropped from the
            softmax when its cosine (dot product without ``normalize``) exceeds that of
            the positive pair plus m. No gradient flows through the decision.
        guide_anchors, guide_candidates, guide_threshold: a guide model's embeddings
            (GISTEmbed's guide, DCLR's complementary model), all three or none:
            ``guide_anchors`` N x Dg (one row per anchor) and ``guide_candidates`` one row
            per positive and hard negative, in the candidates' order (``[guide
            positives; guide h[:, 0]; ...]``, N (1 + K) x Dg), any Dg and floating dtype;
            ``guide_threshold`` a float or N values (row i's). In every direction an
            entry of row i other than its positive, against a positive or hard negative,
            is dropped from the softmax when the cosine of the two rows' guide
            embeddings exceeds ``guide_threshold[i]`` (query_to_doc: guide anchor i
            against guide candidate j; query_to_query: guide anchors; doc_to_query: guide
            positive i against guide anchor j; doc_to_doc: guide candidates). Extra and
            Gaussian negatives are never dropped; no gradient flows into the guide. The
            guide's products are formed tile by tile in the kernels (no N x M buffer).
            Every backend computes it (the guide's products at full precision, so the
            mask decides as the float64 reference does); not with ``groups``. With
            ``check_finite`` the guide's values are checked too (one more device sync).
        doc_to_doc_negatives: with ``"doc_to_doc"``, whether positive i is also scored
            against the other anchors' hard negatives (True, sentence-transformers'
            ``MultipleNegativesRankingLoss``) or against the other positives only (False,
            ``GISTEmbedLoss``'s positive-positive term).

    Returns:
        The reduced loss (a scalar), or the N per-row losses for ``reduction="none"``; in
        float32 for float16 / bfloat16 inputs (as cross-entropy under autocast), else in
        the input dtype.

    Raises:
        TypeError / ValueError, before any kernel runs, for inputs it cannot compute:
        wrong ranks or shapes, empty batches, mixed devices or dtypes, integer dtypes,
        non-finite values, temperature below 1e-6 or weights <= 0, eps outside
        [1e-15, 1e15], switches that are not bools, labels out of range, unknown
        backends or strategies (or a strategy the backend does not offer), and
        (without normalization) inputs whose logits would overflow.

    float16 and bfloat16 inputs are computed with float32 accumulation on every backend
    and every batch size (norms, cosines, softmax, gradients); only the returned
    gradients are rounded to the input dtype.
    """
    options = LossOptions(
        temperature=temperature, hard_negative_weight=hard_negative_weight, gaussian_negatives=gaussian_negatives,
        gaussian_weight=gaussian_weight, symmetric=symmetric, reduction=reduction, normalize=normalize, eps=eps,
        backend=backend, backward_strategy=backward_strategy, check_finite=check_finite, directions=directions,
        partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        false_negative_margin=false_negative_margin, doc_to_doc_negatives=doc_to_doc_negatives).checked()
    plan = plan_info_nce(options, anchors, positives, hard_negatives, extra_negatives, labels=labels, groups=groups,
                         generator=generator, guide_anchors=guide_anchors, guide_candidates=guide_candidates,
                         guide_threshold=guide_threshold)
    x = plan.inputs
    if plan.rows is None:  # the dense path
        loss = info_nce_reference(
            x.anchors, x.positives, x.hard_negatives, x.extra_negatives, plan.gaussian, temperature=temperature,
            hard_negative_weight=hard_negative_weight, gaussian_weight=gaussian_weight, labels=labels,
            reduction=reduction, normalize=normalize, eps=eps, groups=groups, directions=options.directions,
            partition_mode=options.partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
            false_negative_margin=options.margin, guide_anchors=guide_anchors, guide_candidates=guide_candidates,
            guide_threshold=guide_threshold, doc_to_doc_negatives=doc_to_doc_negatives)
        return loss.to(output_dtype(x.anchors.dtype))
    per_row = per_row_losses(plan.rows, [plan.columns] if plan.columns is not None else [], plan.same_tower,
                             plan.positive, options.partition_mode)
    return reduce_rows(per_row, reduction, x.anchors.dtype)


class InfoNCELoss(nn.Module):
    """InfoNCE loss module; see :func:`info_nce` for what every argument means.

    Defaults follow SimCSE (cosine similarity, temperature 0.05, mean reduction)::

        loss_fn = InfoNCELoss(temperature=0.05)
        loss = loss_fn(anchors, positives)                    # unsupervised SimCSE
        loss = loss_fn(anchors, positives, hard_negatives=h)  # supervised SimCSE
        InfoNCELoss(hard_negative_weight=2.0)                 # SimCSE's alpha, as a weight
        InfoNCELoss(gaussian_negatives=192, gaussian_weight=1.0, seed=0)  # GS-InfoNCE
        InfoNCELoss(temperature=nn.Parameter(torch.tensor(0.05)))         # learnable tau
        InfoNCELoss(symmetric=True)                           # CLIP-style, both directions
        InfoNCELoss(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                    false_negative_margin=0.1)                # GTE's directions, Qwen3's margin
        loss_fn(anchors, positives, hard_negatives=h)         # h: N x K x D, K per anchor

    sentence-transformers' ``MultipleNegativesRankingLoss(scale=20.0)`` is
    ``InfoNCELoss(temperature=1 / 20.0)``.

    A temperature given as an ``nn.Parameter`` is registered as this module's parameter,
    so ``loss_fn.parameters()`` hands it to the optimizer. Gaussian negatives are drawn
    from ``generator`` if given, else from a generator seeded with ``seed`` (created on
    the inputs' device at the first call), else from PyTorch's global generator. Under
    torch.compile / torch.export they are drawn by an opaque operator from that same
    generator, so a compiled step draws exactly what the eager step would.
    """

    def __init__(
        self,
        temperature: float | torch.Tensor = 0.05,
        *,
        hard_negative_weight: float = 1.0,
        gaussian_negatives: int = 0,
        gaussian_weight: float = 1.0,
        symmetric: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
        eps: float = 1e-12,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        backward_strategy: str = "auto",
        check_finite: bool = True,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        false_negative_margin: float | None = None,
        doc_to_doc_negatives: bool = True,
    ) -> None:
        super().__init__()
        LossOptions(temperature=temperature, hard_negative_weight=hard_negative_weight,
                    gaussian_negatives=gaussian_negatives, gaussian_weight=gaussian_weight, symmetric=symmetric,
                    reduction=reduction, normalize=normalize, eps=eps, backend=backend,
                    backward_strategy=backward_strategy, check_finite=check_finite, directions=directions,
                    partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
                    false_negative_margin=false_negative_margin, doc_to_doc_negatives=doc_to_doc_negatives).checked()
        if isinstance(temperature, torch.Tensor) and not isinstance(temperature, nn.Parameter):
            if not bool(temperature_tensor_ok(temperature)):
                raise ValueError(f"{TEMPERATURE_TENSOR_MESSAGE}, got {temperature.item()}")
        self.temperature = temperature
        self.hard_negative_weight = float(hard_negative_weight)
        self.gaussian_negatives = int(gaussian_negatives)
        self.gaussian_weight = float(gaussian_weight)
        self.symmetric = bool(symmetric)
        self.reduction = reduction
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.seed = seed
        self.generator = generator
        self.backend = backend
        self.backward_strategy = backward_strategy
        self.check_finite = bool(check_finite)
        self.directions, self.partition_mode = tuple(directions), partition_mode
        self.hardness_mode, self.hardness_strength = hardness_mode, float(hardness_strength)
        self.false_negative_margin = false_negative_margin
        self.doc_to_doc_negatives = doc_to_doc_negatives

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        extra_negatives: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        guide_anchors: torch.Tensor | None = None,
        guide_candidates: torch.Tensor | None = None,
        guide_threshold: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of one batch; every argument as in :func:`info_nce`."""
        if not self.gaussian_negatives:
            generator = None
        elif torch.compiler.is_compiling():
            generator = self  # resolved inside the drawing operator, outside the graph
        else:
            generator = generator_of(self, anchors.device)
        return info_nce(
            anchors, positives, hard_negatives, extra_negatives,
            temperature=self.temperature, hard_negative_weight=self.hard_negative_weight,
            gaussian_negatives=self.gaussian_negatives, gaussian_weight=self.gaussian_weight,
            generator=generator, labels=labels, symmetric=self.symmetric, reduction=self.reduction,
            normalize=self.normalize, eps=self.eps, backend=self.backend, backward_strategy=self.backward_strategy,
            check_finite=self.check_finite, groups=groups, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, false_negative_margin=self.false_negative_margin,
            doc_to_doc_negatives=self.doc_to_doc_negatives,
            guide_anchors=guide_anchors, guide_candidates=guide_candidates, guide_threshold=guide_threshold)

    def extra_repr(self) -> str:
        tau = self.temperature if not isinstance(self.temperature, torch.Tensor) else "learnable"
        parts = [f"temperature={tau}"]
        if self.hard_negative_weight != 1.0:
            parts.append(f"hard_negative_weight={self.hard_negative_weight}")
        if self.gaussian_negatives:
            parts.append(f"gaussian_negatives={self.gaussian_negatives}, gaussian_weight={self.gaussian_weight}")
        if self.symmetric:
            parts.append("symmetric=True")
        if self.directions != ("query_to_doc",):
            parts.append(f"directions={self.directions}, partition_mode={self.partition_mode!r}")
        if self.hardness_mode is not None:
            parts.append(f"hardness_mode={self.hardness_mode!r}, hardness_strength={self.hardness_strength}")
        if self.false_negative_margin is not None:
            parts.append(f"false_negative_margin={self.false_negative_margin}")
        if not self.doc_to_doc_negatives:
            parts.append("doc_to_doc_negatives=False")
        parts.append(f"reduction={self.reduction!r}")
        if not self.normalize:
            parts.append("normalize=False")
        return ", ".join(parts)
