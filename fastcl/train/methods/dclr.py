"""DCLR: Zhou, Zhang, Zhao, Wen, "Debiased Contrastive Learning of Unsupervised Sentence
Representations", ACL 2022.

SimCSE's two dropout views z_i, z'_i, and:

- noise-based negatives: M = noise_times x B vectors drawn from N(0, I), then moved by
  ``steps`` (4) normalized gradient-ascent steps of size 1e-3 on the (unweighted)
  InfoNCE of the anchors against [positives; noise], toward the points the
  representations crowd (non-uniform); constants of the loss afterwards;
- instance weighting: a complementary model (a frozen SimCSE-trained encoder, no
  dropout) embeds the batch's sentences; an in-batch negative j of anchor i whose
  complementary cosine exceeds phi (0.9) gets weight 0 (a likely false negative). The
  positive and the noise negatives always weigh 1::

      L = mean_i -log e^{s(z_i, z'_i)} / (sum_j a_ij e^{s(z_i, z'_j)} + sum_k e^{s(z_i, n_k)})
      a_ij = 0 if j != i and cos(g_i, g_j) > phi else 1

The weights need a second model's similarities per (row, column): that is the guide
mask of fastcl's loss (``info_nce(..., guide_anchors=, guide_candidates=,
guide_threshold=)``), which the kernels form tile by tile: :func:`dclr_loss` hands the
loss to them, with the noise as constant extra negatives (never masked by the guide).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...loss import info_nce
from ...saved_model import load_sentence_encoder
from ..resume import vocabulary_digest
from .common import Method, dropout_views, freeze, logged, view_inputs


def dclr_loss(anchors: torch.Tensor, positives: torch.Tensor, noise: torch.Tensor | None, guide_anchors: torch.Tensor,
              guide_candidates: torch.Tensor, threshold: float, temperature: float = 0.05,
              backend: str = "auto") -> torch.Tensor:
    """DCLR's weighted InfoNCE, mean over the N anchors.

    Columns: the N ``positives`` (in-batch; gradient) then the M ``noise`` negatives
    (constants). Row i's target is column i. Entry (i, j), j < N, j != i, is dropped
    from row i's softmax when ``cos(guide_anchors_i, guide_candidates_j) > threshold``;
    the target and the noise columns are never dropped; no gradient flows through the
    guides. Logits are cosines over ``temperature``. fastcl's guide mask computes it
    (no N x (N + M) buffer on the fused backends). Half-precision views are scored in
    float32 (the noise is drawn in float32 or wider); the result is float32 or wider.
    """
    wide = torch.promote_types(anchors.dtype, torch.float32)
    noise = noise.to(wide) if noise is not None else None
    return info_nce(anchors.to(wide), positives.to(wide), extra_negatives=noise, temperature=temperature,
                    guide_anchors=guide_anchors, guide_candidates=guide_candidates, guide_threshold=threshold,
                    backend=backend)


def dclr_loss_reference(anchors, positives, noise, guide_anchors, guide_candidates, threshold: float,
                        temperature: float = 0.05) -> torch.Tensor:
    """:func:`dclr_loss` densely (the N x (N + M) logits at once), for tests."""
    a, c = F.normalize(anchors, dim=-1), F.normalize(positives, dim=-1)
    n = a.shape[0]
    weights = (F.normalize(guide_anchors, dim=-1) @ F.normalize(guide_candidates, dim=-1).T <= threshold).to(a.dtype)
    weights.fill_diagonal_(1.0)
    exp_batch = torch.exp(a @ c.T / temperature) * weights
    denominator = exp_batch.sum(1)
    if noise is not None:
        denominator = denominator + torch.exp(a @ F.normalize(noise, dim=-1).T / temperature).sum(1)
    positive = torch.exp((a * c).sum(-1) / temperature)
    return -(positive / denominator).log().sum() / n


@torch.no_grad()
def dropped_per_row(guide: torch.Tensor, threshold: float, block_rows: int = 256) -> float:
    """Mean number of in-batch negatives per row that the guide drops (logged)."""
    g = F.normalize(guide.float(), dim=-1)
    n, dropped = g.shape[0], 0
    for start in range(0, n, block_rows):
        sim = g[start:start + block_rows] @ g.T
        rows = torch.arange(sim.shape[0], device=g.device)
        sim[rows, rows + start] = float("-inf")
        dropped += int((sim > threshold).sum())
    return dropped / n


def ascend_noise(anchors: torch.Tensor, positives: torch.Tensor, noise: torch.Tensor, steps: int, step_size: float,
                 temperature: float, backend: str = "auto") -> torch.Tensor:
    """DCLR's noise negatives after ``steps`` normalized gradient-ascent steps on the
    InfoNCE of ``anchors`` against ``[positives; noise]`` (the noise's gradient only;
    NaN entries become 0, as in the paper's code)."""
    anchors, positives = anchors.detach(), positives.detach()
    n, m = anchors.shape[0], noise.shape[0]
    # The noise must be gradient columns: give it dummy anchor rows (their losses unused).
    rows = torch.cat([anchors, anchors[torch.arange(m, device=anchors.device) % n]])
    for _ in range(steps):
        noise = noise.detach().requires_grad_()
        per_row = info_nce(rows, torch.cat([positives, noise]), temperature=temperature, reduction="none",
                           backend=backend)
        (grad,) = torch.autograd.grad(per_row[:n].mean(), noise)
        noise = noise + step_size * grad / grad.norm(dim=-1, keepdim=True)
        noise = torch.where(torch.isnan(noise), torch.zeros_like(noise), noise)
    return noise.detach()


class DCLR(Method):
    SUMMARY = ("DCLR (phi {c.dclr_threshold}, {c.dclr_noise_times:g}x noise negatives, {c.dclr_noise_steps} steps of "
               "{c.dclr_noise_step_size:g}, complementary model {c.dclr_model})")

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        path = self.cfg.dclr_model
        complementary, tokenizer, _ = load_sentence_encoder(path)
        if vocabulary_digest(tokenizer) != vocabulary_digest(self.tokenizer):
            raise ValueError(f"--dclr-model {path}: its tokenizer differs from that of the model being trained; the "
                             "complementary model must read the same token ids")
        self.complementary = freeze(self.on_backbone(complementary))

    def compute_gradients(self, model, batch, *, autocast, scaler, device) -> dict[str, float]:
        cfg = self.cfg
        n = batch["input_ids"].shape[0]
        z1, z2 = dropout_views(model, batch, autocast, device)
        with autocast(), torch.no_grad():
            guide, _, _ = self.complementary(**view_inputs(batch, 0, device))
        wide = torch.promote_types(z1.dtype, torch.float32)
        m = max(1, int(n * cfg.dclr_noise_times))
        noise = torch.randn(m, z1.shape[-1], generator=self.generator, dtype=torch.float32,
                            device=self.generator.device if self.generator is not None else None).to(device, wide)
        noise = ascend_noise(z1.to(wide), z2.to(wide), noise, cfg.dclr_noise_steps, cfg.dclr_noise_step_size,
                             cfg.temperature, self.backend)
        guide = guide.to(wide)
        loss = dclr_loss(z1, z2, noise, guide, guide, cfg.dclr_threshold, cfg.temperature, self.backend)
        self.backward(loss, scaler)
        return logged(loss=loss, dropped_negatives=dropped_per_row(guide, cfg.dclr_threshold, cfg.dclr_block_rows))
