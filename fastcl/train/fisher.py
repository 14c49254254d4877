"""Child-Tuning-D's gradient mask, estimated by the training step itself."""

from __future__ import annotations

import sys
import time

import torch

from ..optim import add_squared_gradients, top_fraction_mask
from .step import compute_gradients


def child_tuning_masks(trainer) -> dict[torch.Tensor, torch.Tensor]:
    """Child-Tuning-D's fixed gradient mask, from the Fisher information of the training
    loss on the first ``--child-tuning-fisher-batches`` batches of the first epoch.

    Each batch's gradient is computed by the training step itself (same loss, MLM,
    gradient caching, MoCo keys, and under DDP the global-batch gradient, so every
    rank gets the same mask); as in the paper's code, each scored parameter's gradient
    is clipped to ``--max-grad-norm`` and squared, the squares are averaged over the
    batches, and the top p fraction of all scored entries (one global ranking,
    :func:`fastcl.optim.top_fraction_mask`) is kept. Scored: the parameters whose
    name contains "layer" (the transformer layers, the paper's choice; embeddings and
    heads train fully), or every trainable parameter if no name does. Uses its own
    generators for MLM masking and Gaussian negatives, so training draws what it would
    have drawn; dropout draws from the global generator, which checkpoints save.
    """
    cfg = trainer.cfg
    named = [(n, p) for n, p in trainer.encoder.named_parameters() if p.requires_grad]
    scored = [(n, p) for n, p in named if "layer" in n] or named
    n_batches = min(cfg.child_tuning_fisher_batches, trainer.plan.steps_per_epoch)
    fisher = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
              for n, p in scored}
    gauss = torch.Generator(device=trainer.device).manual_seed(cfg.seed + 3)
    mlm = torch.Generator().manual_seed(cfg.seed + 4 + trainer.rank)
    trainer.log(f"Child-Tuning-D: Fisher information of the training loss over {n_batches} batches of "
                f"{cfg.batch_size} ({sum(p.numel() for _, p in scored):,} entries of {len(scored)} parameters "
                f"scored, keeping {cfg.child_tuning_p:g} of them)")
    bar = None
    if trainer.main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_batches, unit="batch", desc="Fisher information", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    trainer.model.train()
    try:
        for index in range(n_batches):
            batch, _ = trainer._batch(0, index, mlm_gen=mlm)
            for _, p in named:
                p.grad = None
            compute_gradients(trainer.model, batch, trainer.loss_cfg, chunk_size=cfg.chunk_size,
                              generator=gauss if cfg.gaussian_negatives else None, autocast=trainer._autocast,
                              device=trainer.device, moco=trainer.moco)
            # The step leaves its gradients in .grad (gradient caching, DDP's all-reduce).
            add_squared_gradients(fisher, ((name, p.grad) for name, p in scored),
                                  cfg.max_grad_norm if cfg.max_grad_norm > 0 else None)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for _, p in named:
            p.grad = None
        if trainer.moco is not None:
            trainer.moco.pending = None  # estimation keys never enter the queue
    masks = top_fraction_mask({n: f / n_batches for n, f in fisher.items()}, cfg.child_tuning_p)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    trainer.log(f"Child-Tuning-D: mask of {kept:,} / {total:,} entries ({kept / total:.3f}) in "
                f"{time.perf_counter() - t0:.1f} s")
    by_name = dict(named)
    return {by_name[n]: m for n, m in masks.items()}
