"""VaSCL: Zhang, Xiao, Zhu, Ma, Arnold, "Virtual Augmentation Supported Contrastive
Learning of Sentence Representations", Findings of ACL 2022.

Each sentence is encoded twice (dropout views, mean pooling): e_i, e'_i. A contrast head
g (Linear H x H, ReLU, Linear H x 128, no biases; trained at 100x the learning rate,
dropped at the end) gives unit vectors z = g(e) / ||g(e)||; tau = 0.05.

1. Instance discrimination: NT-Xent over {z_i} and {z'_i} (the released code's
   "paircon" term; SimCSE's loss with both views as anchors).
2. Neighbourhood N(i): the K = 16 other instances of the batch with the largest inner
   product e_i . e_j, found block by block (rows against all columns, only the top K
   kept: O(B K) memory).
3. Virtual augmentation: the perturbation delta_i, ||delta_i|| = radius (15), that most
   increases the neighbourhood-constrained instance loss
   ``l_i(u) = -log e^{s(u, z_i)} / (e^{s(u, z_i)} + sum_{j in N(i)} e^{s(u, z_j)})``,
   ``u = g(e_i + delta) / ||.||``, in the paper's one-step approximation: delta_i =
   radius * grad / ||grad||, the gradient taken at radius * d for a random unit d.
4. The instance and its virtual augmentation, z_i and z^_i = g(e_i + delta_i), contrasted
   within the neighbourhood in both directions: each is the other's positive, the
   negatives are {z_j, z^_j : j in N(i)}.

Loss = (1) + (4). As in the released code, e_i enters (3) and (4) detached, so (4)
trains the contrast head (shared with (1)) and not the encoder;
``--vascl-encoder-gradient`` lets it reach the encoder too.

(3) and (4) are :func:`fastcl.info_nce` with ``groups``: each anchor's row repeated once
per candidate of its neighbourhood, all in the anchor's group, so each row's softmax runs
over exactly its positive and its neighbours; the first row of each group is its loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...loss import info_nce
from ...nt_xent import nt_xent
from .common import Method, dropout_views, logged


class ContrastHead(nn.Sequential):
    """VaSCL's contrast head: Linear(H, H), ReLU, Linear(H, F), no biases."""

    def __init__(self, hidden: int, features: int) -> None:
        super().__init__(nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, features, bias=False))


def nearest_neighbours(x: torch.Tensor, k: int, block_rows: int = 1024) -> torch.Tensor:
    """(B, k) indices of each row's k largest inner products with the other rows,
    computed ``block_rows`` rows at a time against all rows (memory block x B, and B x k
    kept), never B x B at once."""
    n = x.shape[0]
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < batch rows, got k={k} for {n} rows")
    x = x.detach()
    out = []
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        scores = x[start:stop] @ x.T
        rows = torch.arange(stop - start, device=x.device)
        scores[rows, rows + start] = float("-inf")  # not its own neighbour
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


def neighbourhood_info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                           temperature: float, backend: str = "auto") -> torch.Tensor:
    """``mean_i -log e^{s(a_i, p_i)} / (e^{s(a_i, p_i)} + sum_k e^{s(a_i, n_ik)})`` for (B, D)
    anchors and positives and (B, K, D) per-anchor negatives (cosines over temperature),
    by :func:`fastcl.info_nce` with one group per anchor."""
    b, k, d = negatives.shape
    width = k + 1
    candidates = torch.cat([positives[:, None], negatives], 1).reshape(b * width, d)
    rows = anchors[:, None].expand(b, width, d).reshape(b * width, d)
    groups = torch.arange(b, device=anchors.device).repeat_interleave(width)
    per_row = info_nce(rows, candidates, temperature=temperature, groups=groups, reduction="none", backend=backend)
    return per_row.view(b, width)[:, 0].mean()


def unit(head: nn.Module, e: torch.Tensor) -> torch.Tensor:
    return F.normalize(head(e), dim=-1)


def _unit_rows(d: torch.Tensor) -> torch.Tensor:
    return d / (d.norm(dim=-1, keepdim=True) + 1e-8)


def virtual_direction(head: nn.Module, e: torch.Tensor, neighbours: torch.Tensor, radius: float, temperature: float,
                      generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """The unit direction of VaSCL's virtual augmentation (one gradient step from a random
    unit direction, scaled by ``radius``), a constant (B, H)."""
    e = e.detach()
    start = torch.rand(e.shape, generator=generator, device=generator.device if generator is not None else None)
    d = _unit_rows(start.to(e.device, e.dtype) - 0.5).requires_grad_()
    with torch.no_grad():
        z = unit(head, e)
    u = unit(head, e + radius * d)
    loss = neighbourhood_info_nce(u, z, z[neighbours], temperature, backend)
    (grad,) = torch.autograd.grad(loss, d)
    return _unit_rows(grad).detach()


def vascl_virtual_loss(head: nn.Module, e: torch.Tensor, neighbours: torch.Tensor, direction: torch.Tensor,
                       radius: float, temperature: float, encoder_gradient: bool = False,
                       backend: str = "auto") -> torch.Tensor:
    """(4): z_i and its virtual augmentation contrasted within the neighbourhood, both
    directions, mean over the 2B rows."""
    if encoder_gradient:
        z = unit(head, e)
    else:
        e = e.detach()
        with torch.no_grad():
            z = unit(head, e)
    z_hat = unit(head, e + radius * direction)
    negatives = torch.cat([z[neighbours], z_hat[neighbours]], 1)
    return (neighbourhood_info_nce(z, z_hat, negatives, temperature, backend)
            + neighbourhood_info_nce(z_hat, z, negatives, temperature, backend)) / 2


class VaSCL(Method):
    SUMMARY = ("VaSCL (K {c.vascl_neighbours}, radius {c.vascl_radius}, tau {c.temperature}, head "
               "{c.vascl_feature_dim} at {c.vascl_head_lr_scale:g}x lr)")

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        hidden = self.encoder.backbone.config.hidden_size
        self.encoder.method_head = self.on_backbone(ContrastHead(hidden, self.cfg.vascl_feature_dim))
        self.encoder.head_lr_scale = self.cfg.vascl_head_lr_scale

    def compute_gradients(self, model, batch, *, autocast, scaler, device) -> dict[str, float]:
        cfg = self.cfg
        head = self.encoder.method_head
        e1, e2 = dropout_views(model, batch, autocast, device)
        wide = torch.promote_types(e1.dtype, torch.float32)
        e1, e2 = e1.to(wide), e2.to(wide)
        pair = nt_xent(head(e1), head(e2), temperature=cfg.temperature, backend=self.backend)
        neighbours = nearest_neighbours(e1, cfg.vascl_neighbours)
        direction = virtual_direction(head, e1, neighbours, cfg.vascl_radius, cfg.temperature, self.generator,
                                      self.backend)
        virtual = vascl_virtual_loss(head, e1, neighbours, direction, cfg.vascl_radius, cfg.temperature,
                                     cfg.vascl_encoder_gradient, self.backend)
        self.backward(pair + virtual, scaler)
        return logged(loss=pair, virtual_loss=virtual)
