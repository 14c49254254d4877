"""From a loss call's arguments to what runs: the plan.

The loss modules (loss.py, nt_xent.py, token_level.py, distributed.py) hand their
arguments down here and get back one object per call: the checked options and inputs,
the column layout, the backend and the backward strategy, and the arguments of the
autograd Function (:class:`~fastcl.ops.function.InfoNCEFunction`), whose
:class:`~fastcl.ops.dispatch.KernelPlan` selects the kernels in the dispatch table.

Which backend and backward strategy run, and what ``"auto"`` picks, is decided in
:mod:`fastcl.backends`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .backends import BACKEND_ALIASES, BACKENDS, BACKWARD_STRATEGIES, canonical_backend, choose_backend, choose_strategy
from .checks import Inputs, check_inputs
from .directions import (
    DEFAULT_DIRECTIONS, DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_QUERY, candidate_rows, check_family_options,
    doc_to_doc_layout, hard_blocks, hardness_fields, margin_thresholds, n_hard_blocks, positive_logits, query_to_query_layout,
)
from .gaussian import gaussian_negatives
from .guide import check_guide, direction_guide
from .numerics import check_eps, check_flag, check_real, check_temperature_float
from .ops import dispatch
from .ops.dispatch import KernelPlan
from .ops.layout import ColumnLayout, GuideMask
from .ops.utils import accumulator_dtype

REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------ the options


class LossOptions(NamedTuple):
    """The scalar arguments of a loss call (see :func:`fastcl.info_nce`, whose defaults
    these are); :meth:`checked` raises a TypeError or ValueError naming the argument."""

    temperature: float | torch.Tensor = 0.05
    hard_negative_weight: float = 1.0
    gaussian_negatives: int = 0
    gaussian_weight: float = 1.0
    symmetric: bool = False
    reduction: str = "mean"
    normalize: bool = True
    eps: float = 1e-12
    backend: str = "auto"
    backward_strategy: str = "auto"
    check_finite: bool = True
    directions: tuple[str, ...] = DEFAULT_DIRECTIONS
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    false_negative_margin: float | None = None
    doc_to_doc_negatives: bool = True

    @classmethod
    def from_keywords(cls, function: str, keywords: dict) -> LossOptions:
        """The checked options of ``function(**keywords)``; an unknown keyword is a
        TypeError, as Python raises it."""
        for name in keywords:
            if name not in cls._fields:
                raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
        return cls(**keywords).checked()

    def checked(self) -> LossOptions:
        """These options, once every check that needs no tensor values has passed (run
        at construction of a loss module and at every call), with ``directions`` and
        ``partition_mode`` as computed (``symmetric`` spelled out, directions in their
        canonical order)."""
        temperature = self.temperature
        if isinstance(temperature, torch.Tensor):
            if not temperature.is_floating_point():
                raise TypeError("temperature must be a float or a one-element floating-point tensor, got "
                                f"a {temperature.dtype} tensor")
            if temperature.numel() != 1:
                raise ValueError("temperature must be a float or a one-element floating-point tensor, got "
                                 f"a tensor of shape {tuple(temperature.shape)}")
        else:
            check_temperature_float(temperature)
        check_eps(self.eps)
        for name in ("symmetric", "normalize", "check_finite", "doc_to_doc_negatives"):
            check_flag(name, getattr(self, name))
        _check_positive("hard_negative_weight", self.hard_negative_weight)
        _check_positive("gaussian_weight", self.gaussian_weight)
        count = self.gaussian_negatives
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 0 <= count < 2 ** 31:
            raise ValueError(f"gaussian_negatives must be an int in [0, 2**31), got {count!r}")
        _check_name("reduction", self.reduction, REDUCTIONS)
        _check_name("backend", self.backend, BACKENDS + BACKEND_ALIASES)
        _check_name("backward_strategy", self.backward_strategy, BACKWARD_STRATEGIES)
        backend, strategy = canonical_backend(self.backend), self.backward_strategy
        if backend == "dense" and strategy != "auto":
            raise ValueError(f"backward_strategy={strategy!r} needs a fused backend: the dense backend has none "
                             "(autograd differentiates it)")
        if backend in ("cpp", "chunked") and strategy not in ("auto",) + dispatch.strategies_of(backend):
            raise ValueError(f"backward_strategy={strategy!r} is not offered by backend {backend!r} "
                             f"(it offers {dispatch.strategies_of(backend)})")
        directions, partition_mode = check_family_options(
            self.directions, self.partition_mode, self.hardness_mode, self.hardness_strength,
            self.false_negative_margin, self.symmetric)
        return self._replace(directions=directions, partition_mode=partition_mode)

    @property
    def margin(self) -> float | None:
        """The false-negative margin as a float, or None."""
        return None if self.false_negative_margin is None else float(self.false_negative_margin)


def _check_positive(name: str, value) -> None:
    value = check_real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_name(argument: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {allowed}, got {value!r}")



def uniform_row_gradients(options: LossOptions, n_terms: int) -> bool:
    """Whether each Function application of a call (one per direction, ``n_terms`` in
    all) gets the same gradient for every row, which the one pass needs: the loss is
    reduced to a scalar, and its terms are either one or averaged (``per_direction``,
    ``symmetric``); ``joint`` takes their log-sum-exp, whose gradient differs by row."""
    return options.reduction != "none" and (n_terms == 1 or options.partition_mode == "per_direction")


def needs_gradient(*inputs) -> bool:
    """Grad mode is on and some tensor among ``inputs`` requires a gradient."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)


