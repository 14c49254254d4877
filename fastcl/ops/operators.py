"""The dispatcher operators ``torch.ops.fastcl.*``: schemas, fake kernels, CUDA kernels.

One operator per kernel family, with the arguments and outputs of its launcher (the
layout flattened into its fields, the optional ``groups`` pair into two optional
tensors: a schema takes no tuples)::

    infonce_fwd(q, k, params, targets, *layout9, row_groups, key_groups, *trailing)
        -> (lse, target_logit)                       CPU: csrc/, CUDA: infonce_fwd.py
    infonce_bwd(q, k, params, targets, *layout9, row_groups, key_groups,
                lse, grad_rows, need_dq, need_dk, *trailing)
        -> (dq, dk, row_dot)                         CPU: csrc/, CUDA: infonce_bwd_slab.py
    infonce_bwd_workspace(same arguments as infonce_bwd)
        -> (dq, dk, row_dot)                         CUDA: infonce_bwd_workspace.py
    infonce_fwd_grad(q, k, params, targets, *layout9, row_groups, key_groups, row_weight,
                     need_dq, need_dk, block_rows, block_cols, *trailing)
        -> (loss_rows, dq, dk, row_dot)              CPU: csrc/, CUDA: infonce_one_pass.py

``layout9`` is the layout's first nine fields (:data:`N_LAYOUT_FIELDS`), ``trailing``
the arguments with defaults ``normalize_eps=None, n_hard_blocks=1, hardness_mode=0,
hardness_strength=0., thresholds=None, guide_rows=None, guide_cols=None,
guide_thresholds=None``: the layout's per-entry rules (:data:`RULE_FIELDS`), the
false-negative margin's per-row thresholds and the guide rule's tensors
(:class:`~fastcl.ops.layout.GuideMask`). The CPU kernels (C++) and the CUDA kernels
(Triton) compute them all (fastcl.ops.dispatch.FEATURES).

The last is the one pass for a loss reduced to a scalar: the per-row losses together with
the gradients for every row's incoming gradient ``row_weight``, in the accumulator dtype
(``block_rows`` x ``block_cols``: the CPU kernel's blocks, 0 lets the kernel choose; on
CUDA ``block_rows`` is the chunk of the logit workspace).

``normalize_eps`` (when not None) makes the operators take raw rows and score their
cosines, as if every row of q and k had gone through ``F.normalize(x, dim=-1,
eps=normalize_eps)``; the backward then returns the gradients with respect to the raw
rows (fastcl/ops/normalize.py).

The CPU kernels come from the native extension (csrc/, loaded by :mod:`fastcl.native`),
which also defines the first two schemas (csrc/registration.cpp holds the same strings
as :data:`SCHEMAS`; a test checks); without it the schemas are defined here, so the CUDA
and fake kernels, and torch.compile on GPUs, work either way. Under torch.compile /
torch.export the fake kernels give output shapes, so a compiled graph holds each
operator as one opaque call. A gradient the backward is not asked for comes back as an
empty tensor (a schema cannot return None); the wrappers :func:`operator_forward`,
:func:`operator_backward` and :func:`operator_backward_workspace` turn those into None.
Triton is imported only when a CUDA kernel runs.
"""

from __future__ import annotations

import torch

from .. import native
from .configs import one_pass_cpu_blocks
from .layout import ColumnLayout, GuideMask
from .utils import accumulator_dtype, cpu_threads

_LAYOUT_SCHEMA = ("int n_cols, int n_grad_cols, int hard_start, int n_hard, int gauss_start, float log_hard_weight, "
                  "float log_gauss_weight, int self_start, int n_self, Tensor? row_groups, Tensor? key_groups")
#: The trailing arguments of every operator: the fused normalization's eps, the layout's
#: per-entry rules (its fields after the first nine), the false-negative margin's
#: per-row thresholds and the guide rule's three tensors. Their defaults leave the nine-field operators as they were.
_RULES_SCHEMA = ("float? normalize_eps=None, int n_hard_blocks=1, int hardness_mode=0, float hardness_strength=0., "
                 "Tensor? thresholds=None, Tensor? guide_rows=None, Tensor? guide_cols=None, "
                 "Tensor? guide_thresholds=None")
