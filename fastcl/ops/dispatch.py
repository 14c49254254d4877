"""One table: (device type, backend, backward strategy) -> the forward and backward that run.

Backends (the names say what runs):

- ``"triton"``: the Triton kernels. On CUDA tensors through the dispatcher operators
  (:mod:`fastcl.ops.operators`), so that torch.compile sees one opaque call; on CPU
  tensors (Triton's interpreter, ``TRITON_INTERPRET=1``) the launchers themselves.
- ``"cpp"``: the native C++ CPU kernel (csrc/), through the operators; on meta tensors
  their fake kernels, which give shapes.
- ``"chunked"``: the same arithmetic in chunked PyTorch (:mod:`fastcl.ops.chunked`).

Backward strategies: ``"slab"`` (infonce_bwd_slab.py: the similarity recomputed per D
slab of each gradient, no buffer) and ``"workspace"`` (the logit gradients of a block
of rows in a bounded buffer, then matrix products: infonce_bwd_workspace.py on the GPU,
and how the native kernel and the chunked path work). Every entry keeps memory
O((N + M) D) plus a bounded buffer: the forward returns one log-sum-exp and one target
logit per row, and the backward recomputes the rest.

An entry is a :class:`Kernels` pair with the launchers' contract (the arguments of
:func:`~fastcl.ops.infonce_fwd.infonce_forward` and
:func:`~fastcl.ops.infonce_bwd_slab.infonce_backward_slab`). A strategy that forms the
gradients in the forward (one pass, for losses reduced to a scalar) is an entry whose
``backward`` is None; see :class:`Kernels`. Triton is imported only when one of its
entries is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from . import operators
from .layout import ColumnLayout


class Kernels(NamedTuple):
    """One entry of the table.

    ``forward(q, k, params, targets, layout, groups=None, normalize_eps=None)`` returns
    ``(lse, target_logit)``, and ``backward(q, k, params, targets, layout, lse, grad_rows,
    need_dq=True, need_dk=True, groups=None, normalize_eps=None)`` returns ``(dq, dk,
    row_dot)``. Entries that compute the false-negative margin (:data:`FEATURES`) also
    take ``thresholds=`` (one per row, see :class:`~fastcl.ops.layout.ColumnLayout`), and
    those that compute the guide rule ``guide=`` (a :class:`~fastcl.ops.layout.GuideMask`);
    the others are never handed them. An entry whose ``backward`` is None forms the gradients
    in its forward: ``forward(..., need_dq=..., need_dk=...)`` then returns ``(loss_rows, dq, dk,
    row_dot)`` for incoming row gradients of 1, and the autograd Function scales them by
    the incoming gradient (which is uniform: the plan offers such strategies only to
    losses reduced to a scalar, see :data:`GRADIENTS_IN_FORWARD`).
    """

    forward: Callable
    backward: Callable | None


class KernelPlan(NamedTuple):
    """What one application of the fused loss runs, resolved by :mod:`fastcl.plan`: the
    column layout, the backend and backward strategy (a key of :data:`TABLE` with the
    device type), and ``normalize_eps``: None when the rows are scored as given, else
    the kernels normalize every row on the fly as ``F.normalize(x, dim=-1,
    eps=normalize_eps)`` would (fastcl/ops/normalize.py)."""

    layout: ColumnLayout
    backend: str
    backward: str
    normalize_eps: float | None = None


def _triton(strategy: str) -> Kernels:
    from .infonce_fwd import infonce_forward

    if strategy == "slab":
        from .infonce_bwd_slab import infonce_backward_slab as backward
    else:
        from .infonce_bwd_workspace import infonce_backward_workspace as backward
    return Kernels(infonce_forward, backward)


def _triton_one_pass() -> Kernels:
    from .infonce_one_pass import infonce_forward_grad

    def forward(q, k, params, targets, layout, groups=None, normalize_eps=None, need_dq=True, need_dk=True,
                thresholds=None, guide=None):
        loss_rows, dq, dk, row_dot = infonce_forward_grad(q, k, params, targets, layout, 1.0, need_dq, need_dk,
                                                          groups=groups, normalize_eps=normalize_eps,
                                                          thresholds=thresholds, guide=guide)
        return (loss_rows, *operators.asked_for(dq, dk, row_dot, need_dq, need_dk, layout))

    return Kernels(forward, None)


def _chunked() -> Kernels:
    from .chunked import chunked_backward, chunked_forward

    return Kernels(chunked_forward, chunked_backward)


#: (device type, backend, backward strategy) -> a function that returns the entry.
TABLE: dict[tuple[str, str, str], Callable[[], Kernels]] = {
    ("cuda", "triton", "slab"): lambda: Kernels(operators.operator_forward, operators.operator_backward),
    ("cuda", "triton", "workspace"): lambda: Kernels(operators.operator_forward,
                                                     operators.operator_backward_workspace),
    ("cuda", "triton", "one_pass"): lambda: Kernels(operators.operator_forward_grad, None),
    ("cpu", "triton", "slab"): lambda: _triton("slab"),  # Triton's interpreter
    ("cpu", "triton", "workspace"): lambda: _triton("workspace"),
    ("cpu", "triton", "one_pass"): _triton_one_pass,
    ("cpu", "cpp", "workspace"): lambda: Kernels(operators.operator_forward, operators.operator_backward),
    ("cpu", "cpp", "one_pass"): lambda: Kernels(operators.operator_forward_grad, None),
    ("meta", "cpp", "workspace"): lambda: Kernels(operators.operator_forward, operators.operator_backward),
    ("meta", "cpp", "one_pass"): lambda: Kernels(operators.operator_forward_grad, None),
    ("cpu", "chunked", "workspace"): _chunked,
    ("cuda", "chunked", "workspace"): _chunked,
}

#: Strategies whose entries form the gradients in the forward (``backward`` None): only
#: for losses reduced to a scalar, whose incoming row gradients are all equal.
GRADIENTS_IN_FORWARD: frozenset[str] = frozenset({"one_pass"})


#: The per-entry rules beyond the original layout, by name, with the loss option that
#: needs each (the name a refusal gives): several hard negatives per row
#: (``ColumnLayout.n_hard_blocks`` > 1), a -inf ``log_hard_weight`` (a document's own
#: documents masked in doc_to_doc), the hardness penalty (``hardness_mode``), and the
#: false-negative margin (per-row ``thresholds``, with rows that may end up fully masked)
#: and the guide rule (a second model's rows and per-row thresholds).
LAYOUT_FEATURES: dict[str, str] = {
    "hard_blocks": "hard_negatives with K > 1 per anchor (N x K x D)",
    "masked_hard": "directions with 'doc_to_doc'",
    "hardness": "hardness_mode",
    "margin": "false_negative_margin",
    "guide": "guide_anchors / guide_candidates (the guide mask)",
}

#: Which of :data:`LAYOUT_FEATURES` each backend computes: the one place to change when
#: a kernel learns a rule. The dense path (fastcl/reference.py) computes all of them.
FEATURES: dict[str, frozenset[str]] = {
    "chunked": frozenset(LAYOUT_FEATURES),
    "cpp": frozenset(LAYOUT_FEATURES),  # forward, recomputing backward and one pass alike
    "triton": frozenset(LAYOUT_FEATURES),  # forward, slab and workspace backwards, one pass
}


def layout_features(layout: ColumnLayout, margin: bool = False, guide: bool = False) -> frozenset[str]:
    """The names of :data:`LAYOUT_FEATURES` that ``layout`` (and per-row thresholds, if
    ``margin``; the guide rule, if ``guide``) need."""
    needed = set()
    if layout.n_hard > 0 and layout.n_hard_blocks > 1:
        needed.add("hard_blocks")
    if layout.n_hard > 0 and layout.log_hard_weight == float("-inf"):
        needed.add("masked_hard")
    if layout.penalized:
        needed.add("hardness")
    if margin:
        needed.add("margin")
    if guide:
        needed.add("guide")
    return frozenset(needed)


def unsupported(backend: str, needed: frozenset[str]) -> tuple[str, ...]:
    """The options among ``needed`` (names of :data:`LAYOUT_FEATURES`) that ``backend``
    does not compute, as the loss's option names."""
    return tuple(LAYOUT_FEATURES[f] for f in sorted(needed - FEATURES.get(backend, frozenset())))


def strategies(device_type: str, backend: str) -> tuple[str, ...]:
    """The backward strategies ``backend`` offers on tensors of ``device_type``."""
    return tuple(s for d, b, s in TABLE if d == device_type and b == backend)


def strategies_of(backend: str) -> tuple[str, ...]:
    """The backward strategies ``backend`` offers on any device."""
    return tuple(sorted({s for _, b, s in TABLE if b == backend}))


def kernels(device_type: str, backend: str, strategy: str) -> Kernels:
    """The entry for tensors of ``device_type``; a ValueError names what runs where."""
    entry = TABLE.get((device_type, backend, strategy))
    if entry is None:
        offered = strategies(device_type, backend)
        if offered:
            raise ValueError(f"backend {backend!r} has no backward strategy {strategy!r} on {device_type} tensors; "
                             f"it offers {offered}")
        devices = sorted({d for d, b, _ in TABLE if b == backend})
        where = " and ".join(devices) if devices else "no"
        hint = " (on CPU tensors under TRITON_INTERPRET=1)" if backend == "triton" else ""
        raise ValueError(f"backend {backend!r} runs on {where} tensors{hint}, not on {device_type} tensors")
    return entry()
