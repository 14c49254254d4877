"""SG-BERT: Kim, Yoo and Lee, "Self-Guided Contrastive Learning for BERT Sentence
Representations", ACL 2021.

Two copies of the start model: BERT_F, frozen, and BERT_T, trained. For each sentence
s_i of the batch, BERT_F's hidden layers k = 0 .. L (the embedding output and every
transformer layer) are pooled over the real tokens (max pooling by default) into
h_{i,k}; BERT_T's [CLS] vector is c_i. A projection head f (Linear, GELU, Linear, GELU,
4096 wide; trained, dropped at the end) maps both, and similarities are cosines over
a temperature tau (0.01):

- SG-OPT (``--sgbert-objective opt``, the paper's redesigned NT-Xent, the default of its
  code): only c_i is an anchor; each layer of its own sentence is a positive, one term
  each, against every layer of the other sentences::

      L = -1 / (B (L+1)) sum_i sum_k log e^{s(c_i, h_ik)} / (e^{s(c_i, h_ik)} + sum_{m != i} sum_n e^{s(c_i, h_mn)})

- SG (``--sgbert-objective sg``): one layer drawn uniformly per sentence (the paper's
  sampler), h_i, and NT-Xent over the 2B vectors {c_i} and {h_i}.

Both add ``lambda ||theta_T - theta_F||^2`` over the encoder's parameters (lambda 0.1).
The embedding layer of BERT_T stays frozen, as in the paper's code
(``--sgbert-train-embeddings`` trains it). BERT_F runs without dropout.

The sum over other sentences' layers is one fused log-sum-exp per layer, each row
excluding its own sentence's column (the self mask NT-Xent uses): B x B logits per
layer, never materialized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...nt_xent import nt_xent
from ...ops.function import InfoNCEFunction
from ...ops.layout import ColumnLayout
from ...plan import LossOptions, inverse_temperature, kernel_plan
from .common import Method, backbone_outputs, frozen_copy, logged, view_inputs


class ProjectionHead(nn.Sequential):
    """SG-BERT's projection head: Linear(H, W), GELU, Linear(W, W), GELU; weights drawn
    from N(0, initializer_range), biases zero (as BERT's layers)."""

    def __init__(self, hidden: int, width: int, std: float = 0.02) -> None:
        super().__init__(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        for layer in (self[0], self[2]):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            nn.init.zeros_(layer.bias)


def pool_layers(hidden_states, attention_mask: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """(B, K, H): each of the K hidden layers pooled over the real tokens."""
    layers = torch.stack(tuple(hidden_states), dim=1)  # (B, K, T, H)
    keep = attention_mask.bool()[:, None, :, None]
    if mode == "max":
        return layers.masked_fill(~keep, torch.finfo(layers.dtype).min).amax(dim=2)
    weights = keep.to(layers.dtype)
    return (layers * weights).sum(2) / weights.sum(2).clamp(min=1)


def others_logsumexp(anchors: torch.Tensor, columns: torch.Tensor, temperature: float, backend: str = "auto",
                     eps: float = 1e-12) -> torch.Tensor:
    """``logsumexp_{j != i} cos(anchors_i, columns_j) / temperature`` for each row i (N >= 2),
    differentiable in both inputs, with fastcl's fused kernels: each row masks its own
    column, as NT-Xent masks itself, and no N x N matrix exists (tiny inputs take the
    dense path, as :func:`fastcl.info_nce` does)."""
    n = anchors.shape[0]
    if n < 2 or columns.shape[0] != n:
        raise ValueError(f"others_logsumexp needs N >= 2 anchors and as many columns, got {n} and {columns.shape[0]}")
    options = LossOptions(temperature=temperature, reduction="none", eps=eps, backend=backend).checked()
    layout = ColumnLayout(n_cols=n, n_grad_cols=n, gauss_start=n, self_start=0, n_self=n)
    plan = kernel_plan(options, layout, anchors, n * n)
    if plan is None:  # the dense path
        wide = torch.promote_types(anchors.dtype, torch.float32)
        logits = F.normalize(anchors.to(wide), dim=-1, eps=eps) @ F.normalize(columns.to(wide), dim=-1, eps=eps).T
        own = torch.eye(n, dtype=torch.bool, device=anchors.device)
        return (logits / temperature).masked_fill(own, float("-inf")).logsumexp(1)
    targets = (torch.arange(n, device=anchors.device) + 1) % n  # any column but the masked own one
    # Normalization is fused into the kernels (plan.normalize_eps).
    per_row = InfoNCEFunction.apply(anchors.contiguous(), columns.contiguous(), None,
                                    inverse_temperature(temperature, anchors), targets, None, plan)
    # per_row = lse_i - logit[i, target_i]: add the target's logit back.
    target = (F.normalize(anchors.to(per_row.dtype), dim=-1, eps=eps)
              * F.normalize(columns[targets].to(per_row.dtype), dim=-1, eps=eps)).sum(-1) / temperature
    return per_row + target


def sg_opt_loss(cls: torch.Tensor, layers: torch.Tensor, temperature: float, backend: str = "auto") -> torch.Tensor:
    """SG-OPT's loss of (B, D) anchors and (B, K, D) per-layer views (see the module)."""
    b, k, _ = layers.shape
    log_others = torch.stack([others_logsumexp(cls, layers[:, n], temperature, backend) for n in range(k)], 1)
    log_others = log_others.logsumexp(1)  # over the other sentences' layers of every layer
    wide = log_others.dtype
    positive = (F.normalize(cls.to(wide), dim=-1)[:, None] * F.normalize(layers.to(wide), dim=-1)).sum(-1)
    # -log e^p / (e^p + S) = log(1 + e^{log S - p}) (logaddexp: F.softplus turns linear past 20)
    x = log_others[:, None] - positive / temperature
    return torch.logaddexp(torch.zeros_like(x), x).mean()


def sg_loss(cls: torch.Tensor, sampled: torch.Tensor, temperature: float, backend: str = "auto") -> torch.Tensor:
    """SG's loss: NT-Xent over the 2B vectors {c_i} and {h_i}."""
    return nt_xent(cls, sampled, temperature=temperature, backend=backend)


def distance_to(trained: nn.Module, frozen: nn.Module) -> torch.Tensor:
    """``sum ||theta - theta_frozen||^2`` over the trainable parameters of ``trained``."""
    fixed = dict(frozen.named_parameters())
    terms = [(p - fixed[n]).pow(2).sum() for n, p in trained.named_parameters() if p.requires_grad]
    return torch.stack(terms).sum()


class SGBERT(Method):
    SUMMARY = ("SG-BERT ({c.sgbert_objective} objective, tau {c.sgbert_temperature}, lambda {c.sgbert_lambda}, "
               "{c.sgbert_pooling} pooling, head {c.sgbert_projection_dim})")

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        backbone = self.encoder.backbone
        self.frozen = frozen_copy(backbone)
        if not self.cfg.sgbert_train_embeddings:
            embeddings = getattr(backbone, "embeddings", None)
            if isinstance(embeddings, nn.Module):
                for p in embeddings.parameters():
                    p.requires_grad_(False)
        config = backbone.config
        self.encoder.method_head = self.on_backbone(ProjectionHead(
            config.hidden_size, self.cfg.sgbert_projection_dim, getattr(config, "initializer_range", 0.02)))

    def compute_gradients(self, model, batch, *, autocast, scaler, device) -> dict[str, float]:
        cfg = self.cfg
        inputs = view_inputs(batch, 0, device)
        with autocast():
            cls, _, _ = model(**inputs)  # BERT_T's [CLS] (the pooler), dropout on
            with torch.no_grad():
                hidden = backbone_outputs(self.frozen, inputs, hidden_states=True).hidden_states
            layers = pool_layers(hidden, inputs["attention_mask"], cfg.sgbert_pooling)
            head = self.encoder.method_head
            c = head(cls)
            if cfg.sgbert_objective == "opt":
                h = head(layers)
            else:
                pick = torch.randint(layers.shape[1], (layers.shape[0],), generator=self.generator,
                                     device=self.generator.device if self.generator is not None else None)
                h = head(layers[torch.arange(layers.shape[0], device=layers.device), pick.to(layers.device)])
        if cfg.sgbert_objective == "opt":
            loss = sg_opt_loss(c, h, cfg.sgbert_temperature, self.backend)
        else:
            loss = sg_loss(c, h, cfg.sgbert_temperature, self.backend)
        regularizer = distance_to(self.encoder.backbone, self.frozen)
        self.backward(loss + cfg.sgbert_lambda * regularizer, scaler)
        return logged(loss=loss, regularizer=regularizer)