# ------------------------------------------------------------------------- the plan


class FunctionArgs(NamedTuple):
    """The arguments of :class:`~fastcl.ops.function.InfoNCEFunction`, in order."""

    q: torch.Tensor
    k_grad: torch.Tensor
    k_const: torch.Tensor | None
    inv_tau: torch.Tensor
    targets: torch.Tensor | None
    groups: tuple[torch.Tensor, torch.Tensor] | None
    plan: KernelPlan
    thresholds: torch.Tensor | None = None
    guide: GuideMask | None = None


class LossPlan(NamedTuple):
    """One call of a loss, checked and decided: its options, its inputs after the checks
    and its Gaussian negatives; then ``rows`` (query_to_doc), the Function's arguments,
    or None for the dense path, which takes ``inputs`` and ``gaussian``. The other
    directions (:mod:`fastcl.directions`): ``columns`` (doc_to_query, a term with its
    own target), ``same_tower`` (query_to_query, doc_to_doc: terms without a target)
    and ``positive``, the positive logits those need."""

    options: LossOptions
    inputs: Inputs
    gaussian: torch.Tensor | None
    rows: FunctionArgs | None = None
    columns: FunctionArgs | None = None
    same_tower: tuple[FunctionArgs, ...] = ()
    positive: torch.Tensor | None = None


def check_call(options: LossOptions, anchors, positives, hard_negatives=None, extra_negatives=None, *, labels=None,
               groups=None, generator=None, names=("anchors", "positives")) -> tuple[Inputs, torch.Tensor | None]:
    """A call's inputs after the checks, and its Gaussian negatives, drawn."""
    inputs = check_inputs(options, anchors, positives, hard_negatives, extra_negatives, labels, groups, names)
    return inputs, gaussian_negatives(options.gaussian_negatives, inputs.anchors, generator)


def candidate_layout(options: LossOptions, n_grad_cols: int, hard_start: int, n_hard: int,
                     n_extra: int, k_blocks: int = 1) -> ColumnLayout:
    """The layout of ``[candidates with a gradient; extra negatives; Gaussian negatives]``:
    row i < ``n_hard`` has its own hard negatives at columns ``hard_start + k n_hard + i``
    (k < ``k_blocks``); with the options' hardness penalty."""
    return ColumnLayout(
        n_cols=n_grad_cols + n_extra + options.gaussian_negatives, n_grad_cols=n_grad_cols, hard_start=hard_start,
        n_hard=n_hard, gauss_start=n_grad_cols + n_extra, log_hard_weight=math.log(options.hard_negative_weight),
        log_gauss_weight=math.log(options.gaussian_weight), n_hard_blocks=max(k_blocks, 1),
        **hardness_fields(options.hardness_mode, options.hardness_strength))


