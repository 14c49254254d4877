"""One training step's gradients: plain, or gradient-cached for batches beyond memory.

Gradient caching (Gao et al. 2021, "Scaling deep contrastive learning batch size under
memory limited setup"):

1. encode the batch chunk by chunk without a graph, saving the RNG state before each
   chunk (CPU and CUDA generators);
2. take the contrastive loss of the whole batch with fastcl and its gradient with respect
   to the embeddings (O(batch x dim) memory: the loss never forms the similarity matrix);
3. re-encode each chunk with a graph from its saved RNG state, so dropout draws the same
   masks, and back-propagate the cached embedding gradients (``sum(e * g)``).

For SimCSE, dropout *is* the augmentation, so step 3 must reproduce the masks of step 1
or the cached gradients belong to a different function (DESIGN.md section 5); each
re-encoded chunk is compared with its cached embeddings and a mismatch is an error.

Under DistributedDataParallel every rank holds its share of the global batch, the loss
gathers every rank's positives and hard negatives with their gradients
(:func:`fastcl.distributed.gathered_info_nce`), or passes them around the ring of ranks
(:func:`fastcl.distributed.ring_info_nce`, ``LossConfig.distributed = "ring"``: same
loss and gradients, per-rank memory independent of the number of ranks), and only the
last chunk's backward synchronizes gradients (``no_sync`` for the others).

MoCo (:class:`MoCo`): the trained (query) encoder encodes only the anchors, view 0; a
momentum copy of it encodes the other views (positives, hard negatives) without a graph,
and the queue of earlier batches' positive keys adds negatives. See :class:`MoCo`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..loss import info_nce
from ..moco import KeyQueue, MomentumEncoder

#: Largest tolerated ||recomputed - cached|| / ||cached|| of a chunk's embeddings. Equal
#: masks give rounding differences only (0 on CPU); different dropout masks give O(0.1).
REPLAY_TOLERANCE = 1e-2


@dataclass
class LossConfig:
    temperature: float = 0.05
    hard_negative_weight: float = 1.0
    gaussian_negatives: int = 0
    gaussian_weight: float = 1.0
    mlm_weight: float = 0.1
    backend: str = "auto"
    distributed: str = "gather"  # the loss under DDP: "gather" (all-gather) or "ring" (point-to-point)


DISTRIBUTED_LOSSES = ("gather", "ring")


class RNGState:
    """The CPU generator's state and, if CUDA is initialized, every CUDA device's."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def contrastive_loss(emb: torch.Tensor, cfg: LossConfig, generator: torch.Generator | None,
                     distributed: bool, extra_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of (B, V, D) embeddings: view 0 anchors, view 1 positives, view 2 hard negatives;
    ``extra_negatives`` (a MoCo queue) add negatives without gradient.

    In a process group, the loss is scaled for DDP's gradient averaging (see
    ``gathered_info_nce``): its average over ranks is the global-batch loss. It is
    computed by ``gathered_info_nce`` or, with ``cfg.distributed == "ring"``,
    ``ring_info_nce`` (same value and gradients).
    """
    anchors, positives = emb[:, 0], emb[:, 1]
    hard = emb[:, 2] if emb.shape[1] > 2 else None
    if extra_negatives is not None:
        extra_negatives = extra_negatives.to(emb.dtype)
    kwargs = dict(temperature=cfg.temperature, hard_negative_weight=cfg.hard_negative_weight,
                  gaussian_negatives=cfg.gaussian_negatives, gaussian_weight=cfg.gaussian_weight,
                  generator=generator, backend=cfg.backend)
    if distributed:
        if cfg.distributed not in DISTRIBUTED_LOSSES:
            raise ValueError(f"unknown distributed loss {cfg.distributed!r}; choose one of "
                             f"{', '.join(DISTRIBUTED_LOSSES)}")
        from ..distributed import gathered_info_nce, ring_info_nce
        loss_fn = ring_info_nce if cfg.distributed == "ring" else gathered_info_nce
        return loss_fn(anchors, positives, hard, extra_negatives, **kwargs)
    return info_nce(anchors, positives, hard, extra_negatives, **kwargs)


def _flat(batch: dict[str, torch.Tensor], rows: slice, device) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of a (B, V, L) batch as (rows x V, L') model inputs, L' trimmed to the
    longest sentence of the chunk (less padding, same result)."""
    mask = batch["attention_mask"][rows]
    width = max(int(mask.sum(-1).max()), 1)
    out = {}
    for key in ("input_ids", "attention_mask", "token_type_ids", "mlm_input_ids", "mlm_labels"):
        if key in batch:
            x = batch[key][rows][..., :width]
            out[key] = x.reshape(-1, width).to(device, non_blocking=True)
    return out


def _mlm_scale(count: int, distributed: bool, device) -> float:
    """Factor turning a rank's summed MLM loss into its share of the global mean (times W
    under DDP, whose gradient averaging divides by W again)."""
    if not distributed:
        return 1.0 / max(count, 1)
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total)
    return dist.get_world_size() / max(float(total), 1.0)


