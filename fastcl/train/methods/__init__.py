"""Training methods beyond SimCSE, selected by ``--method``: each a module with its loss
(fastcl's fused losses underneath: no batch x batch similarity matrix) and any frozen
model it needs.

A method object built by :func:`build_method` offers ``prepare(batch, generator)``
(extra inputs made when a batch is tokenized) and ``compute_gradients(model, batch, *,
autocast, scaler, device)`` (accumulate the gradients of its loss, return the logged
values), which the trainer's step calls in place of SimCSE's. A trainable head it needs
is registered on the encoder as ``method_head`` (so the optimizer, the checkpoint and
``--resume`` hold it) and is not part of the saved model; frozen copies of the start
model are rebuilt from ``--model`` and not checkpointed.
"""

from __future__ import annotations

from .options import LABELS, METHODS, auto_pooler, check_method

__all__ = ["LABELS", "METHODS", "auto_pooler", "build_method", "check_method"]


def build_method(trainer):
    """The method object of ``trainer.cfg.method`` (None for SimCSE), after checking what
    needs the data and the process group."""
    cfg = trainer.cfg
    if cfg.method == "simcse":
        return None
    label = LABELS[cfg.method]
    if trainer.distributed:
        raise ValueError(f"--method {cfg.method} runs in one process ({label}'s frozen models and in-batch "
                         "neighbourhoods are not distributed); launch it without torchrun")
    if trainer.data.kind != "unsupervised":
        raise ValueError(f"--method {cfg.method} trains on unlabeled sentences (one per line); {cfg.train_file} "
                         f"holds {trainer.data.kind}")
    if cfg.method == "sgbert":
        from .sgbert import SGBERT as cls
    elif cfg.method == "tacl":
        from .tacl import TaCL as cls
    elif cfg.method == "vascl":
        from .vascl import VaSCL as cls
    else:
        from .dclr import DCLR as cls
    return cls(trainer)
