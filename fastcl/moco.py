"""MoCo's pieces: a momentum key encoder and a FIFO queue of past keys.

MoCo (He et al., 2020) scores queries from the trained encoder against keys from a
slowly moving copy of it, and keeps the keys of the last K samples in a queue that
serves as extra negatives (``extra_negatives`` of :func:`fastcl.info_nce`: they add to
the in-batch negatives and get no gradient)::

    key_encoder = MomentumEncoder(encoder, momentum=0.999)
    queue = KeyQueue(65536, dim, all_ranks=True)      # all_ranks under DDP
    ...
    q = encoder(x_q)
    k = key_encoder(x_k)                              # no gradient
    loss = info_nce(q, k, extra_negatives=queue.keys())
    loss.backward(); optimizer.step()
    key_encoder.update(encoder)                       # k = m k + (1 - m) q
    queue.enqueue(k)                                  # after the loss: this batch's keys
                                                      # are not negatives of themselves
Both are ``nn.Module``s whose state lives in their ``state_dict`` (the key encoder's
weights; the queue's keys, write position and fill), so a resumed run continues.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, whose names carry no prefix."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


class MomentumEncoder(nn.Module):
    """A copy of the query encoder that follows it by exponential moving average.

    ``update(query_encoder)`` sets every parameter ``k = m * k + (1 - m) * q`` and copies
    every buffer (e.g. batch-norm statistics) from the query encoder. The copy never
    requires grad and ``forward`` runs under ``torch.no_grad()``. It starts as an exact
    copy (MoCo's initialization) and follows the query encoder's train / eval mode only
    through this module's own ``train()`` / ``eval()``.

    Args:
        encoder: the query encoder (may be wrapped in DistributedDataParallel).
        momentum: m in [0, 1]; MoCo uses 0.999. 0 copies the query encoder, 1 freezes.
    """

    def __init__(self, encoder: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(_unwrap(encoder))
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.encoder(*args, **kwargs)

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        """One EMA step towards ``encoder``'s parameters; buffers are copied."""
        source = _unwrap(encoder)
        mine = dict(self.encoder.named_parameters())
        theirs = dict(source.named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError("the encoder's parameters do not match the key encoder's (names differ: "
                             f"{sorted(set(mine) ^ set(theirs))[:5]})")
        m = self.momentum
        for name, k in mine.items():
            q = theirs[name]
            if q.shape != k.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(q.shape)} in the encoder, "
                                 f"{tuple(k.shape)} in the key encoder")
            k.mul_(m).add_(q.detach().to(k.dtype), alpha=1.0 - m)
        my_buffers = dict(self.encoder.named_buffers())
        for name, b in source.named_buffers():
            if name in my_buffers:
                my_buffers[name].copy_(b)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class KeyQueue(nn.Module):
    """A first-in first-out queue of the last ``size`` keys, each ``dim`` wide.

    :meth:`enqueue` appends a batch of keys (detached, cast to the queue's dtype); when
    full, the oldest keys make room. :meth:`keys` returns the keys held, oldest first
    (within one enqueue, in row order; under ``all_ranks``, rank 0's rows first): only
    the filled part while the queue is not yet full. A batch larger than the queue leaves
    only its last ``size`` rows.

    With ``all_ranks=True`` every :meth:`enqueue` gathers the keys of every rank of
    ``group`` (:func:`fastcl.distributed.all_gather_no_grad`, which allows unequal batch
    sizes) and enqueues them all, in rank order, so the queue is identical on every rank
    (MoCo's shared queue). It is a collective: every rank must call it. Nothing is
    gathered unless asked.

    Storage is a ring buffer (``size x dim``) with a write position and a fill count,
    all three buffers of this module: they move with ``.to(device)`` and are saved and
    restored by ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, all_ranks: bool = False, group=None) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be an int > 0, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.size, self.dim = size, dim
        self.all_ranks, self.group = bool(all_ranks), group
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("position", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64, device=device))
        # Host copies of position and fill: no device sync per step. Kept in step with the
        # buffers, and re-read from them after load_state_dict.
        self._position = 0
        self._filled = 0
        self.register_load_state_dict_post_hook(KeyQueue._sync_from_buffers)

    @staticmethod
    def _sync_from_buffers(module: "KeyQueue", incompatible) -> None:
        position, filled = int(module.position), int(module.filled)
        if not (0 <= position < module.size and 0 <= filled <= module.size):
            raise ValueError(f"loaded queue state is inconsistent: position {position}, filled {filled}, "
                             f"size {module.size}")
        module._position, module._filled = position, filled

    def __len__(self) -> int:
        return self._filled

    @property
    def full(self) -> bool:
        return self._filled == self.size

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``keys`` (B x dim); under ``all_ranks``, every rank's keys (a collective)."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must be a (batch, {self.dim}) tensor, got {shape}")
        keys = keys.detach()
        if self.all_ranks:
            from .distributed import all_gather_no_grad

            keys = all_gather_no_grad(keys, self.group)
        keys = keys.to(device=self.queue.device, dtype=self.queue.dtype)
        if keys.shape[0] > self.size:
            keys = keys[-self.size:]  # only the newest `size` survive
        n = keys.shape[0]
        if n == 0:
            return
        first = min(n, self.size - self._position)
        self.queue[self._position:self._position + first] = keys[:first]
        if n > first:  # wrap around to the start
            self.queue[:n - first] = keys[first:]
        self._position = (self._position + n) % self.size
        self._filled = min(self.size, self._filled + n)
        self.position.fill_(self._position)
        self.filled.fill_(self._filled)

    def keys(self) -> torch.Tensor:
        """The keys held, oldest first (``len(self) x dim``), for ``extra_negatives``.

        Always a fresh tensor, never a view of the buffer, so an :meth:`enqueue` before
        the backward pass cannot change negatives a loss has already been given. (The
        loss does not depend on the order of negatives; a defined order makes the queue
        testable and its state portable.)
        """
        if not self.full:
            return self.queue[:self._filled].clone()
        return torch.cat([self.queue[self._position:], self.queue[:self._position]])

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, filled={self._filled}"
                + (", all_ranks=True" if self.all_ranks else ""))
