"""Token-level InfoNCE within each sequence (TaCL-style), on padded batches.

For anchor and positive token representations of shape (batch, length, D) and the
attention mask (batch, length), each real token's negatives are the other real tokens
of its own sequence; padding tokens are removed before the loss (they cost nothing).
This is :func:`fastcl.info_nce` with ``groups`` = the sequence index of each token, and
the tokens kept in sequence order, so the kernels skip every tile that spans no common
sequence.
"""

from __future__ import annotations

import torch

from .loss import info_nce


def token_info_nce(
    anchor_tokens: torch.Tensor,
    positive_tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """InfoNCE over the real tokens of each sequence, negatives within the sequence.

    Args:
        anchor_tokens, positive_tokens: (batch, length, D); token t of sequence b in the
            second is the positive of the same token in the first (e.g. a teacher's and a
            student's representations, as in TaCL).
        attention_mask: (batch, length), nonzero for real tokens; None keeps every token.
        **options: any keyword of :func:`fastcl.info_nce` except ``labels`` and
            ``groups`` (temperature, reduction, extra / Gaussian negatives, symmetric, ...).

    Returns:
        The loss reduced over real tokens, or with ``reduction="none"`` the per-token
        losses of the real tokens in (batch, position) order.
    """
    if anchor_tokens.dim() != 3 or positive_tokens.shape != anchor_tokens.shape:
        raise ValueError("anchor_tokens and positive_tokens must both be (batch, length, D), got "
                         f"{tuple(anchor_tokens.shape)} and {tuple(positive_tokens.shape)}")
    for forbidden in ("labels", "groups"):
        if forbidden in options:
            raise ValueError(f"token_info_nce sets {forbidden} itself")
    batch, length, _ = anchor_tokens.shape
    if attention_mask is None:
        keep = torch.ones(batch, length, dtype=torch.bool, device=anchor_tokens.device)
    else:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be (batch, length) = {(batch, length)}, "
                             f"got {tuple(attention_mask.shape)}")
        keep = attention_mask.to(device=anchor_tokens.device) != 0
    if not bool(keep.any()):
        raise ValueError("attention_mask keeps no token: empty batch")
    sequence = torch.arange(batch, device=anchor_tokens.device)[:, None].expand(batch, length)
    return info_nce(anchor_tokens[keep], positive_tokens[keep], groups=sequence[keep], **options)
