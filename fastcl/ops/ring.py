"""The ring autograd Function: candidate blocks travel around the ranks, never gathered.

:func:`fastcl.distributed.gathered_info_nce` holds every rank's positives (and hard
negatives) at once: O(N_global * D) per rank. :func:`fastcl.distributed.ring_info_nce`,
on this Function, never does. Each rank's block of
candidates, B_r = [positives_r; hard_negatives_r] (what needs a gradient), travels
around the ring r -> r + 1 -> ... while every rank scores its own anchors against the
block it holds, one block at a time:

  forward   W steps. Step s: rank r holds B_{r-s}; it starts sending it to r + 1 and
            receiving B_{r-s-1} from r - 1, and meanwhile runs the backend's forward
            of its queries against B_{r-s}: a per-row partial log-sum-exp, merged into
            the running one with logaddexp. The target column (positive i) lives in
            the home block B_r, so step 0 (home, with the local extra and Gaussian
            negatives appended and the hard-negative weight on the diagonal) gives the
            target logit; visiting blocks are scored with target -1 (matches nothing).
  backward  the same W steps again, now with the global per-row log-sum-exp: step s
            adds B_{r-s}'s share to this rank's dq and row_dot (temperature gradient),
            and adds this rank's rows' contribution to the visiting block's dk, an
            accumulator that travels with the block. After the last step each dk is
            sent on once more, which brings it home after a full turn: rank r then
            holds the gradient of every rank's loss with respect to its own block.

Memory per rank, in embeddings: its queries, its home block (plus its constants), the
block being scored, the block being received, and in the backward the two blocks'
dk accumulators and dq: O(local_batch * D), whatever the number of ranks, plus the
backend's own bounded workspace (a fixed budget for the chunked path and the workspace
strategy, none for the slab strategy).
Measured (tests/test_ring.py, live tensor bytes over forward + backward, 16 x 512
float64 rows with hard negatives per rank): 9.1 local blocks at 3 and at 4 ranks
(8.1 at 2, where no step holds a visiting block and an incoming one at once), while
the gathered loss holds 7.3, 10.4, 13.5 blocks at 2, 3, 4 ranks (+3.1 per rank).
Communication: 2(W - 1) block transfers forward + backward, W dk transfers.

Precision: dq and the travelling dk accumulate in fp32 (fp64 for fp64 inputs) and the
dk accumulators travel in that dtype; each block's share comes from the backend in the
input dtype, so for fp16 / bf16 inputs it is rounded once per block before being
added (one process rounds once at the end). Tested with gloo on CPU (chunked PyTorch
and interpreted Triton backends); not yet run with NCCL on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dispatch import KernelPlan, kernels
from .function import kernel_params
from .layout import ColumnLayout
from .utils import accumulator_dtype


def world_and_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


_TAG_BLOCK, _TAG_GRAD = 17, 18


def _ring_exchange(send: list[torch.Tensor], recv: list[torch.Tensor], group, tag: int) -> list:
    """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous
    one; returns the requests to wait on. Every rank posts in the same order, so the
    point-to-point messages pair up (gloo matches by peer and tag, NCCL by order)."""
    world, rank = world_and_rank(group)
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    ops = [dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=nxt) for t in send]
    ops += [dist.P2POp(dist.irecv, t, group=group, tag=tag, group_peer=prev) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


class RingInfoNCEFunction(torch.autograd.Function):
    """Per-row InfoNCE of this rank's queries against the candidate blocks of all ranks.

    Arguments: ``q`` (n x D queries), ``k_home`` (this rank's block, the candidates that
    get a gradient), ``k_const`` (local candidates without gradient, or None),
    ``inv_tau``, ``plan`` (a :class:`~fastcl.ops.dispatch.KernelPlan` whose layout is
    that of ``[k_home; k_const]``, target of row i at column i, and whose strategy
    recomputes in the backward), ``block_rows`` (rows of every rank's block) and
    ``group``. With ``plan.normalize_eps`` the kernels normalize the raw rows per block:
    the normalization's backward is linear in the per-row sums, so the blocks' parts add
    up (fastcl/ops/normalize.py). Returns the n per-row losses in the accumulator dtype.
    All ranks must call it together (and its backward), with inputs that agree in
    requires_grad.
    """

    @staticmethod
    def forward(ctx, q, k_home, k_const, inv_tau, plan: KernelPlan, block_rows, group):
        world, rank = world_and_rank(group)
        forward_fn = kernels(q.device.type, plan.backend, plan.backward).forward
        home_layout, extra = plan.layout, {"normalize_eps": plan.normalize_eps}
        params = kernel_params(inv_tau, home_layout, q.dtype)
        home = k_home if k_const is None else torch.cat([k_home, k_const])
        no_target = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)

        current, lse, target_logit = k_home, None, None
        for step in range(world):
            requests, incoming = [], None
            if step < world - 1:  # start moving the next block while this one is scored
                incoming = k_home.new_empty((block_rows[(rank - step - 1) % world], k_home.shape[1]))
                requests = _ring_exchange([current], [incoming], group, _TAG_BLOCK)
            if step == 0:
                lse, target_logit = forward_fn(q, home, params, None, home_layout, **extra)
            else:
                part, _ = forward_fn(q, current, params, no_target, ColumnLayout.plain(current.shape[0]), **extra)
                lse = torch.logaddexp(lse, part)
            _wait(requests)
            current = incoming

        ctx.save_for_backward(q, home, params, lse)
        ctx.plan, ctx.block_rows, ctx.group = plan, block_rows, group
        ctx.n_home, ctx.inv_tau_dtype = k_home.shape[0], inv_tau.dtype
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        q, home, params, lse = ctx.saved_tensors
        need_q, need_k, _, need_tau = ctx.needs_input_grad[:4]
        want_dq = need_q or need_tau  # row_dot comes with dq
        world, rank = world_and_rank(ctx.group)
        plan = ctx.plan
        backward_fn = kernels(q.device.type, plan.backend, plan.backward).backward
        acc = accumulator_dtype(q.dtype)
        grad_rows = grad_rows.contiguous()
        dim = q.shape[1]
        no_target = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)

        dq = torch.zeros(q.shape, dtype=acc, device=q.device) if want_dq else None
        row_dot = torch.zeros(q.shape[0], dtype=acc, device=q.device) if want_dq else None
        current = home[:ctx.n_home]
        dk_current = torch.zeros((ctx.n_home, dim), dtype=acc, device=q.device) if need_k else None
        for step in range(world):
            next_rows = ctx.block_rows[(rank - step - 1) % world]
            requests, incoming = [], None
            if step < world - 1:
                incoming = current.new_empty((next_rows, dim))
                requests = _ring_exchange([current], [incoming], ctx.group, _TAG_BLOCK)
            if step == 0:
                k, targets, layout = home, None, plan.layout
            else:
                k, targets, layout = current, no_target, ColumnLayout.plain(current.shape[0])
            dq_part, dk_part, row_dot_part = backward_fn(q, k, params, targets, layout, lse, grad_rows,
                                                         need_dq=want_dq, need_dk=need_k,
                                                         normalize_eps=plan.normalize_eps)
            if want_dq:
                dq += dq_part
                row_dot += row_dot_part
            if need_k:
                dk_current += dk_part
                if world > 1:  # the accumulator travels on with its block (home after step W - 1)
                    dk_incoming = dk_current.new_empty((next_rows, dim))
                    requests += _ring_exchange([dk_current], [dk_incoming], ctx.group, _TAG_GRAD)
                else:
                    dk_incoming = dk_current
            _wait(requests)
            current = incoming
            if need_k:
                dk_current = dk_incoming

        grad_q = dq.to(q.dtype) if need_q else None
        grad_k = dk_current.to(home.dtype) if need_k else None
        d_inv_tau = row_dot.sum().to(ctx.inv_tau_dtype) if need_tau else None
        return grad_q, grad_k, None, d_inv_tau, None, None, None