_BACKWARD_SCHEMA = (f"(Tensor q, Tensor k, Tensor params, Tensor? targets, {_LAYOUT_SCHEMA}, Tensor lse, "
                    f"Tensor grad_rows, bool need_dq, bool need_dk, {_RULES_SCHEMA}) "
                    "-> (Tensor dq, Tensor dk, Tensor row_dot)")

#: The schemas of the operators with a CPU kernel; csrc/registration.cpp defines the same
#: strings when the extension is loaded.
SCHEMAS = {
    "infonce_fwd": (f"infonce_fwd(Tensor q, Tensor k, Tensor params, Tensor? targets, {_LAYOUT_SCHEMA}, "
                    f"{_RULES_SCHEMA}) -> (Tensor lse, Tensor target_logit)"),
    "infonce_bwd": "infonce_bwd" + _BACKWARD_SCHEMA,
    "infonce_fwd_grad": (f"infonce_fwd_grad(Tensor q, Tensor k, Tensor params, Tensor? targets, {_LAYOUT_SCHEMA}, "
                         "float row_weight, bool need_dq, bool need_dk, int block_rows, int block_cols, "
                         f"{_RULES_SCHEMA}) -> (Tensor loss_rows, Tensor dq, Tensor dk, Tensor row_dot)"),
}
#: Operators with CUDA kernels only, always defined here.
CUDA_ONLY_SCHEMAS = {"infonce_bwd_workspace": "infonce_bwd_workspace" + _BACKWARD_SCHEMA}

#: The layout fields the schema carries after ``targets``: the first nine. The rest (the
#: per-entry rules: several hard negatives per row, the hardness penalty) travel among
#: the trailing arguments, after ``normalize_eps``.
N_LAYOUT_FIELDS = 9
#: The layout's fields among the trailing arguments, in order.
RULE_FIELDS = ColumnLayout._fields[N_LAYOUT_FIELDS:]


def _split(rest, n_args: int):
    """The operator's arguments after ``targets`` as the launchers take them: the layout
    (its rules included), the groups pair (None without groups), the ``n_args``
    arguments of the operator's own, ``normalize_eps``, the thresholds and the guide (a
    :class:`~fastcl.ops.layout.GuideMask`, or None). Trailing arguments left out take
    the schema's defaults."""
    layout = ColumnLayout(*rest[:N_LAYOUT_FIELDS])
    row_groups, key_groups, *tail = rest[N_LAYOUT_FIELDS:]
    own, trailing = tail[:n_args], tail[n_args:]
    trailing = trailing + [None] * (1 + len(RULE_FIELDS) + 4 - len(trailing))
    normalize_eps = trailing[0]
    rules = [r for r in trailing[1:1 + len(RULE_FIELDS)] if r is not None]
    layout = layout._replace(**dict(zip(RULE_FIELDS, rules)))
    thresholds, *guide = trailing[1 + len(RULE_FIELDS):]
    guide = GuideMask(*guide) if guide[2] is not None else None
    return layout, (None if row_groups is None else (row_groups, key_groups)), own, normalize_eps, thresholds, guide


# ------------------------------------------------------------------ fake and CUDA kernels


def _fake_forward(q, k, params, targets, *rest):
    acc = accumulator_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape[0], dtype=acc)


def _fake_backward(q, k, params, targets, *rest):
    layout, _, (_, _, need_dq, need_dk), _, _, _ = _split(rest, 4)
    n_rows, dim = q.shape
    dq = q.new_empty((n_rows if need_dq else 0, dim))
    dk = q.new_empty((layout.n_grad_cols if need_dk and layout.n_grad_cols > 0 else 0, dim))
    return dq, dk, q.new_empty(n_rows if need_dq else 0, dtype=accumulator_dtype(q.dtype))


def _cuda_forward(q, k, params, targets, *rest):
    from .infonce_fwd import infonce_forward

    layout, groups, _, normalize_eps, thresholds, guide = _split(rest, 0)
    return infonce_forward(q.contiguous(), k.contiguous(), params, targets, layout, groups=groups,
                           normalize_eps=normalize_eps, thresholds=thresholds, guide=guide)


