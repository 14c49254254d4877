"""sentence-transformers losses computed by fastcl: switch by changing one import.

::

    # from sentence_transformers.losses import MultipleNegativesRankingLoss
    from fastcl.sentence_transformers import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [384, 256, 128, 64])

Each class here is a subclass of the sentence-transformers (>= 6.2) class of the same
name, with the same constructor, the same dataset columns ((anchor, positive) pairs or
(anchor, positive, negative) triplets), the same ``get_config_dict`` and ``citation``
(model cards are written as usual), the same loss value and the same gradients. Only the
loss computation differs: it is :func:`fastcl.info_nce` (or, with
``gather_across_devices=True`` under torch.distributed,
:func:`fastcl.distributed.gathered_info_nce`), which never builds the batch x batch
similarity matrix. ``MatryoshkaLoss`` wraps them exactly as it wraps the originals: it
decorates the model's forward (plain losses) or ``calculate_loss`` (cached losses), and
both keep their sentence-transformers structure here.

Every configuration of the sentence-transformers loss is computed: K negative columns
(``hard_negatives`` N x K x D), ``directions``, ``partition_mode``, ``hardness_mode`` and
``hardness_strength`` are fastcl's keywords of the same names (:func:`loss_options` is the
one place that maps them); ``similarity_fct`` other than ``cos_sim`` / ``dot_score``
raises ``ValueError``. ``GISTEmbedLoss`` and ``CachedGISTEmbedLoss`` are fastcl's guide
mask (``guide_anchors``, ``guide_candidates``, ``guide_threshold``), formed tile by tile
in the kernels.

This module imports sentence-transformers; ``import fastcl`` never does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as _STCachedGISTEmbedLoss
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as _STCachedMultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as _STGISTEmbedLoss
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as _STMultipleNegativesRankingLoss,
    )
    from sentence_transformers.util import batch_to_device, cos_sim, dot_score, pytorch_cos_sim, similarity_fct_name
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastcl.sentence_transformers needs sentence-transformers >= 6.2: "
        "pip install 'fastcl[sentence-transformers]'") from error

from .distributed import gathered_info_nce
from .loss import info_nce

logger = logging.getLogger(__name__)

__all__ = [
    "MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss", "CachedGISTEmbedLoss", "loss_options",
]

SYMMETRIC_DIRECTIONS = ("query_to_doc", "doc_to_query")


# ------------------------------------------------------------------ option mapping


def normalize_for(similarity_fct: Callable) -> bool:
    """fastcl's ``normalize`` for a sentence-transformers similarity function."""
    if similarity_fct is cos_sim or similarity_fct is pytorch_cos_sim:
        return True
    if similarity_fct is dot_score:
        return False
    raise ValueError(
        "similarity_fct must be sentence_transformers.util.cos_sim (fastcl's normalize=True) or "
        "sentence_transformers.util.dot_score (normalize=False): fastcl computes no other similarity, "
        f"got {similarity_fct_name(similarity_fct)}")


def loss_options(directions: Sequence[str], partition_mode: str, hardness_mode: str | None,
                 hardness_strength: float) -> dict:
    """The keyword arguments of fastcl's loss for a sentence-transformers
    ``MultipleNegativesRankingLoss`` configuration (``temperature`` and ``normalize`` aside):
    the directions and partition mode unless they are the default single direction (where
    both partition modes are one softmax), and the hardness penalty when it adds anything
    (strength > 0)."""
    options: dict = {}
    if tuple(directions) != ("query_to_doc",):
        options.update(directions=tuple(directions), partition_mode=partition_mode)
    if hardness_mode is not None and hardness_strength > 0.0:
        options.update(hardness_mode=hardness_mode, hardness_strength=float(hardness_strength))
    return options


def _negatives(columns: list[Tensor]) -> Tensor | None:
    """The negative columns as fastcl's ``hard_negatives``: None, N x D for one column,
    N x K x D for K, whose candidate order ``[positives, column 1, .., column K]`` is
    sentence-transformers' ``docs_all``."""
    if not columns:
        return None
    return columns[0] if len(columns) == 1 else torch.stack(columns, dim=1)


@functools.cache
def _warn_not_distributed() -> None:
    logger.warning("gather_across_devices=True, but torch.distributed is not initialized: computing the loss "
                   "over this process's batch only.")


# ------------------------------------------------------------------------- losses