def _global_value(value: torch.Tensor, distributed: bool) -> float:
    """The logged loss: under DDP each rank's value is scaled so their mean is the global loss."""
    value = value.detach().double().reshape(1).clone()
    if distributed:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _views(batch: dict[str, torch.Tensor], views: slice, mlm: bool) -> dict[str, torch.Tensor]:
    """The (B, V', L) batch of the views ``views``; MLM inputs kept only if ``mlm``."""
    keep = ("input_ids", "attention_mask", "token_type_ids") + (("mlm_input_ids", "mlm_labels") if mlm else ())
    return {k: v[:, views] for k, v in batch.items() if k in keep}


class MoCo(nn.Module):
    """MoCo (He et al., 2020) in SimCSE's training step: a momentum key encoder and a
    queue of past keys, both state of this module (so checkpoints hold them).

    How it combines with SimCSE's views (the choice made here, MoCo's own):

    - the query encoder, the model being trained, encodes only the anchors (view 0), with
      dropout and a graph;
    - the key encoder (:class:`fastcl.moco.MomentumEncoder`, an EMA copy of the query
      encoder) encodes the other views, the positives (view 1) and, supervised, the hard
      negatives (view 2), without a graph. It runs in training mode, so dropout draws its
      own masks: a key is a second dropout view of the sentence, as SimCSE's positive is;
    - the loss is InfoNCE of the anchors against the batch's keys (in-batch positives and
      negatives, hard negatives weighted as usual) plus the queue as ``extra_negatives``:
      every candidate is a key and only the anchors get a gradient;
    - after the optimizer's step, :meth:`after_step` moves the key encoder towards the
      query encoder (``k = m k + (1 - m) q``) and enqueues this step's positive keys
      (oldest out), after the loss, so a key is never a negative of its own anchor.

    Under DDP the in-batch keys of every rank are gathered like positives (without
    gradient) and the queue enqueues every rank's keys in rank order (``all_ranks``), so
    it is identical on every rank. With gradient caching the keys are encoded chunk by
    chunk without a graph and only the anchors are re-encoded. MLM, when on, runs on
    the anchors' sentences (the query encoder's inputs). The model saved for inference
    is the query encoder, as in MoCo.
    """

    def __init__(self, encoder: nn.Module, queue_size: int, momentum: float = 0.999, *, dim: int,
                 all_ranks: bool = False, group=None) -> None:
        super().__init__()
        self.key_encoder = MomentumEncoder(encoder, momentum)
        first = next(self.key_encoder.parameters())
        self.queue = KeyQueue(queue_size, dim, dtype=first.dtype, device=first.device, all_ranks=all_ranks,
                              group=group)
        self.pending: torch.Tensor | None = None  # this step's positive keys, enqueued by after_step

    @property
    def momentum(self) -> float:
        return self.key_encoder.momentum

    def negatives(self) -> torch.Tensor | None:
        """The queue's keys, oldest first, or None while it is empty."""
        return self.queue.keys() if len(self.queue) else None

    @torch.no_grad()
    def encode_keys(self, batch: dict[str, torch.Tensor], chunk_size: int = 0, autocast=None,
                    device=None) -> torch.Tensor:
        """(B, V - 1, D) keys of views 1.. of ``batch``, ``chunk_size`` rows at a time (all
        at once if 0); the positives' keys are kept for :meth:`after_step`."""
        autocast = autocast or contextlib.nullcontext
        device = device or next(self.key_encoder.parameters()).device
        key_batch = _views(batch, slice(1, None), mlm=False)
        n_rows, views = key_batch["input_ids"].shape[:2]
        if views < 1:
            raise ValueError("MoCo needs at least two views per row (anchors and positives)")
        step = chunk_size if 0 < chunk_size < n_rows else n_rows
        keys = []
        for start in range(0, n_rows, step):
            rows = slice(start, min(start + step, n_rows))
            with autocast():
                emb, _, _ = self.key_encoder(**_flat(key_batch, rows, device))
            keys.append(emb.view(rows.stop - rows.start, views, -1))
        keys = torch.cat(keys)
        self.pending = keys[:, 0]
        return keys

    @torch.no_grad()
    def after_step(self, encoder: nn.Module) -> None:
        """After the optimizer's step: the EMA update, then this step's positive keys into
        the queue (under ``all_ranks``, a collective: every rank calls it)."""
        self.key_encoder.update(encoder)
        if self.pending is not None:
            keys, self.pending = self.pending, None
            self.queue.enqueue(keys)


