"""Child-Tuning: AdamW that updates only a "child network" of each step's gradient.

Child-Tuning (Xu et al., "Raise a Child in Large Language Model: Towards Effective and
Generalizable Fine-tuning", EMNLP 2021) multiplies the gradient by a 0/1 mask before the
optimizer update, so each step changes only part of the weights:

- **task-free, "F"**: a fresh Bernoulli(p) mask for every parameter tensor at every step,
  the kept entries scaled by ``1 / p`` (the expected gradient is unchanged);
- **task-driven, "D"**: one fixed mask chosen before training from the Fisher information
  of the task (the squared gradients, summed over training batches): the top ``p``
  fraction of entries, ranked together across all masked parameters (one global
  threshold, not one per tensor), kept as they are (no ``1 / p`` scaling). Parameters
  without a mask are updated normally. See :func:`fisher_mask`.

What the authors' code does (AliceMind ``ChildTuning/ChildTuningOptimizer.py`` and
``ChildTuningD.py``), and what this module does:

- The mask multiplies the gradient *before* Adam's moment estimates, which therefore see
  the masked gradient: a masked entry contributes 0 to both moments that step, its
  moments still decay, and (in the F variant, where an entry is kept at other steps) it
  still moves by the momentum of earlier steps. What a mask guarantees is that *this
  step's* gradient of a masked entry has no effect. In the D variant a masked entry's
  moments stay 0 forever, so it never moves except by weight decay.
- Weight decay is decoupled (AdamW) and applies to every entry, masked or not: it is not
  a gradient.
- The update itself is PyTorch's :class:`torch.optim.AdamW`, unchanged: with ``p = 1``
  (or a D mask of all ones) every step equals ``torch.optim.AdamW``'s exactly. The
  authors' optimizer is the older HuggingFace AdamW, which differs from PyTorch's in
  two details unrelated to the mask: eps is added to ``sqrt(v)`` before the bias
  correction, and weight decay is applied after the Adam step to the updated weights
  (a second-order difference).
- In D, the paper's code masks only parameters whose name contains ``"layer"`` (BERT's
  encoder layers; embeddings, pooler and classifier train fully), clips each parameter's
  gradient norm to ``max_grad_norm`` before squaring it, and keeps entries at or above
  the ``(1 - p)`` percentile. :func:`fisher_mask` takes the parameter filter and the
  clipping as options, and keeps exactly ``ceil(p * n)`` entries (ties at the threshold
  broken by position), which differs from the percentile rule by at most one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

MODES = ("f", "d")


def _check_reserve(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
        raise ValueError(f"the Child-Tuning reserve probability p must be a number in (0, 1], got {p!r}")
    return float(p)


def _mode(mode: str) -> str:
    m = str(mode).lower().removeprefix("childtuning-").removeprefix("child-tuning-")
    if m not in MODES:
        raise ValueError(f"mode must be 'f' (task-free) or 'd' (task-driven), got {mode!r}")
    return m


class ChildTuningAdamW(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` whose gradients are masked before each update.

    Args:
        params: parameters or parameter groups, exactly as for AdamW (named parameters
            too, which lets ``masks`` be keyed by name).
        mode: ``"f"`` (task-free: a fresh Bernoulli(``reserve_p``) mask per parameter
            each step, kept gradients scaled by ``1 / reserve_p``) or ``"d"``
            (task-driven: the fixed ``masks``, no scaling).
        reserve_p: p, the probability (F) of keeping a gradient entry. In D the fraction
            is fixed when the mask is built (:func:`fisher_mask`); here it is recorded only.
        masks: for D, a mapping from parameter (the tensor itself, or its name when the
            optimizer was given ``model.named_parameters()``) to a bool tensor of its
            shape; True keeps the entry. Parameters not in it get their full gradient.
        seed: seeds the F masks' generator (one per device, each seeded with this), so
            a run is reproducible; under DDP every rank must draw the same masks, so pass
            the same seed everywhere. None draws a seed from PyTorch's global generator
            (itself seeded identically on every rank by any careful trainer).
        lr, betas, eps, weight_decay, amsgrad, **kwargs: as for AdamW.

    After :meth:`step`, each parameter's ``.grad`` holds the masked gradient that was
    applied (the mask is applied in place, as in the paper's code; no gradient copy).
    :meth:`state_dict` carries the F generators' states and the D masks, so a resumed
    run draws the masks it would have drawn.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, mode: str = "f", reserve_p: float = 0.3,
                 masks: Mapping | None = None, seed: int | None = None, amsgrad: bool = False, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         **kwargs)
        self.mode = _mode(mode)
        self.reserve_p = _check_reserve(reserve_p)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        if self.mode == "d":
            if masks is None:
                raise ValueError("mode 'd' needs masks: build them with fastcl.optim.fisher_mask(...)")
            self.set_masks(masks)
        elif masks is not None:
            raise ValueError("masks are for mode 'd'; mode 'f' draws a fresh mask every step")

    # ------------------------------------------------------------------ masks

    def _params(self) -> list[torch.Tensor]:
        """Every parameter, in the order :meth:`state_dict` numbers them."""
        return [p for group in self.param_groups for p in group["params"]]

    def set_masks(self, masks: Mapping) -> None:
        """Install D masks (keyed by parameter or by parameter name); see the class doc."""
        by_name = {}
        for group in self.param_groups:
            for name, p in zip(group.get("param_names", ()), group["params"]):
                by_name[name] = p
        ours = {id(p): p for p in self._params()}
        installed = {}
        for key, mask in masks.items():
            if isinstance(key, str):
                if key not in by_name:
                    raise KeyError(f"mask for {key!r}, which is not a named parameter of this optimizer "
                                   "(pass model.named_parameters() to key masks by name)")
                p = by_name[key]
            elif isinstance(key, torch.Tensor) and id(key) in ours:
                p = key
            else:
                raise KeyError("every mask key must be a parameter of this optimizer or its name")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"the mask of a parameter of shape {tuple(p.shape)} must be a bool tensor "
                                 f"of that shape, got {shape}"
                                 + (f" ({mask.dtype})" if isinstance(mask, torch.Tensor) else ""))
            installed[p] = mask.to(p.device)
        self.masks = installed

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        for p in self._params():
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("ChildTuningAdamW does not support sparse gradients")
            if self.mode == "f":
                keep = torch.empty_like(grad).bernoulli_(self.reserve_p, generator=self._generator(grad.device))
                grad.mul_(keep).div_(self.reserve_p)
            elif p in self.masks:
                grad.mul_(self.masks[p])

    def step(self, closure: Callable | None = None):
        """Mask every gradient (in place), then take AdamW's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._mask_gradients()
        super().step()
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = super().state_dict()
        index = {p: i for i, p in enumerate(self._params())}
        state["child_tuning"] = {
            "mode": self.mode,
            "reserve_p": self.reserve_p,
            "seed": self.seed,
            "generators": {dev: gen.get_state() for dev, gen in self._generators.items()},
            "masks": {index[p]: mask for p, mask in self.masks.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        child = state_dict.pop("child_tuning", None)
        if child is None:
            raise ValueError("this state dict has no 'child_tuning' entry: it was not saved by ChildTuningAdamW")
        if child["mode"] != self.mode:
            raise ValueError(f"the state dict is of Child-Tuning mode {child['mode']!r}, this optimizer's is "
                             f"{self.mode!r}")
        super().load_state_dict(state_dict)
        self.reserve_p = float(child["reserve_p"])
        self.seed = int(child["seed"])
        self._generators = {}
        for dev, gen_state in child["generators"].items():
            self._generator(torch.device(dev)).set_state(gen_state)
        params = self._params()
        self.masks = {params[i]: mask.to(params[i].device) for i, mask in child["masks"].items()}


# ---------------------------------------------------------------------- Fisher mask


def fisher_information(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    include: Callable[[str], bool] | None = None,
    max_grad_norm: float | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher information: the mean over ``batches`` of each gradient squared.

    ``loss_fn(model, batch)`` returns a batch's scalar loss. Gradients are taken with
    :func:`torch.autograd.grad`, so the parameters' ``.grad`` are not touched. Only the
    trainable parameters whose name passes ``include`` are scored (all, by default; the
    paper's code scores names containing ``"layer"``). ``max_grad_norm`` clips each
    parameter's gradient norm separately before squaring, as the paper's code does.
    The model is used in whatever mode it is in: for SimCSE, where dropout is the
    augmentation, leave it in training mode as the paper does. Values are fp32 (fp64
    for fp64 parameters).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (include is None or include(n))]
    if not named:
        raise ValueError("no trainable parameter passes the include filter: nothing to score")
    fisher = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
              for n, p in named}
    count = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="Fisher information", unit="batch")
    for batch in iterator:
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn(model, batch) must return a scalar tensor")
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        add_squared_gradients(fisher, zip([n for n, _ in named], grads), max_grad_norm)
        count += 1
    if count == 0:
        raise ValueError("batches is empty: the Fisher information needs at least one batch")
    return {n: f / count for n, f in fisher.items()}


@torch.no_grad()
def add_squared_gradients(fisher: dict[str, torch.Tensor], grads: Iterable[tuple[str, torch.Tensor | None]],
                          max_grad_norm: float | None = None) -> None:
    """``fisher[name] += g * g`` for each (name, gradient) pair (None: no gradient,
    skipped), each gradient first clipped to norm ``max_grad_norm`` on its own, as
    Child-Tuning's code does, and taken in ``fisher[name]``'s dtype."""
    for name, grad in grads:
        if grad is None:
            continue
        grad = grad.to(fisher[name].dtype)
        if max_grad_norm is not None:
            grad = grad * torch.clamp(max_grad_norm / (grad.norm() + 1e-6), max=1.0)
        fisher[name] += grad * grad


def top_fraction_mask(scores: Mapping[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """Bool masks keeping the ``ceil(p * n)`` largest of all ``n`` entries of ``scores``,
    ranked together across tensors (one global threshold). Ties at the threshold are
    kept in order of position (tensors in mapping order, entries in row-major order),
    so exactly ``ceil(p * n)`` entries are kept."""
    p = _check_reserve(p)
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).to(torch.float64).cpu() for n in names])
    n = flat.numel()
    if n == 0:
        raise ValueError("no entries to rank")
    keep = min(n, max(1, math.ceil(p * n - 1e-9)))  # p * n = 3.0000000000000004 keeps 3
    threshold = torch.kthvalue(flat, n - keep + 1).values
    chosen = flat > threshold
    ties = (flat == threshold).nonzero()[:, 0]
    chosen[ties[: keep - int(chosen.sum())]] = True
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = chosen[start:start + size].reshape(scores[name].shape).to(scores[name].device)
        start += size
    return masks


def fisher_mask(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    p: float,
    *,
    include: Callable[[str], bool] | None = None,
    max_grad_norm: float | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Child-Tuning-D's mask: the top ``p`` fraction of entries by Fisher information.

    :func:`fisher_information` over ``batches`` (see it for ``loss_fn``, ``include`` and
    ``max_grad_norm``), then :func:`top_fraction_mask`: one global ranking across every
    scored parameter, exactly ``ceil(p * n)`` entries kept. Returns ``{name: bool mask}``
    for the scored parameters, on their devices; pass it as ``masks`` to
    :class:`ChildTuningAdamW` built on ``model.named_parameters()``::

        masks = fisher_mask(model, loader, lambda m, b: loss_of(m, b), p=0.3)
        opt = ChildTuningAdamW(model.named_parameters(), lr=2e-5, mode="d", masks=masks)
    """
    _check_reserve(p)
    fisher = fisher_information(model, batches, loss_fn, include=include, max_grad_norm=max_grad_norm,
                                progress=progress)
    return top_fraction_mask(fisher, p)