def _run_backward(launcher, q, k, params, targets, rest):
    """A backward launcher's results with the schema's empty tensors for None."""
    layout, groups, (lse, grad_rows, need_dq, need_dk), normalize_eps, thresholds, guide = _split(rest, 4)
    dq, dk, row_dot = launcher(q.contiguous(), k.contiguous(), params, targets, layout, lse, grad_rows,
                               need_dq=need_dq, need_dk=need_dk, groups=groups, normalize_eps=normalize_eps,
                               thresholds=thresholds, guide=guide)
    dim = q.shape[1]
    return (dq if dq is not None else q.new_empty((0, dim)),
            dk if dk is not None else q.new_empty((0, dim)),
            row_dot if row_dot is not None else q.new_empty(0, dtype=accumulator_dtype(q.dtype)))


def _cuda_backward(q, k, params, targets, *rest):
    from .infonce_bwd_slab import infonce_backward_slab

    return _run_backward(infonce_backward_slab, q, k, params, targets, rest)


def _cuda_backward_workspace(q, k, params, targets, *rest):
    from .infonce_bwd_workspace import infonce_backward_workspace

    return _run_backward(infonce_backward_workspace, q, k, params, targets, rest)


def _fake_forward_grad(q, k, params, targets, *rest):
    layout, _, (_, need_dq, need_dk, _, _), _, _, _ = _split(rest, 5)
    n_rows, dim = q.shape
    acc = accumulator_dtype(q.dtype)
    n_grad = layout.n_grad_cols if need_dk else 0
    return (q.new_empty(n_rows, dtype=acc), q.new_empty((n_rows if need_dq else 0, dim), dtype=acc),
            q.new_empty((n_grad, dim), dtype=acc), q.new_empty(n_rows if need_dq else 0, dtype=acc))


def _cuda_forward_grad(q, k, params, targets, *rest):
    from .infonce_one_pass import infonce_forward_grad

    layout, groups, (row_weight, need_dq, need_dk, block_rows, _), normalize_eps, thresholds, guide = _split(rest, 5)
    return infonce_forward_grad(q.contiguous(), k.contiguous(), params, targets, layout, row_weight, need_dq, need_dk,
                                groups=groups, normalize_eps=normalize_eps, chunk_rows=block_rows,
                                thresholds=thresholds, guide=guide)


_library = torch.library.Library("fastcl", "FRAGMENT")  # the schemas this module defines


def _register() -> None:
    defined_here = dict(CUDA_ONLY_SCHEMAS, **({} if native.available() else SCHEMAS))
    for schema in defined_here.values():
        _library.define(schema)
    for name, fake, cuda in (("infonce_fwd", _fake_forward, _cuda_forward),
                             ("infonce_bwd", _fake_backward, _cuda_backward),
                             ("infonce_bwd_workspace", _fake_backward, _cuda_backward_workspace),
                             ("infonce_fwd_grad", _fake_forward_grad, _cuda_forward_grad)):
        torch.library.register_fake(f"fastcl::{name}", lib=_library)(fake)
        torch.library.register_kernel(f"fastcl::{name}", "cuda", lib=_library)(cuda)


_register()


# ------------------------------------------------------------------------ the wrappers


def _require_kernel(q: torch.Tensor) -> None:
    if q.device.type == "cpu" and not native.available():
        raise RuntimeError("backend 'cpp' (the native CPU kernel, also backend='native' on CPU tensors) needs "
                           f"fastcl's compiled extension, which is unavailable: {native.status().reason}. "
                           "See docs/building.md.")


def _call(op, q, k, params, targets, layout: ColumnLayout, groups, own, normalize_eps, thresholds, guide=None):
    """``op`` with the schema's arguments: the layout's first fields, the groups pair,
    the operator's ``own`` arguments, then the trailing ones (normalize_eps, the layout's
    rules, the thresholds, the guide's tensors)."""
    row_groups, key_groups = groups if groups is not None else (None, None)
    return op(q, k, params, targets, *layout[:N_LAYOUT_FIELDS], row_groups, key_groups, *own, normalize_eps,
              *layout[N_LAYOUT_FIELDS:], thresholds, *(guide if guide is not None else (None, None, None)))