def kernel_plan(options: LossOptions, layout: ColumnLayout, x: torch.Tensor, n_logits: int, *, grouped: bool = False,
                dense: bool = True, reduced: bool | None = None, needs_grad: bool = True,
                needed: frozenset[str] = frozenset()) -> KernelPlan | None:
    """What runs for queries like ``x`` against ``layout``'s columns (``n_logits`` in
    all): the backend and its backward strategy, or None for the dense path. ``dense``
    False (the distributed losses) never takes the dense path; ``reduced`` (default:
    the reduction is not "none") allows strategies that form the gradients in the
    forward, which "auto" takes only when ``needs_grad`` (some input requires a
    gradient, in grad mode). A caller that combines the per-row losses other than by a
    plain sum or mean must pass ``reduced=False``: the one pass assumes every row's
    incoming gradient is the same (:func:`uniform_row_gradients`). ``needed``: the
    layout features of every layout the call runs (the margin's included), see
    :func:`~fastcl.backends.choose_backend`."""
    needed = needed | dispatch.layout_features(layout, options.margin is not None)
    backend = choose_backend(options.backend, x.device, n_logits, options.backward_strategy, dense, needed)
    if backend == "dense":
        return None
    reduced = options.reduction != "none" if reduced is None else reduced
    strategy = choose_strategy(options.backward_strategy, backend, x, grouped, reduced, needs_grad, layout.n_cols,
                               layout.n_grad_cols)
    return KernelPlan(layout, backend, strategy, options.eps if options.normalize else None)


def plan_info_nce(options: LossOptions, anchors, positives, hard_negatives=None, extra_negatives=None, *,
                  labels=None, groups=None, generator=None, guide_anchors=None, guide_candidates=None,
                  guide_threshold=None) -> LossPlan:
    """The plan of :func:`fastcl.info_nce`: candidates ``[positives; hard blocks; extra;
    gaussian]``, the terms of the other directions (:mod:`fastcl.directions`) and the
    guide of each (:mod:`fastcl.guide`)."""
    x, gaussian = check_call(options, anchors, positives, hard_negatives, extra_negatives, labels=labels,
                             groups=groups, generator=generator)
    n, k_blocks = x.anchors.shape[0], n_hard_blocks(x.hard_negatives)
    guide = check_guide(x.anchors, guide_anchors, guide_candidates, guide_threshold, n * (1 + k_blocks),
                        eps=options.eps, check_finite=options.check_finite, groups=groups)
    n_extra = x.extra_negatives.shape[0] if x.extra_negatives is not None else 0
    n_docs = n * (1 + k_blocks)
    layout = candidate_layout(options, n_docs, n, n if k_blocks else 0, n_extra, k_blocks)
    directions = set(options.directions)
    # Same-tower terms of a one-row batch have no entry at all: they add nothing.
    same_tower = [d for d in (QUERY_TO_QUERY, DOC_TO_DOC) if d in directions and n > 1]
    d2d_blocks = k_blocks if options.doc_to_doc_negatives else 0  # doc_to_doc against hard negatives too
    others = [query_to_query_layout(n, n) if d == QUERY_TO_QUERY else doc_to_doc_layout(n, n, d2d_blocks)
              for d in same_tower]
    needed = frozenset().union(*(dispatch.layout_features(o, guide=guide is not None) for o in [layout, *others]))
    grouped = groups is not None
    n_logits = n * (layout.n_cols + (n if DOC_TO_QUERY in directions else 0) + sum(o.n_cols for o in others))
    plan = kernel_plan(options, layout, x.anchors, n_logits, grouped=grouped, needed=needed,
                       reduced=uniform_row_gradients(options, 1 + (DOC_TO_QUERY in directions) + len(others)),
                       needs_grad=needs_gradient(x.anchors, x.positives, x.hard_negatives, options.temperature))
    if plan is None:
        return LossPlan(options, x, gaussian)
    q = x.anchors.contiguous()
    k_grad = (x.positives if k_blocks == 0 else torch.cat([x.positives, hard_blocks(x.hard_negatives)])).contiguous()
    targets = x.labels.to(torch.int64).contiguous() if x.labels is not None else None
    row_groups = x.groups.to(torch.int64).contiguous() if grouped else None
    # (row groups, candidate groups): positives and hard negatives share their row's group.
    group_ids = (row_groups, row_groups.repeat(1 + k_blocks)) if grouped else None
    inv_tau = inverse_temperature(options.temperature, x.anchors)
    eps = plan.normalize_eps
    target_rows = k_grad[:n] if targets is None else candidate_rows(k_grad, x.extra_negatives)[targets]
    thresholds = margin_thresholds(q, target_rows, options.margin, eps)
    rows = FunctionArgs(q, k_grad, constant_rows(x.extra_negatives, gaussian), inv_tau, targets, group_ids, plan,
                        thresholds, guide)
    columns = None
    if DOC_TO_QUERY in directions:
        # Positive j against every anchor; its target, anchor j, is the positive pair.
        columns = FunctionArgs(k_grad[:n], q, None, inv_tau, None, (row_groups, row_groups) if grouped else None,
                               plan._replace(layout=ColumnLayout.plain(n)), thresholds,
                               direction_guide(guide, DOC_TO_QUERY, n))
    no_target = torch.full((n,), -1, dtype=torch.int64, device=q.device)
    terms = tuple(FunctionArgs(q if d == QUERY_TO_QUERY else k_grad[:n],
                               q if d == QUERY_TO_QUERY else k_grad[:n * (1 + d2d_blocks)], None,
                               inv_tau, no_target, None, plan._replace(layout=o), thresholds,
                               direction_guide(guide, d, n, n * (1 + d2d_blocks)))
                  for d, o in zip(same_tower, others))
    positive = positive_logits(q, target_rows, inv_tau, eps) if terms else None
    return LossPlan(options, x, gaussian, rows, columns, terms, positive)


