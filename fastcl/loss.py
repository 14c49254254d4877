"""The public loss: argument checks, normalization, candidate assembly, dispatch.

Everything heavy happens in :class:`fastcl.ops.infonce.InfoNCEFunction`; this module
turns the user's arguments into its inputs, and fails early, with a message that names
the argument, on anything it cannot compute.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .ops.infonce import FUSED_NORMALIZATION, InfoNCEFunction
from .ops.layout import ColumnLayout
from .ops.one_pass import needs_gradient, one_pass_loss, plan_one_pass
from .ops.utils import SUPPORTED_DTYPES, accumulator_dtype, interpreting
from .reference import info_nce_reference

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "native", "reference")

#: Below this many logits (N x M) the "auto" backend takes the dense reference on GPUs
#: (and on CPUs without the native kernel): one small matrix product beats any sequence
#: of kernel launches, and 64 K elements is a quarter of a megabyte.
TINY_LOGITS = 1 << 16


# --------------------------------------------------------------------------- checks


def _check_matrix(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x embedding dim), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_options(temperature, hard_negative_weight, gaussian_negatives, gaussian_weight, reduction,
                   backend) -> None:
    """Checks that need no tensor values: run at construction and at every call."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise ValueError("temperature must be a float or a one-element floating-point tensor, got "
                             f"a {temperature.dtype} tensor of shape {tuple(temperature.shape)}")
    else:
        _check_positive("temperature", temperature)
    _check_positive("hard_negative_weight", hard_negative_weight)
    _check_positive("gaussian_weight", gaussian_weight)
    if isinstance(gaussian_negatives, bool) or not isinstance(gaussian_negatives, numbers.Integral) \
            or gaussian_negatives < 0:
        raise ValueError(f"gaussian_negatives must be an int >= 0, got {gaussian_negatives!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_index_vector(name: str, x, n: int, device: torch.device, what: str) -> None:
    """A 1-D integer tensor with one entry per anchor, on the anchors' device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor with one {what} per anchor ({n}), got {shape}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} are on {x.device} but anchors are on {device}")


def _check_tensors(anchors, positives, hard_negatives, extra_negatives, labels, temperature,
                   symmetric, check_finite, groups=None, names=("anchors", "positives")) -> None:
    """Shapes, dtypes and devices; then, in one device sync, the values. ``names`` are
    what the first two inputs are called in messages (NT-Xent calls them z1 and z2)."""
    first, second = names
    _check_matrix(first, anchors)
    n, d = anchors.shape
    if n == 0 or d == 0:
        raise ValueError(f"empty batch: {first} has shape {tuple(anchors.shape)}; "
                         "need at least one row and one column")
    named = [(first, anchors), (second, positives)]
    if hard_negatives is not None:
        named.append(("hard_negatives", hard_negatives))
    if extra_negatives is not None:
        named.append(("extra_negatives", extra_negatives))
    for name, x in named[1:]:
        _check_matrix(name, x)
        if name != "extra_negatives" and x.shape != anchors.shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(anchors.shape)} "
                             f"(row i pairs with row i), got {tuple(x.shape)}")
        if x.shape[1] != d:
            raise ValueError(f"{name} has embedding dim {x.shape[1]}, {first} have {d}")
        if x.device != anchors.device:
            raise ValueError(f"{name} is on {x.device} but {first} are on {anchors.device}")
        if x.dtype != anchors.dtype:
            raise TypeError(f"{name} is {x.dtype} but {first} are {anchors.dtype}; "
                            "cast them to one dtype")
    if isinstance(temperature, torch.Tensor) and temperature.device != anchors.device:
        raise ValueError(f"temperature is on {temperature.device} but {first} are on {anchors.device}")

    n_cols = n + (n if hard_negatives is not None else 0)
    n_cols += extra_negatives.shape[0] if extra_negatives is not None else 0
    if labels is not None:
        if symmetric:
            raise ValueError("labels are not supported with symmetric=True: the column direction "
                             "pairs positive i with anchor i")
        if groups is not None:
            raise ValueError("labels are not supported with groups: each anchor's target is its "
                             "own positive, inside its group")
        _check_index_vector("labels", labels, n, anchors.device, "target column")
    if groups is not None:
        _check_index_vector("groups", groups, n, anchors.device, "group id")

    if torch.compiler.is_compiling():
        return  # value checks would need a host sync, which a compiled graph cannot hold
    # Every value check becomes one boolean on the device; one transfer reads them all.
    checks: list[tuple[str, torch.Tensor]] = []
    if check_finite:
        checks += [(f"{name} contains NaN or infinite values", _all_finite(x)) for name, x in named]
    if isinstance(temperature, torch.Tensor):
        checks.append(("temperature must be a finite number > 0", (temperature.detach() > 0).all()
                       & torch.isfinite(temperature.detach()).all()))
    if labels is not None:
        checks.append((f"labels must lie in [0, {n_cols}): positives, hard and extra negatives",
                       ((labels >= 0) & (labels < n_cols)).all()))
    if checks:
        ok = torch.stack([c for _, c in checks]).tolist()
        for (message, _), passed in zip(checks, ok):
            if not passed:
                raise ValueError(message)


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``x`` is finite, as a 0-dim bool tensor (no sync). The
    smallest and largest value are finite exactly when all are (NaN propagates through
    both); one reduction, about 28x faster than ``torch.isfinite(x).all()`` on the CPU at
    4096 x 768, which writes a boolean per value."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    return torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all()


# ------------------------------------------------------------------------- helpers


def draw_gaussian_negatives(count: int, dim: int, dtype: torch.dtype, device: torch.device,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` vectors from N(0, I) (GS-InfoNCE's negatives), always drawn in fp32 and
    then cast, so the same generator state gives the same vectors in every dtype."""
    return torch.randn(count, dim, dtype=torch.float32, device=device, generator=generator).to(dtype)


def _choose_backend(backend: str, device: torch.device, n_logits: int) -> str:
    if backend != "auto":
        return backend
    if n_logits <= TINY_LOGITS:
        # On the CPU the native kernel is faster than the dense reference at every size
        # (measured from N = 4 up: one call, no N x M tensors, no autograd graph of its own).
        return "native" if device.type == "cpu" and native.available() else "reference"
    if device.type == "cuda":
        return "triton"
    # The interpreter runs the Triton kernels on CPU for tests; a compiled graph cannot
    # hold an interpreted launch, so under torch.compile the CPU takes the operator.
    if interpreting() and not torch.compiler.is_compiling():
        return "triton"
    return "native" if native.available() else "torch"


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like F.cross_entropy under autocast, half-precision inputs give an fp32 loss.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------ the loss


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    hard_negative_weight: float = 1.0,
    gaussian_negatives: int = 0,
    gaussian_weight: float = 1.0,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    check_finite: bool = True,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over in-batch, hard, extra and Gaussian negatives, without an N x M matrix.

    For anchors ``a`` (N x D) and candidates ``c = [positives; hard_negatives;
    extra_negatives; gaussian]`` (M rows), with every row L2-normalized when
    ``normalize`` (as ``F.normalize(x, dim=-1, eps=eps)``)::

        logit[i, j] = cos(a_i, c_j) / temperature + w[i, j]
        loss_i      = logsumexp_j logit[i, j] - logit[i, labels[i]]

    Args:
        anchors: N x D, receives a gradient.
        positives: N x D; row i is anchor i's positive. Receives a gradient. Every
            positive is a negative for every other anchor (in-batch negatives).
        hard_negatives: optional N x D; row i is anchor i's hard negative, and also a
            negative for every other anchor (SimCSE's convention). Receives a gradient.
        extra_negatives: optional Q x D negatives shared by all anchors (a MoCo queue, a
            precomputed corpus). They always add to the in-batch negatives, never replace
            them, and receive no gradient (they are detached).
        temperature: tau, a float or a one-element tensor; a tensor that requires grad
            (a learnable temperature, e.g. ``1 / logit_scale.exp()``) gets its gradient.
        hard_negative_weight: SimCSE's alpha, as a weight (not a logit offset): the logit
            of anchor i against its own hard negative gets ``log(hard_negative_weight)``
            added, so 1.0 means unweighted. (SimCSE's code adds its ``hard_negative_weight``
            directly to the logit; pass ``exp`` of that value here.)
        gaussian_negatives: G, how many vectors from N(0, I) to draw as extra negatives on
            every call (GS-InfoNCE). No gradient flows to them.
        gaussian_weight: GS-InfoNCE's lambda, as a weight: ``log(gaussian_weight)`` is
            added to every Gaussian logit.
        generator: ``torch.Generator`` (on the inputs' device) for the Gaussian draws, for
            reproducibility.
        labels: optional N integer targets, each a candidate column in ``[0, N + N_h + Q)``;
            the default is ``i`` (positive i). Not allowed with ``symmetric``.
        symmetric: also score each positive against all anchors (the column direction of
            the in-batch block) and average the two losses per row, as CLIP does.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-row losses, length N).
        normalize: L2-normalize every row (cosine similarity); False uses raw dot products.
        eps: the normalization's lower bound on a norm.
        backend: ``"auto"`` (default: the dense reference for tiny batches, the Triton
            kernels on CUDA and under ``TRITON_INTERPRET=1``, on CPU the compiled native
            kernel when the extension is built, else the chunked PyTorch path), or
            ``"triton"``, ``"torch"``, ``"native"``, ``"reference"`` to force one.
        check_finite: check the inputs for NaN / inf before computing (one device sync
            per call, shared with the label and temperature checks).
        groups: optional N integer group ids (token-level InfoNCE, e.g. TaCL: one id per
            sequence). Anchor i's positives and hard negatives are then only those of rows
            in its own group; extra and Gaussian negatives stay shared by all groups.
            Rows sorted by group (sequence after sequence) let the kernels skip every tile
            whose rows and columns share no group. See :func:`fastcl.token_info_nce` for
            the padded (batch x length x D) form. Not allowed with ``labels``.

    Returns:
        The reduced loss (a scalar), or the N per-row losses for ``reduction="none"``; in
        float32 for float16 / bfloat16 inputs (as cross-entropy under autocast), else in
        the input dtype.

    Raises:
        TypeError / ValueError, before any kernel runs, for inputs it cannot compute:
        wrong ranks or shapes, empty batches, mixed devices or dtypes, integer dtypes,
        non-finite values, temperature or weights <= 0, labels out of range.
    """
    _check_options(temperature, hard_negative_weight, gaussian_negatives, gaussian_weight, reduction, backend)
    _check_tensors(anchors, positives, hard_negatives, extra_negatives, labels, temperature, symmetric,
                   check_finite, groups)
    n, dim = anchors.shape
    gaussian = _gaussian(gaussian_negatives, anchors, generator)
    n_hard = n if hard_negatives is not None else 0
    n_extra = extra_negatives.shape[0] if extra_negatives is not None else 0
    n_cols = n + n_hard + n_extra + gaussian_negatives
    chosen = _choose_backend(backend, anchors.device, n * n_cols)
    if chosen == "reference":
        loss = info_nce_reference(
            anchors, positives, hard_negatives, extra_negatives, gaussian, temperature=temperature,
            hard_negative_weight=hard_negative_weight, gaussian_weight=gaussian_weight, labels=labels,
            symmetric=symmetric, reduction=reduction, normalize=normalize, eps=eps, groups=groups)
        return loss.to(_output_dtype(anchors.dtype))

    normalize_here, fused_eps = split_normalization(normalize, eps, chosen)
    q = unit_rows(anchors, normalize_here, eps)
    k_grad = unit_rows(positives if hard_negatives is None else torch.cat([positives, hard_negatives]),
                       normalize_here, eps)
    layout = ColumnLayout(
        n_cols=n_cols, n_grad_cols=n + n_hard, hard_start=n, n_hard=n_hard, gauss_start=n + n_hard + n_extra,
        log_hard_weight=math.log(hard_negative_weight), log_gauss_weight=math.log(gaussian_weight))
    inv_tau = inverse_temperature(temperature, anchors)
    targets = labels.to(torch.int64).contiguous() if labels is not None else None
    row_groups = group_ids = None
    if groups is not None:
        # (row groups, candidate groups): positives and hard negatives share their row's group.
        row_groups = groups.to(torch.int64).contiguous()
        group_ids = (row_groups, row_groups if n_hard == 0 else torch.cat([row_groups, row_groups]))

    # One pass (fastcl/ops/one_pass.py): a reduced loss gets its gradients in the forward.
    plan = plan_one_pass(reduction=reduction, needs_grad=needs_gradient(anchors, positives, hard_negatives, inv_tau),
                         backend=chosen, device=anchors.device, n_rows=n, n_cols=n_cols, n_grad_cols=n + n_hard,
                         dim=dim, dtype=anchors.dtype, grouped=groups is not None)
    if plan.one_pass:
        return one_pass_loss(q, k_grad, constant_rows(extra_negatives, gaussian, normalize_here, eps), inv_tau,
                             targets, layout, chosen, group_ids, fused_eps, reduction, plan, symmetric,
                             None if groups is None else (row_groups, row_groups))
    per_row = InfoNCEFunction.apply(q, k_grad, constant_rows(extra_negatives, gaussian, normalize_here, eps),
                                    inv_tau, targets, layout, chosen, group_ids, fused_eps)
    if symmetric:
        # Column direction of the in-batch block: positive j against every anchor.
        per_col = InfoNCEFunction.apply(k_grad[:n], q, None, inv_tau, None, ColumnLayout.plain(n), chosen,
                                        None if groups is None else (row_groups, row_groups), fused_eps)
        per_row = (per_row + per_col) / 2
    return reduce_rows(per_row, reduction, anchors.dtype)


# Building blocks shared with fastcl.distributed.


def split_normalization(normalize: bool, eps: float, backend: str) -> tuple[bool, float | None]:
    """Where the rows get normalized: ``(normalize them here, normalize_eps for the kernels)``.

    The kernel backends (Triton, native, chunked) normalize on the fly, one inverse norm
    per row, so the unit rows and their gradients, 4 (N + M) D values, never exist; only
    the dense reference takes rows normalized beforehand.
    """
    if normalize and backend in FUSED_NORMALIZATION:
        return False, eps
    return normalize, None


def unit_rows(x: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """Rows L2-normalized (or not), contiguous. The kernels read rows with unit column
    stride; F.normalize keeps the strides of a transposed input, so contiguity is asked
    for after it."""
    return (F.normalize(x, dim=-1, eps=eps) if normalize else x).contiguous()


def constant_rows(extra: torch.Tensor | None, gaussian: torch.Tensor | None, normalize: bool,
                  eps: float) -> torch.Tensor | None:
    """The candidates that get no gradient, ``[extra; gaussian]``, detached, or None."""
    parts = [unit_rows(x.detach(), normalize, eps) for x in (extra, gaussian) if x is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def inverse_temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 / tau as a 0-dim tensor on ``like``'s device (differentiable if tau is)."""
    if isinstance(temperature, torch.Tensor):
        return 1.0 / temperature.reshape(())
    # torch.full fills on the device; torch.tensor(..., device="cuda") would copy from the
    # host and wait for all queued work first.
    return torch.full((), 1.0 / temperature, dtype=accumulator_dtype(like.dtype), device=like.device)


def reduce_rows(per_row: torch.Tensor, reduction: str, input_dtype: torch.dtype) -> torch.Tensor:
    per_row = per_row.to(_output_dtype(input_dtype))
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def _gaussian(count: int, anchors: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    if not count:
        return None
    if torch.compiler.is_compiling():
        # A torch.Generator cannot enter a compiled graph, and the compiler's own random
        # numbers differ from eager ones: draw inside an opaque operator that makes
        # exactly the eager call, on the same generator (so the same numbers).
        return torch.ops.fastcl.gaussian_negatives(anchors.detach(), count, _generator_slot(generator))
    if generator is not None and generator.device.type != anchors.device.type:
        raise ValueError(f"generator is on {generator.device} but anchors are on {anchors.device}")
    return draw_gaussian_negatives(count, anchors.shape[1], anchors.dtype, anchors.device, generator)


#: What compiled graphs draw from, by slot (id): a torch.Generator, or an InfoNCELoss
#: whose generator is made from its seed at the first draw (a Generator cannot be
#: created inside a graph). Slot -1 is PyTorch's global generator. Filled while tracing
#: only, so it holds the generators of compiled graphs and no others.
_GENERATORS: dict[int, object] = {}


@torch.compiler.assume_constant_result  # run for real while tracing; the graph keeps the int
def _generator_slot(source) -> int:
    if source is None:
        return -1
    _GENERATORS[id(source)] = source
    return id(source)


# torch.library.custom_op takes tags from torch 2.5 on.
_SEEDED = ({"tags": (torch.Tag.nondeterministic_seeded,)}
           if "tags" in inspect.signature(torch.library.custom_op).parameters else {})


@torch.library.custom_op("fastcl::gaussian_negatives", mutates_args=(), **_SEEDED)
def _gaussian_negatives_op(like: torch.Tensor, count: int, generator_slot: int) -> torch.Tensor:
    """``count`` x D draws on ``like``'s device and dtype from the generator in the slot.

    Tagged nondeterministic_seeded so that the compiler never recomputes it in the
    backward (which would draw different numbers). Two draws with identical arguments
    in one compiled graph could still be merged by common-subexpression elimination;
    a loss makes one draw per call, from its own anchors."""
    if generator_slot != -1 and generator_slot not in _GENERATORS:
        raise RuntimeError("this graph was traced in another process: the generator of its Gaussian negatives "
                           "does not exist here. Trace (or export) it again in this process.")
    generator = None if generator_slot == -1 else _GENERATORS[generator_slot]
    if isinstance(generator, InfoNCELoss):
        generator = generator._generator_for(like.device)
    if generator is not None and generator.device.type != like.device.type:
        raise ValueError(f"generator is on {generator.device} but anchors are on {like.device}")
    return draw_gaussian_negatives(count, like.shape[1], like.dtype, like.device, generator)


@_gaussian_negatives_op.register_fake
def _(like: torch.Tensor, count: int, generator_slot: int) -> torch.Tensor:
    return like.new_empty((count, like.shape[1]))


class InfoNCELoss(nn.Module):
    """InfoNCE loss module; see :func:`info_nce` for what every argument means.

    Defaults follow SimCSE (cosine similarity, temperature 0.05, mean reduction)::

        loss_fn = InfoNCELoss(temperature=0.05)
        loss = loss_fn(anchors, positives)                    # unsupervised SimCSE
        loss = loss_fn(anchors, positives, hard_negatives=h)  # supervised SimCSE
        InfoNCELoss(hard_negative_weight=2.0)                 # SimCSE's alpha, as a weight
        InfoNCELoss(gaussian_negatives=192, gaussian_weight=1.0, seed=0)  # GS-InfoNCE
        InfoNCELoss(temperature=nn.Parameter(torch.tensor(0.05)))         # learnable tau
        InfoNCELoss(symmetric=True)                           # CLIP-style, both directions

    sentence-transformers' ``MultipleNegativesRankingLoss(scale=20.0)`` is
    ``InfoNCELoss(temperature=1 / 20.0)``.

    A temperature given as an ``nn.Parameter`` is registered as this module's parameter,
    so ``loss_fn.parameters()`` hands it to the optimizer. Gaussian negatives are drawn
    from ``generator`` if given, else from a generator seeded with ``seed`` (created on
    the inputs' device at the first call), else from PyTorch's global generator. Under
    torch.compile / torch.export they are drawn by an opaque operator from that same
    generator, so a compiled step draws exactly what the eager step would.
    """

    def __init__(
        self,
        temperature: float | torch.Tensor = 0.05,
        *,
        hard_negative_weight: float = 1.0,
        gaussian_negatives: int = 0,
        gaussian_weight: float = 1.0,
        symmetric: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
        eps: float = 1e-12,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        _check_options(temperature, hard_negative_weight, gaussian_negatives, gaussian_weight, reduction, backend)
        if isinstance(temperature, torch.Tensor) and not isinstance(temperature, nn.Parameter):
            if bool((temperature.detach() <= 0).any()):
                raise ValueError(f"temperature must be > 0, got {temperature.item()}")
        self.temperature = temperature
        self.hard_negative_weight = float(hard_negative_weight)
        self.gaussian_negatives = int(gaussian_negatives)
        self.gaussian_weight = float(gaussian_weight)
        self.symmetric = bool(symmetric)
        self.reduction = reduction
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.seed = seed
        self.generator = generator
        self.backend = backend
        self.check_finite = bool(check_finite)

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.generator is not None or self.seed is None:
            return self.generator
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        return self.generator

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        extra_negatives: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.gaussian_negatives:
            generator = None
        elif torch.compiler.is_compiling():
            generator = self  # resolved inside the drawing operator, outside the graph
        else:
            generator = self._generator_for(anchors.device)
        return info_nce(
            anchors, positives, hard_negatives, extra_negatives,
            temperature=self.temperature, hard_negative_weight=self.hard_negative_weight,
            gaussian_negatives=self.gaussian_negatives, gaussian_weight=self.gaussian_weight,
            generator=generator, labels=labels, symmetric=self.symmetric, reduction=self.reduction,
            normalize=self.normalize, eps=self.eps, backend=self.backend, check_finite=self.check_finite,
            groups=groups)

    def extra_repr(self) -> str:
        tau = self.temperature if not isinstance(self.temperature, torch.Tensor) else "learnable"
        parts = [f"temperature={tau}"]
        if self.hard_negative_weight != 1.0:
            parts.append(f"hard_negative_weight={self.hard_negative_weight}")
        if self.gaussian_negatives:
            parts.append(f"gaussian_negatives={self.gaussian_negatives}, gaussian_weight={self.gaussian_weight}")
        if self.symmetric:
            parts.append("symmetric=True")
        parts.append(f"reduction={self.reduction!r}")
        if not self.normalize:
            parts.append("normalize=False")
        return ", ".join(parts)