class MultipleNegativesRankingLoss(_STMultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss``, computed by fastcl.

    The same arguments, columns, loss and gradients as the sentence-transformers class
    (see its documentation); ``scale`` is fastcl's ``1 / temperature``, ``similarity_fct``
    ``cos_sim`` or ``dot_score`` is ``normalize=True`` or ``False``, and no batch x batch
    matrix is built. With ``gather_across_devices=True`` under torch.distributed every
    rank's positives and negatives (and, for ``doc_to_query``, anchors) are gathered with
    their gradients (:func:`fastcl.distributed.gathered_info_nce`); each rank returns the
    mean loss of its own anchors, as sentence-transformers does.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        # Refuse a similarity fastcl does not compute now, not at the first training step.
        normalize_for(self.similarity_fct)

    def _loss_function(self) -> Callable:
        if not self.gather_across_devices:
            return info_nce
        if dist.is_available() and dist.is_initialized():
            return gathered_info_nce
        _warn_not_distributed()
        return info_nce

    def _fastcl_options(self) -> dict:
        return loss_options(self.directions, self.partition_mode, self.hardness_mode, self.hardness_strength)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss of the column embeddings ``[anchors, positives, negatives...]`` (each N x D);
        ``labels`` are unused: anchor i's positive is row i of the positives."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        fn = self._loss_function()
        options = self._fastcl_options()  # read per call: the attributes may have been reassigned
        normalize = normalize_for(self.similarity_fct)
        hard_negatives = _negatives(list(embeddings[2:]))
        # check_finite=False: like sentence-transformers, a non-finite embedding gives a NaN loss
        # (a step that fp16 loss scaling skips), not an exception, and no host sync is made.
        return fn(embeddings[0], embeddings[1], hard_negatives, temperature=1.0 / self.scale, normalize=normalize,
                  check_finite=False, **options)


class CachedMultipleNegativesRankingLoss(_STCachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache), computed
    by fastcl.

    The gradient caching is sentence-transformers' own (its ``CachedLossMixin``): the
    mini-batches are embedded without gradients, the loss and the embeddings' gradients
    are computed, then every mini-batch is embedded again under the same RNG state and
    back-propagated with its cached gradient. The loss stage is one fastcl call over the
    whole batch: with no score matrix there is nothing to chunk, so ``mini_batch_size``
    and ``mini_batch_num_tokens`` bound the encoder's memory only. The wrapped loss
    (``self.loss``) is fastcl's :class:`MultipleNegativesRankingLoss` and holds the
    hyperparameters, as in sentence-transformers.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        # Built first: it validates (and warns about) every loss hyperparameter once.
        inner = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens, gather_across_devices=gather_across_devices,
                         directions=directions, partition_mode=partition_mode,
                         show_progress_bar=show_progress_bar)
        self.loss = inner

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings (``reps[column]``
        is the list of that column's mini-batches). With ``with_backward`` the gradients of
        the embeddings are left in their ``.grad`` and the detached loss is returned."""
        embeddings = [torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


# The symmetric classes are sentence-transformers' aliases of the two losses above with
# both directions, each with its own softmax (fastcl's ``symmetric=True``); their
# constructors are sentence-transformers' (the same arguments, without directions).


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``: anchor -> candidates
    and positive -> anchors, averaged. The same as ``MultipleNegativesRankingLoss(model,
    directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")``."""

    def __init__(self, model, scale: float = 20.0, similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
                 gather_across_devices: bool = False) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
                         directions=SYMMETRIC_DIRECTIONS, partition_mode="per_direction")


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesSymmetricRankingLoss``: the symmetric
    loss with GradCache (see :class:`CachedMultipleNegativesRankingLoss`)."""

    def __init__(self, model, scale: float = 20.0, similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens, gather_across_devices=gather_across_devices,
                         directions=SYMMETRIC_DIRECTIONS, partition_mode="per_direction",
                         show_progress_bar=show_progress_bar)


# ------------------------------------------------------------------- GISTEmbed


def _guide_features(loss, sentence_features: list[dict]) -> list[dict]:
    """The guide's inputs: the model's features (shallow copies: the guide writes into
    the dicts it is given), or, when the guide reads other tokens (``must_retokenize``),
    the texts decoded with the model's tokenizer and encoded with the guide's, as
    sentence-transformers does."""
    if not loss.must_retokenize:
        return [dict(feature) for feature in sentence_features]
    guide_features = []
    for feature in sentence_features:
        input_ids = feature["input_ids"]
        if "cu_seq_lens_q" in feature:  # packed rows: one flat sequence and its boundaries
            flat, bounds = input_ids[0].tolist(), feature["cu_seq_lens_q"].tolist()
            input_ids = [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
        decoded = loss.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        guide_features.append(batch_to_device(loss.guide.preprocess(decoded), loss.guide.device))
    return guide_features


def gist_loss(loss, embeddings: list[Tensor], guide_embeddings: list[Tensor]) -> Tensor:
    """GISTEmbed's loss of the columns' embeddings ``[anchors, positives, negatives...]``
    and the guide's embeddings of the same columns, with ``loss``'s hyperparameters
    (``temperature``, ``margin_strategy``, ``margin``, ``contrast_anchors``,
    ``contrast_positives``, ``gather_across_devices``): fastcl's loss with the guide mask,
    row i's threshold the guide's positive cosine less the margin."""
    if len(guide_embeddings) != len(embeddings):
        raise ValueError("the model's and the guide's embeddings must have the same columns")
    function, gathered = info_nce, {}
    if loss.gather_across_devices:
        if dist.is_available() and dist.is_initialized():
            # As sentence-transformers: every rank's positives and negatives (and their
            # guide rows) are gathered, the anchors stay local (anchor-anchor scores this
            # rank's anchors only).
            function, gathered = gathered_info_nce, dict(gather_anchors=False)
        else:
            _warn_not_distributed()
    guide_anchors, guide_positives = guide_embeddings[0], guide_embeddings[1]
    with torch.no_grad():
        positive = torch.nn.functional.cosine_similarity(guide_anchors, guide_positives, dim=-1)
        margin = loss.margin if loss.margin_strategy == "absolute" else positive.abs() * loss.margin
        threshold = positive - margin
    directions = (("query_to_doc",) + (("query_to_query",) if loss.contrast_anchors else ())
                  + (("doc_to_doc",) if loss.contrast_positives else ()))
    options = dict(directions=directions, doc_to_doc_negatives=False) if len(directions) > 1 else {}
    # check_finite=False: as sentence-transformers, a non-finite embedding gives a NaN loss.
    return function(embeddings[0], embeddings[1], _negatives(list(embeddings[2:])), temperature=loss.temperature,
                    guide_anchors=guide_anchors, guide_candidates=torch.cat(list(guide_embeddings[1:])),
                    guide_threshold=threshold, check_finite=False, **options, **gathered)


class GISTEmbedLoss(_STGISTEmbedLoss):
    """sentence-transformers' ``GISTEmbedLoss`` (Solatorio 2024), computed by fastcl.

    The same arguments, columns ((anchor, positive) pairs or (anchor, positive, negative)
    triplets), loss and gradients as the sentence-transformers class (see its
    documentation), with no batch x batch matrix: row i scores anchor i against every
    positive and negative, against the other anchors (``contrast_anchors``) and
    positive i against the other positives (``contrast_positives``), in one softmax; an
    entry other than the positive pair is dropped when the guide model's cosine of its
    two texts exceeds the guide's cosine of pair i less the margin (``"absolute"``:
    ``g_i - margin``; ``"relative"``: ``g_i - |g_i| margin``). This is fastcl's guide
    mask (:func:`fastcl.info_nce`'s ``guide_anchors``, ``guide_candidates`` and
    ``guide_threshold``, with ``directions`` query_to_doc, query_to_query, doc_to_doc
    and ``doc_to_doc_negatives=False``), formed tile by tile in the kernels.

    One difference: sentence-transformers keeps each row's self similarity (anchor i
    with itself, positive i with itself) as a column that only the guide can drop, and
    the guide drops it unless it scores pair i as a duplicate (guide cosine 1, with
    margin 0 or below); fastcl never scores a row against itself. The two agree
    whenever the guide's positive cosine less the margin is below 1.

    When the guide's tokenizer differs from the model's (or its ``max_seq_length`` is
    shorter), the texts are decoded with the model's tokenizer and encoded with the
    guide's, as sentence-transformers does.

    With ``gather_across_devices=True`` under torch.distributed, as sentence-transformers:
    every rank's positives and negatives, with their guide rows, are gathered
    (:func:`fastcl.distributed.gathered_info_nce`), the anchors are not (the
    anchor-anchor term scores this rank's anchors only), and each rank returns the mean
    loss of its own anchors. With ``contrast_anchors=False`` the ranks' mean is the
    one-process loss over the whole batch.
    """

    def forward(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        guide_features = _guide_features(self, sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            guide_embeddings = embed_columns(self.guide, guide_features)
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        return gist_loss(self, embeddings, guide_embeddings)


class CachedGISTEmbedLoss(_STCachedGISTEmbedLoss):
    """sentence-transformers' ``CachedGISTEmbedLoss`` (GradCache), computed by fastcl.

    The gradient caching and the guide's embeddings are sentence-transformers' own (the
    mini-batches are embedded without gradients, the guide beside them); the loss stage
    is :func:`gist_loss` over the whole batch, as :class:`GISTEmbedLoss` computes it (its
    documentation states the one difference), so ``mini_batch_size`` and
    ``mini_batch_num_tokens`` bound the encoder's memory only. Any number of negative
    columns.
    """

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings of the model
        (``reps[column]``) and of the guide (``reps_guided[column]``). With
        ``with_backward`` the gradients of the embeddings are left in their ``.grad`` and
        the detached loss is returned."""
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        loss = gist_loss(self, [torch.cat(column) for column in reps], [torch.cat(column) for column in reps_guided])
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss
