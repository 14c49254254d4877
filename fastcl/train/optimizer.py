"""The optimizer and the learning-rate schedule of a run: AdamW (or Child-Tuning's AdamW),
weight decay for weights only, linear warm-up then linear decay to zero."""

from __future__ import annotations

import torch

from .config import TrainConfig


def parameter_groups(encoder) -> list[tuple[list[str], list[torch.nn.Parameter], bool]]:
    """The optimizer's two groups of trainable parameters, ``(names, params, decay)``:
    weight decay for weights, none for biases and norms. Their concatenation is the
    order in which optimizer state dicts number the parameters."""
    decay, no_decay = ([], []), ([], [])
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if name.endswith("bias") or "LayerNorm" in name or "norm" in name.lower() else decay
        group[0].append(name)
        group[1].append(p)
    return [(decay[0], decay[1], True), (no_decay[0], no_decay[1], False)]


def build_optimizer(encoder, cfg: TrainConfig, total_steps: int):
    """(optimizer, scheduler, warm-up steps) for ``encoder``'s trainable parameters."""
    # A method's own head (``encoder.method_head``, registered last, so splitting keeps
    # the parameter order) may train at a multiple of the learning rate (VaSCL's).
    scale = float(getattr(encoder, "head_lr_scale", 1.0))
    groups = []
    for names, params, decay in parameter_groups(encoder):
        wd = cfg.weight_decay if decay else 0.0
        head = [p for n, p in zip(names, params) if n.startswith("method_head.")]
        if scale == 1.0 or not head:
            groups.append({"params": params, "weight_decay": wd})
            continue
        body = [p for n, p in zip(names, params) if not n.startswith("method_head.")]
        if body:
            groups.append({"params": body, "weight_decay": wd})
        groups.append({"params": head, "weight_decay": wd, "lr": cfg.learning_rate * scale})
    if cfg.child_tuning:
        from ..optim import ChildTuningAdamW

        # The same seed on every rank: the task-free masks must agree across DDP ranks.
        # Task-driven masks are set after the Fisher estimate (or loaded on --resume).
        optimizer = ChildTuningAdamW(
            groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
            mode=cfg.child_tuning, reserve_p=cfg.child_tuning_p, masks={} if cfg.child_tuning == "d" else None,
            seed=cfg.seed)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first step trains at lr / warmup, not 0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), warmup