def operator_forward(q, k, params, targets, layout: ColumnLayout, groups=None, normalize_eps=None, thresholds=None,
                     guide: GuideMask | None = None):
    """``(lse, target_logit)`` from ``torch.ops.fastcl.infonce_fwd`` (any device), with
    the arguments of :func:`~fastcl.ops.infonce_fwd.infonce_forward`, the
    false-negative margin's per-row ``thresholds`` and the ``guide`` (CPU only)."""
    _require_kernel(q)
    return _call(torch.ops.fastcl.infonce_fwd, q, k, params, targets, layout, groups, (), normalize_eps, thresholds,
                 guide)


def asked_for(dq, dk, row_dot, need_dq: bool, need_dk: bool, layout: ColumnLayout):
    """``(dq, dk, row_dot)`` with None for what was not asked for (a schema returns an
    empty tensor there; dk also when no column takes a gradient)."""
    return ((dq if need_dq else None), (dk if need_dk and layout.n_grad_cols > 0 else None),
            (row_dot if need_dq else None))


def _backward(op, q, k, params, targets, layout, lse, grad_rows, need_dq, need_dk, groups, normalize_eps, thresholds,
              guide):
    dq, dk, row_dot = _call(op, q, k, params, targets, layout, groups, (lse, grad_rows, need_dq, need_dk),
                            normalize_eps, thresholds, guide)
    return asked_for(dq, dk, row_dot, need_dq, need_dk, layout)


def operator_backward(q, k, params, targets, layout: ColumnLayout, lse, grad_rows,
                      need_dq: bool = True, need_dk: bool = True, groups=None, normalize_eps=None, thresholds=None,
                      guide: GuideMask | None = None):
    """``(dq, dk, row_dot)`` from ``torch.ops.fastcl.infonce_bwd`` (the native kernel on
    CPU, the slab kernels on CUDA), None where not asked for."""
    _require_kernel(q)
    return _backward(torch.ops.fastcl.infonce_bwd, q, k, params, targets, layout, lse, grad_rows, need_dq, need_dk,
                     groups, normalize_eps, thresholds, guide)


def operator_backward_workspace(q, k, params, targets, layout: ColumnLayout, lse, grad_rows,
                                need_dq: bool = True, need_dk: bool = True, groups=None, normalize_eps=None,
                                thresholds=None, guide: GuideMask | None = None):
    """``(dq, dk, row_dot)`` from ``torch.ops.fastcl.infonce_bwd_workspace`` (CUDA)."""
    return _backward(torch.ops.fastcl.infonce_bwd_workspace, q, k, params, targets, layout, lse, grad_rows, need_dq,
                     need_dk, groups, normalize_eps, thresholds, guide)


def operator_forward_grad(q, k, params, targets, layout: ColumnLayout, groups=None, normalize_eps=None,
                          need_dq: bool = True, need_dk: bool = True, thresholds=None, guide: GuideMask | None = None):
    """``(loss_rows, dq, dk, row_dot)`` from ``torch.ops.fastcl.infonce_fwd_grad`` (the
    native one-pass kernel on CPU, the Triton one pass on CUDA) for row gradients of 1,
    None where not asked for. The CPU blocks come from
    :func:`~fastcl.ops.configs.one_pass_cpu_blocks`, the rule the plan applied."""
    _require_kernel(q)
    block_rows, block_cols = 0, 0
    if q.device.type == "cpu":
        block_rows, block_cols = one_pass_cpu_blocks(q.shape[0], layout.n_cols, layout.n_grad_cols, q.shape[1],
                                                     cpu_threads(), groups is not None)
    loss_rows, dq, dk, row_dot = _call(torch.ops.fastcl.infonce_fwd_grad, q, k, params, targets, layout, groups,
                                       (1.0, need_dq, need_dk, block_rows, block_cols), normalize_eps, thresholds,
                                       guide)
    return (loss_rows, *asked_for(dq, dk, row_dot, need_dq, need_dk, layout))
