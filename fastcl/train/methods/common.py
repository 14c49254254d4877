"""Pieces the methods share: frozen copies, one view of a batch as model inputs, the
logged values."""

from __future__ import annotations

import copy

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """``module``, made never to train: no gradients, evaluation mode (no dropout), so it
    gives every sentence the same vectors at every step (and after ``--resume``)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that never trains (:func:`freeze`)."""
    return freeze(copy.deepcopy(module))


def view_inputs(batch: dict[str, torch.Tensor], view: int | None, device) -> dict[str, torch.Tensor]:
    """Model inputs of one view of a (B, V, L) batch (``view`` None: every view, row-major),
    trimmed to the longest sentence (less padding, same result)."""
    width = max(int(batch["attention_mask"].sum(-1).max()), 1)
    out = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in batch:
            x = batch[key][..., :width]
            x = x[:, view] if view is not None else x.reshape(-1, width)
            out[key] = x.to(device, non_blocking=True)
    return out


def dropout_views(model, batch: dict[str, torch.Tensor], autocast, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's sentence vectors of a batch's two dropout views, ``(z1, z2)`` (B x H
    each): both views in one forward (row-major), under ``autocast``."""
    n = batch["input_ids"].shape[0]
    with autocast():
        emb, _, _ = model(**view_inputs(batch, None, device))
    emb = emb.view(n, 2, -1)
    return emb[:, 0], emb[:, 1]


def backbone_outputs(backbone: nn.Module, inputs: dict[str, torch.Tensor], hidden_states: bool = False):
    return backbone(**inputs, return_dict=True, output_hidden_states=hidden_states)


def logged(**values) -> dict[str, float]:
    return {k: float(v.detach().double()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}


class Method:
    """What every method has: the trainer's encoder, device and settings; ``generator``
    (set by the trainer: its checkpointed Gaussian generator) for random draws."""

    def __init__(self, trainer) -> None:
        self.cfg = trainer.cfg
        self.encoder = trainer.encoder
        self.device = trainer.device
        self.tokenizer = trainer.tokenizer
        self.backend = trainer.cfg.loss_backend
        self.generator: torch.Generator | None = None

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return batch

    #: How the training log names the method and its options: a format string over the
    #: run's config ``c``, e.g. ``"TaCL (tau {c.tacl_temperature})"``.
    SUMMARY = ""

    def describe(self) -> str:
        return self.SUMMARY.format(c=self.cfg)

    def on_backbone(self, module: nn.Module) -> nn.Module:
        """``module`` (a head the method trains, a model it consults) on the trained
        backbone's device and in its dtype."""
        first = next(self.encoder.backbone.parameters())
        return module.to(first.device, first.dtype)

    @staticmethod
    def backward(total: torch.Tensor, scaler) -> None:
        (scaler.scale(total) if scaler is not None else total).backward()
