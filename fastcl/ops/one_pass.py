"""One pass for a reduced loss: the gradients formed in the forward, 6NMD instead of 8NMD.

The recomputing path (:class:`fastcl.ops.infonce.InfoNCEFunction`) forms the logits
S = q k^T twice: once in the forward for the row log-sum-exps (2NMD FLOPs), again in the
backward before the two gradient products (6NMD). When the loss is reduced to a scalar
(``reduction="mean"`` or ``"sum"``), every row's incoming gradient is the same weight w
(1/N or 1) times the one scalar g that autograd passes to the backward. So the forward
can form the gradients with respect to q and k for g = 1, a chunk of rows at a time (S of
the chunk once, its softmax, the chunk's dq, dk accumulated), and the backward only
scales them by g: 6NMD, with memory O((N + M) D) (the gradients, kept from the forward
to the backward) plus a bounded strip of logits per chunk. The compiled dense loss also
does 6NMD, but holds N x M logits.

:func:`plan_one_pass` is the rule that picks the path and the block sizes; the kernels
are ``torch.ops.fastcl.infonce_fwd_grad`` (csrc/infonce_one_pass.cpp on CPU tensors, the
Triton launcher of :mod:`fastcl.ops.infonce_one_pass` on CUDA tensors).

The price: a forward in grad mode whose backward never runs did the gradient work for
nothing (evaluate under ``torch.no_grad()``, which takes the 2NMD forward alone).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .infonce import kernel_params
from .layout import ColumnLayout

#: The value of FASTCL_BACKWARD that forces the one-pass path (where it applies); the
#: recomputing strategies' names ("slab", "workspace") force the recomputing path.
ONE_PASS = "one_pass"

#: Native CPU blocks: rows per chunk and columns per tile (with groups, smaller blocks
#: skip more: a block is skipped only when none of its rows shares a group with any of
#: its columns). FASTCL_CPU_TILE_ROWS / FASTCL_CPU_TILE_COLS override both.
CPU_ROWS, CPU_COLS = 256, 512
GROUPED_ROWS, GROUPED_COLS = 64, 64
#: Fewer rows per chunk than this make the dk product (a rank-R update of dk per chunk)
#: bound by memory traffic: the recomputing path is taken instead.
MIN_ROWS = 16
#: Strip elements per thread always allowed (the recomputing kernel holds two 256 x 512
#: blocks per thread, 2^18 elements).
STRIP_FLOOR = 1 << 18


class OnePassPlan(NamedTuple):
    """What :func:`plan_one_pass` chose: ``one_pass``, and for it ``block_rows`` (rows per
    chunk; on CUDA the chunk of the logit workspace) and ``block_cols`` (columns per tile,
    CPU only; 0 lets the kernel choose); ``reason`` says why, in words."""

    one_pass: bool
    block_rows: int
    block_cols: int
    reason: str


@torch.compiler.assume_constant_result  # read while tracing; the graph keeps the number
def _threads() -> int:
    return torch.get_num_threads()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def cpu_blocks(n_rows: int, n_cols: int, n_grad_cols: int, dim: int, threads: int, grouped: bool) -> tuple[int, int]:
    """Rows per chunk and columns per tile of the native one-pass kernel.

    256 x 512 blocks (512 KiB in fp32) stay in a core's L2 while the softmax runs on
    them and keep BLAS near its peak; at least one chunk per thread. Each thread holds a
    strip of ``rows x M`` logits (the chunk's, until its gradient products are done) and
    ``rows x D`` scaled rows; ``rows`` is capped so that the strips of all threads hold no
    more than the gradients themselves, ``(N + n_grad_cols) D`` values, or ``2^18``
    values per thread (what the recomputing kernel's blocks take): the extra memory of
    the one-pass path stays within twice the recomputing path's. With groups a strip
    holds only the tiles a chunk visits, a few sequences' columns, and is not capped.
    """
    rows = _env_int("FASTCL_CPU_TILE_ROWS")
    cols = _env_int("FASTCL_CPU_TILE_COLS") or (GROUPED_COLS if grouped else CPU_COLS)
    if rows is not None:
        return rows, cols
    rows = min(GROUPED_ROWS if grouped else CPU_ROWS, max(MIN_ROWS, -(-n_rows // max(threads, 1))))
    if not grouped:
        budget = max(STRIP_FLOOR, (n_rows + n_grad_cols) * dim // max(threads, 1))
        rows = min(rows, budget // (n_cols + dim))
    return max(1, min(rows, n_rows)), cols


def plan_one_pass(*, reduction: str, needs_grad: bool, backend: str, device: torch.device, n_rows: int,
                  n_cols: int, n_grad_cols: int, dim: int, dtype: torch.dtype, grouped: bool = False,
                  threads: int | None = None) -> OnePassPlan:
    """The one rule that picks the path: one pass, or forward then recomputing backward.

    One pass when all of these hold, else the recomputing path:

    1. ``reduction`` is "mean" or "sum" (per-row losses take a gradient per row, known
       only in the backward);
    2. ``needs_grad``: grad mode is on and some input (or the temperature) needs a
       gradient (otherwise the forward alone is 2NMD, and nothing is kept), and
       torch.export is not tracing (an exported program runs the forward only);
    3. the backend is "native" or "triton" (the chunked PyTorch path recomputes);
    4. on the native CPU kernel, a chunk keeps at least ``MIN_ROWS`` rows within the
       strip budget of :func:`cpu_blocks`;
    5. on Triton, no groups (the one pass's products run over every column, the slab
       backward skips the tiles without a common group).

    ``FASTCL_BACKWARD=one_pass`` skips rules 4 and 5 (as FASTCL_CPU_TILE_ROWS skips 4); ``FASTCL_BACKWARD=slab`` or ``workspace``
    takes the recomputing path (with that Triton backward). On CUDA the workspace of
    logits per chunk is capped as the workspace backward's (``FASTCL_WORKSPACE_BYTES``);
    the kernel derives its rows from the cap (``block_rows`` 0).
    """
    forced = os.environ.get("FASTCL_BACKWARD", "")
    if reduction not in ("mean", "sum"):
        return OnePassPlan(False, 0, 0, f"reduction={reduction!r}: per-row gradients come only in the backward")
    if not needs_grad:
        return OnePassPlan(False, 0, 0, "no gradient needed: the forward alone")
    if torch.compiler.is_exporting():
        return OnePassPlan(False, 0, 0, "torch.export records the forward: the forward alone")
    if backend not in ("native", "triton"):
        return OnePassPlan(False, 0, 0, f"backend {backend!r} recomputes")
    if forced and forced != ONE_PASS:
        return OnePassPlan(False, 0, 0, f"FASTCL_BACKWARD={forced}")
    if device.type == "cuda" or backend == "triton":
        if grouped and forced != ONE_PASS:
            # The one pass's products run over every column; the slab kernels skip the
            # tiles that share no group.
            return OnePassPlan(False, 0, 0, "groups on the GPU: the slab backward skips tiles")
        return OnePassPlan(True, 0, 0, "reduced loss with gradients: one pass (Triton)")
    threads = threads if threads is not None else _threads()
    rows, cols = cpu_blocks(n_rows, n_cols, n_grad_cols, dim, threads, grouped)
    if rows < MIN_ROWS and forced != ONE_PASS and _env_int("FASTCL_CPU_TILE_ROWS") is None:
        return OnePassPlan(False, 0, 0, f"{rows} rows per chunk within the strip budget: recompute")
    return OnePassPlan(True, rows, cols, f"reduced loss with gradients: one pass, {rows} x {cols} blocks")


def _forward_grad(q, k, params, targets, layout, row_weight, need_dq, need_dk, backend, groups, normalize_eps,
                  plan: OnePassPlan):
    """``(loss_rows, dq, dk, row_dot)`` from the backend's one-pass kernel."""
    if backend == "triton" and not q.is_cuda:  # Triton's interpreter: the launcher itself
        from .infonce_one_pass import infonce_forward_grad

        return infonce_forward_grad(q, k, params, targets, layout, row_weight, need_dq, need_dk, groups=groups,
                                    normalize_eps=normalize_eps, chunk_rows=plan.block_rows)
    from ..native import operator_forward_grad

    return operator_forward_grad(q, k, params, targets, layout, row_weight, need_dq, need_dk, groups=groups,
                                 normalize_eps=normalize_eps, block_rows=plan.block_rows, block_cols=plan.block_cols)


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph): then the saved
    gradients must stay as they are for the next backward. True when unknown."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except Exception:  # noqa: BLE001 - an older or newer torch without this query
        return True


def _scaled(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, in_place: bool) -> torch.Tensor:
    """``scale * grad`` in ``dtype``; in place when the saved gradient is not needed again."""
    if grad.dtype != dtype:
        return (grad * scale).to(dtype)  # scaled in fp32, then rounded once
    if torch.compiler.is_compiling():
        return grad * scale
    if scale.device.type == "cpu" and scale.item() == 1.0:  # a mean or sum at the end of the graph
        return grad if in_place else grad.clone()
    return grad.mul_(scale) if in_place else grad * scale


class OnePassFunction(torch.autograd.Function):
    """``scale * reduce(loss_i)`` (reduce: mean or sum over the N rows) of the InfoNCE
    losses, with its gradients formed in the forward.

    Arguments as :class:`fastcl.ops.infonce.InfoNCEFunction`'s (``q``, ``k_grad``,
    ``k_const``, ``inv_tau``, ``targets``, ``layout``, ``backend``, ``groups``,
    ``normalize_eps``), then ``reduction`` ("mean" or "sum"), ``scale`` (a float: 0.5 for
    each half of a symmetric loss) and ``plan`` (:func:`plan_one_pass`'s). Returns a
    scalar in the accumulator dtype (fp32, fp64 for fp64 inputs). The backward scales the
    saved gradients by the incoming gradient: in place, or not at all when it is exactly
    1 on the CPU, unless the graph is retained (``retain_graph=True``: then a scaled copy,
    so that every backward sees the same saved gradients).
    """

    @staticmethod
    def forward(ctx, q, k_grad, k_const, inv_tau, targets, layout: ColumnLayout, backend: str, groups,
                normalize_eps, reduction: str, scale: float, plan: OnePassPlan):
        k = k_grad if k_const is None else torch.cat([k_grad, k_const])
        params = kernel_params(inv_tau, layout, q.dtype)
        need_q, need_k, _, need_tau = ctx.needs_input_grad[:4]
        n_rows = q.shape[0]
        weight = scale / n_rows if reduction == "mean" else scale
        loss_rows, dq, dk, row_dot = _forward_grad(q, k, params, targets, layout, weight, need_q or need_tau, need_k,
                                                   backend, groups, normalize_eps, plan)
        loss = loss_rows.sum() * weight
        tau_grad = row_dot.sum() if need_tau else None
        ctx.save_for_backward(dq if need_q else None, dk, tau_grad)
        ctx.dtypes = (q.dtype, k_grad.dtype, inv_tau.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dq, dk, tau_grad = ctx.saved_tensors
        q_dtype, k_dtype, tau_dtype = ctx.dtypes
        in_place = not torch.compiler.is_compiling() and not _graph_is_kept()
        dq = _scaled(dq, grad, q_dtype, in_place) if dq is not None else None
        dk = _scaled(dk, grad, k_dtype, in_place) if dk is not None else None
        d_inv_tau = (grad * tau_grad).to(tau_dtype) if tau_grad is not None else None
        return dq, dk, None, d_inv_tau, None, None, None, None, None, None, None, None


def one_pass_loss(q, k_grad, k_const, inv_tau, targets, layout: ColumnLayout, backend: str, groups, normalize_eps,
                  reduction: str, plan: OnePassPlan, symmetric: bool = False, column_groups=None) -> torch.Tensor:
    """The reduced loss on the one-pass path; with ``symmetric``, the mean of the row
    direction and the column direction of the in-batch block (positive j against every
    anchor), each a one-pass call with half the weight. ``column_groups`` are the group
    ids of the column direction (``(row_groups, row_groups)``) when grouped."""
    n = q.shape[0]
    scale = 0.5 if symmetric else 1.0
    loss = OnePassFunction.apply(q, k_grad, k_const, inv_tau, targets, layout, backend, groups, normalize_eps,
                                 reduction, scale, plan)
    if symmetric:
        loss = loss + OnePassFunction.apply(k_grad[:n], q, None, inv_tau, None, ColumnLayout.plain(n), backend,
                                            column_groups, normalize_eps, reduction, scale, plan)
    return loss


def needs_gradient(*inputs) -> bool:
    """Grad mode is on and some tensor among ``inputs`` requires a gradient."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)