def plan_nt_xent(options: LossOptions, z1, z2) -> LossPlan:
    """The plan of :func:`fastcl.nt_xent`: queries and candidates are the same 2N rows
    ``[z1; z2]``, each row's own column masked, the target of row i its other view."""
    x, _ = check_call(options, z1, z2, names=("z1", "z2"))
    n = x.anchors.shape[0]
    layout = ColumnLayout(n_cols=2 * n, n_grad_cols=2 * n, gauss_start=2 * n, self_start=0, n_self=2 * n)
    plan = kernel_plan(options, layout, x.anchors, (2 * n) ** 2,
                       needs_grad=needs_gradient(x.anchors, x.positives, options.temperature))
    if plan is None:
        return LossPlan(options, x, None)
    z = torch.cat([x.anchors, x.positives]).contiguous()
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    thresholds = margin_thresholds(z, z[targets], options.margin, plan.normalize_eps)
    # z is both the queries and the candidates: autograd adds the two gradients.
    rows = FunctionArgs(z, z, None, inverse_temperature(options.temperature, z), targets, None, plan, thresholds)
    return LossPlan(options, x, None, rows)


# ------------------------------------------------------------- pieces of the kernels' inputs


def constant_rows(extra: torch.Tensor | None, gaussian: torch.Tensor | None) -> torch.Tensor | None:
    """The candidates that get no gradient, ``[extra; gaussian]``, detached, or None."""
    parts = [x.detach() for x in (extra, gaussian) if x is not None]
    if not parts:
        return None
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


def inverse_temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 / tau as a 0-dim tensor on ``like``'s device (differentiable if tau is)."""
    if isinstance(temperature, torch.Tensor):
        # In the wider of tau's dtype and the accumulator's: 1 / tau of a float16
        # temperature below 1.5e-5 overflows float16, and a float32 temperature with
        # float64 inputs must not round 1 / tau to float32.
        tau = temperature.reshape(())
        return 1.0 / tau.to(torch.promote_types(tau.dtype, accumulator_dtype(like.dtype)))
    # torch.full fills on the device; torch.tensor(..., device="cuda") would copy from the
    # host and wait for all queued work first.
    return torch.full((), 1.0 / temperature, dtype=accumulator_dtype(like.dtype), device=like.device)


# ------------------------------------------------------------------------ reductions


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Like F.cross_entropy under autocast, half-precision inputs give an fp32 loss."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reduce_rows(per_row: torch.Tensor, reduction: str, input_dtype: torch.dtype) -> torch.Tensor:
    per_row = per_row.to(output_dtype(input_dtype))
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def reduce_for_ddp(per_row: torch.Tensor, reduction: str, input_dtype: torch.dtype, world: int,
                   n_global: int) -> torch.Tensor:
    """The distributed losses' reduction, scaled for DistributedDataParallel, which
    averages gradients over the ``world`` ranks: "mean" is ``world / n_global`` times the
    local sum, "sum" ``world`` times it (so DDP's average is the gradient of the global
    mean or sum), "none" the local rows unscaled."""
    if reduction == "none":
        return reduce_rows(per_row, "none", input_dtype)
    scale = world / n_global if reduction == "mean" else world
    return reduce_rows(per_row, "sum", input_dtype) * scale
