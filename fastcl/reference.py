"""Dense PyTorch implementation of the InfoNCE contract (docs/design.md section 1).

This is the oracle every fused backend is tested against, and the path fastcl takes
for tiny batches, where one small matrix product is cheaper than any kernel launch
sequence. It is written for clarity, not memory: it materializes the full N x M logit
matrix, so do not call it on large batches.

Every argument means exactly what it means in :func:`fastcl.info_nce`, except that
Gaussian negatives are passed as the already drawn G x D matrix ``gaussian_negatives``
(so a test can hand the same draw to two implementations).

float16 and bfloat16 inputs are computed in float32 (norms, cosines, the log-sum-exp
and their gradients, which autograd casts back to the input dtype), as every fused
backend does: a half-precision norm overflows above 65504 (fp16), and half-precision
logits and softmax lose what the fused kernels keep. The result is float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor | None) -> torch.Tensor | None:
    """Half-precision rows in float32 (differentiable: the gradient comes back in the
    input dtype); other dtypes unchanged."""
    return x.float() if x is not None and x.dtype in _HALF else x


def info_nce_reference(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    gaussian_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    hard_negative_weight: float = 1.0,
    gaussian_weight: float = 1.0,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with in-batch, hard, extra and Gaussian negatives, computed densely.

    ``logit[i, j] = cos(a_i, c_j) / temperature + w[i, j]`` over the candidates
    ``c = [positives; hard_negatives; extra_negatives; gaussian_negatives]``, with
    ``w = log(hard_negative_weight)`` at column ``N + i`` of row ``i`` and
    ``log(gaussian_weight)`` on every Gaussian column; ``loss_i`` is the cross-entropy of
    row ``i`` against column ``labels[i]`` (``i`` by default). With ``symmetric`` the
    column direction over the in-batch block (each positive scored against all anchors)
    is averaged in, as CLIP does. Extra and Gaussian negatives receive no gradient. With
    ``groups`` (one id per anchor, shared by its positive and hard negative), a row's
    positives and hard negatives are only those of its own group; extra and Gaussian
    negatives stay visible to every group.
    """
    n = anchors.shape[0]
    anchors, positives, hard_negatives, extra_negatives, gaussian_negatives = map(
        _upcast, (anchors, positives, hard_negatives, extra_negatives, gaussian_negatives))
    if normalize:
        unit = lambda x: F.normalize(x, dim=-1, eps=eps)  # noqa: E731
    else:
        unit = lambda x: x  # noqa: E731

    a = unit(anchors)
    blocks = [unit(positives)]
    if hard_negatives is not None:
        blocks.append(unit(hard_negatives))
    if extra_negatives is not None:
        blocks.append(unit(extra_negatives.detach()))
    if gaussian_negatives is not None:
        blocks.append(unit(gaussian_negatives.detach()))
    candidates = torch.cat(blocks, dim=0)

    logits = a @ candidates.T / temperature
    weights = torch.zeros_like(logits)
    if hard_negatives is not None and hard_negative_weight != 1.0:
        rows = torch.arange(n, device=logits.device)
        weights[rows, n + rows] = math.log(hard_negative_weight)
    if gaussian_negatives is not None and gaussian_weight != 1.0:
        weights[:, candidates.shape[0] - gaussian_negatives.shape[0]:] = math.log(gaussian_weight)
    logits = logits + weights
    if groups is not None:
        candidate_groups = groups if hard_negatives is None else torch.cat([groups, groups])
        other_group = groups[:, None] != candidate_groups[None, :]
        masked = torch.zeros_like(logits, dtype=torch.bool)
        masked[:, : candidate_groups.shape[0]] = other_group
        logits = logits.masked_fill(masked, float("-inf"))

    # int64: gather takes no other index dtype (int8 / uint8 labels are valid input).
    targets = labels.to(torch.int64) if labels is not None else torch.arange(n, device=logits.device)
    row_loss = torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None])[:, 0]

    if symmetric:
        in_batch = logits[:, :n]  # no weights live in the in-batch block
        col_loss = torch.logsumexp(in_batch, dim=0) - in_batch.diagonal()
        per_row = (row_loss + col_loss) / 2
    else:
        per_row = row_loss

    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def nt_xent_reference(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.1,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
) -> torch.Tensor:
    """NT-Xent (SimCLR), densely: all 2N rows of ``[z1; z2]`` are anchors, each scored
    against the other 2N - 1 rows (itself excluded); the target of row i is its other
    view, ``(i + N) mod 2N``. ``"mean"`` averages over the 2N rows."""
    n = z1.shape[0]
    z = torch.cat([_upcast(z1), _upcast(z2)])
    if normalize:
        z = F.normalize(z, dim=-1, eps=eps)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets, reduction=reduction)