def compute_gradients(model, batch: dict[str, torch.Tensor], cfg: LossConfig, *, chunk_size: int = 0,
                      generator: torch.Generator | None = None, autocast=None, scaler=None,
                      device=None, check_replay: bool = True, moco: MoCo | None = None,
                      method=None) -> dict[str, float]:
    """Accumulate into ``.grad`` the gradients of ``loss + mlm_weight * mlm_loss`` for one
    batch, and return the (global) loss values.

    ``model`` is a :class:`~fastcl.sentence_model.SentenceEncoder`, or a DDP wrapper of one.
    ``batch`` holds (B, V, L) ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``),
    and with MLM ``mlm_input_ids`` / ``mlm_labels``. ``chunk_size`` 0 (or >= B) is the
    plain step; otherwise rows are encoded ``chunk_size`` at a time (gradient caching).
    With ``moco``, views 1.. are encoded by its key encoder (first, without a graph), the
    model encodes view 0 only, and the queue adds negatives; the caller runs
    ``moco.after_step(encoder)`` after the optimizer's step. With ``method`` (one of
    :mod:`fastcl.train.methods`), that method's step computes the gradients instead.
    """
    if method is not None:
        return method.compute_gradients(model, batch, autocast=autocast or contextlib.nullcontext, scaler=scaler,
                                        device=device or next(model.parameters()).device)
    distributed = _distributed()
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    scale = (lambda x: scaler.scale(x)) if scaler is not None else (lambda x: x)  # noqa: E731
    inner = model.module if hasattr(model, "module") else model
    keys = extra = None
    if moco is not None:
        keys = moco.encode_keys(batch, chunk_size, autocast, device)
        extra = moco.negatives()
        batch = _views(batch, slice(0, 1), mlm=True)  # the query encoder sees the anchors only

    def loss_of(emb: torch.Tensor) -> torch.Tensor:
        if keys is not None:
            emb = torch.cat([emb, keys.to(emb.dtype)], dim=1)
        return contrastive_loss(emb, cfg, generator, distributed, extra)

    n_rows, views = batch["input_ids"].shape[:2]
    do_mlm = "mlm_input_ids" in batch
    mlm_factor = None
    if do_mlm:
        mlm_factor = _mlm_scale(int((batch["mlm_labels"] != -100).sum()), distributed, device)
    out = {}

    if not chunk_size or chunk_size >= n_rows:
        inputs = _flat(batch, slice(None), device)
        with autocast():
            emb, mlm_sum, _ = model(**inputs)
        loss = loss_of(emb.view(n_rows, views, -1))
        total = loss
        if do_mlm:
            total = total + cfg.mlm_weight * mlm_sum * mlm_factor
            out["mlm_loss"] = _global_value(mlm_sum * mlm_factor, distributed)
        scale(total).backward()
        out["loss"] = _global_value(loss, distributed)
        return out

    chunks = [slice(i, min(i + chunk_size, n_rows)) for i in range(0, n_rows, chunk_size)]
    states, cached = [], []
    with torch.no_grad():
        for rows in chunks:
            inputs = _flat(batch, rows, device)
            inputs.pop("mlm_input_ids", None)
            inputs.pop("mlm_labels", None)
            states.append(RNGState())
            with autocast():
                emb, _, _ = inner(**inputs)
            cached.append(emb.view(rows.stop - rows.start, views, -1))
    after_first_pass = RNGState()

    emb_all = torch.cat(cached).detach()
    if emb_all.dtype == torch.float16:
        emb_all = emb_all.float()  # unscaled fp16 gradients of a huge batch's mean loss would underflow
    emb_all.requires_grad_()
    loss = loss_of(emb_all)
    loss.backward()  # unscaled: the scaler scales the surrogate below instead
    grads = emb_all.grad
    mlm_total = 0.0
    for k, rows in enumerate(chunks):
        sync = k == len(chunks) - 1
        ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with ctx:
            states[k].restore()
            inputs = _flat(batch, rows, device)
            with autocast():
                emb, mlm_sum, _ = model(**inputs)
            emb = emb.view(rows.stop - rows.start, views, -1)
            if check_replay:
                ref = cached[k].float()
                err = float((emb.detach().float() - ref).norm() / ref.norm().clamp_min(1e-30))
                if err > REPLAY_TOLERANCE:
                    raise RuntimeError(
                        f"gradient caching: chunk {k} re-encoded with a relative difference of {err:.3g} from its "
                        "first pass: the dropout masks were not reproduced (a random generator this step does not "
                        "save, or a nondeterministic attention kernel); the cached gradients would be wrong")
            wide = torch.promote_types(emb.dtype, torch.float32)  # half precision summed in fp32
            surrogate = (emb.to(wide) * grads[rows].to(wide)).sum()
            if do_mlm:
                surrogate = surrogate + cfg.mlm_weight * mlm_sum * mlm_factor
                mlm_total = mlm_total + mlm_sum.detach() * mlm_factor
            scale(surrogate).backward()
    after_first_pass.restore()  # the next step draws as if each chunk had been encoded once
    out["loss"] = _global_value(loss, distributed)
    if do_mlm:
        out["mlm_loss"] = _global_value(torch.as_tensor(mlm_total), distributed)
    return out
