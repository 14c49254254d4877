"""Triton one pass for a reduced loss: the losses and both gradients at 6NMD FLOPs.

The recomputing GPU paths do 8NMD: the forward forms S = q k^T (2NMD) for the row
log-sum-exps, the backward forms it again (slab: once per D slab of each gradient;
workspace: once, into a buffer of logit gradients) before the products for dq and dk
(4NMD). With a reduced loss every row's incoming gradient is one weight w (1/N for a
mean, 1 for a sum), so the gradients can be formed in the forward
(fastcl/backends.py decides where) and S is needed once. Per chunk of R rows (R from the workspace
cap, ``FASTCL_WORKSPACE_BYTES``, as the workspace backward's):

1. ``_one_pass_logits_kernel``, grid (row blocks, column splits): S tiles from tl.dot,
   turned into logits in registers (1/tau, inverse norms, weights, masks) and stored in an
   R x M fp32 (fp64) workspace W; per row and split, the online max, the rescaled sum,
   the similarities summed with the same weights, and the target's logit and
   similarity. The splits give the GPU enough programs when R is small.
2. ``_one_pass_grads_kernel``, grid (row blocks, column blocks): combines the splits'
   statistics into the row log-sum-exp (the first column block writes the per-row loss
   and the temperature's row sum ``w sum_j (P - onehot)_ij s_ij``, from the similarities
   in the accumulator dtype) and turns W into the logit gradients
   ``dS = w (exp(logit - lse) - [j == t]) r_i c_j / tau`` in the input dtype;
3. two matrix products (cuBLAS on the GPU): ``dq_R = dS k`` and ``dk += dS[:, :n_grad]^T
   q_R``, accumulated in fp32 for 16-bit inputs (``out_dtype``);
4. with fused normalization, ``_one_pass_rows_kernel`` per gradient row: its rank-1
   term ``g_i -= (x_i . g_i) proj_i x_i`` (fastcl/ops/normalize.py), after the last chunk
   for dk.

Counted per logit (N M of them), bf16 inputs, D = 768: FLOPs 2D (step 1) + 4D (step 3)
= 6D = 4608, against the workspace backward's 8D = 6144 (its forward 2D, its backward
6D). Bytes: step 1 writes 4 (W), step 2 reads 4 and writes 2 (dS), step 3 reads dS twice,
4: 14 bytes, against the workspace path's 6 (dS written once, read twice). On an H100
(about 700 TFLOP/s of bf16 products, 3.35 TB/s) the 2D FLOPs saved cost 2.2 ps per
logit and the 8 bytes added 2.4 ps: at D = 768 in bf16 the two paths are about even if
the products run at full rate and step 2 does not overlap them; the one pass gains with
larger D, in fp32 / tf32 (products at half the rate or less) and wherever the products
run below the bandwidth. Fusing step 2 into the products' operand loads (exp applied as
tiles of W are loaded) would save its 6 bytes but needs a D-wide accumulator per row
block (dq: 128 rows x 768 fp32 exceeds the registers), so each tile would be read and
exponentiated once per D slab: three times at D = 768. The GPU runner times slab,
workspace and one pass side by side (``fastcl-one_pass``), so the choice is measured
there; :func:`fastcl.backends.one_pass_applies` takes the one pass by default for fp32 and fp64,
for bf16 up to 2^28 logits (where an H200 measured it faster: 4.43 against 4.82 ms at
N = M = 16384, and slower from 2^29), and for fp16 when asked (``backward_strategy="one_pass"``).

Precision. dS is stored in the input dtype for the tensor-core products (step 3). In
bfloat16 it holds ``w (P - onehot) r_i c_j / tau`` whole: bfloat16 has float32's exponent
range, so none of those factors can push it out of range, and its one rounding (2^-8
relative) is the operand's own. float16's range is too narrow for the folded factors
(infonce_bwd_slab.py, "Precision"), so there, as in the workspace backward, each product
gets its own operand, ``P - onehot`` times only the factor that cannot leave its sum, over
its maximum, times 2^15: ``(P - onehot) c_j / max c`` for dq, ``(P - onehot) w r_i / max
|w r|`` for dk (n_grad wide); dq's chunk rows are then multiplied by ``(1/tau) max(c) w r_i
/ 2^15``, and dk, after the last chunk, by ``(1/tau) max|w r| c_j / 2^15``. Either way the
gradients are within the recomputing backwards' bound (tests/test_adversarial.py).

With groups the kernels skip tiles without a common group, but the products run over
every column, so on CUDA the plan keeps the recomputing slab path for groups.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import kernel_config
from .infonce_bwd_workspace import DEFAULT_WORKSPACE_BYTES
from .launch import backward_operand_scales, block_options, extra_rules, tile_inputs
from .layout import ColumnLayout, GuideMask
from .tiles import (
    GRAD_OPERAND_SCALE, finite_lse, groups_overlap, load_groups, load_projections, load_scales, load_targets,
    matmul_operand, row_block, similarity_tile, tile_logits,
)
from .utils import accumulator_dtype, interpreting


@triton.jit
def _one_pass_logits_kernel(
    ins,  # launch.TileInputs: q, k and what every tile reads with them
    seg,  # launch.Segments: the layout's column segments
    w_ptr,  # R x M workspace of logits (accumulator dtype)
    part_max_ptr,  # n_splits x R: each split's row max, rescaled sum and target logit,
    part_sum_ptr,  # and the similarities' sum weighted as the rescaled sum and the
    part_target_ptr,  # target's similarity (the temperature's row sums)
    part_ssum_ptr,
    part_starget_ptr,
    row0,
    n_chunk_rows,
    stride_w,
    split_cols,  # columns per split, a multiple of BLOCK_N
    stride_part,  # between the splits' rows in the partial statistics
    SW: tl.constexpr,  # the launch's switches (launch.Switches)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if SW.ACC_FP64 else tl.float32
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the chunk
    rows = row0 + local
    row_in = local < n_chunk_rows
    split = tl.program_id(1)
    eps, params, targets, strength, thresholds, row_groups, row_scale = row_block(ins, rows, row_in, SW)

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
    row_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    sim_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)  # sum_j exp(logit - shift) s_j
    target_logit = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    target_sim = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    first = split * split_cols
    end = tl.minimum(first + split_cols, seg.n_cols)
    for n0 in range(first, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_groups = load_groups(ins.key_groups, cols, seg.n_grad_cols, SW.GROUPED)
        if SW.GROUPED:
            visit = groups_overlap(row_groups, row_in, col_groups, cols < seg.n_grad_cols,
                                   n0 + BLOCK_N > seg.n_grad_cols, SW.GROUPED)
        else:
            visit = True
        if visit:  # the gradient kernel makes the same test and never reads skipped tiles
            # Rows past the chunk read zeros (masked), their logits are never stored.
            s = similarity_tile(ins, rows, cols, tl.minimum(ins.n_rows, row0 + n_chunk_rows), seg.n_cols, BLOCK_M,
                                BLOCK_N, BLOCK_D, acc_dtype, SW)
            col_scale = load_scales(ins.k_norm, cols, seg.n_cols, eps, SW.NORMALIZED)
            s, logits = tile_logits(s, row_scale, col_scale, ins, params, rows, cols, targets, thresholds,
                                    row_groups, col_groups, seg, strength, SW, BLOCK_D)
            tl.store(w_ptr + local[:, None] * stride_w + cols[None, :], logits,
                     mask=row_in[:, None] & (cols[None, :] < seg.n_cols))
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            # A row may have no candidate yet (all -inf so far): shift by 0 then.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(row_max - shift)
            e = tl.exp(logits - shift[:, None])
            row_sum = row_sum * rescale + tl.sum(e, 1)
            sim_sum = sim_sum * rescale + tl.sum(e * s, 1)
            row_max = new_max
            is_target = cols[None, :] == targets[:, None]
            target_logit += tl.sum(tl.where(is_target, logits, 0.0), 1)
            target_sim += tl.sum(tl.where(is_target, s, 0.0), 1)
    out = split * stride_part + local
    tl.store(part_max_ptr + out, row_max, mask=row_in)
    tl.store(part_sum_ptr + out, row_sum, mask=row_in)
    tl.store(part_target_ptr + out, target_logit, mask=row_in)
    tl.store(part_ssum_ptr + out, sim_sum, mask=row_in)
    tl.store(part_starget_ptr + out, target_sim, mask=row_in)


@triton.jit
def _one_pass_grads_kernel(
    params_ptr,  # [1 / tau, log hard weight, log gaussian weight, row weight w]
    targets_ptr,
    row_groups_ptr,
    key_groups_ptr,
    q_norm_ptr,
    k_norm_ptr,
    w_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_target_ptr,
    part_ssum_ptr,
    part_starget_ptr,
    ds_ptr,  # R x M logit gradients, input dtype (SPLIT: dq's operand)
    ds2_ptr,  # SPLIT: R x n_grad_cols, dk's operand
    operand_scales_ptr,  # SPLIT: [max_j c_j, max_i |w r_i|] (launch.backward_operand_scales)
    loss_ptr,  # N per-row losses (accumulator dtype)
    row_dot_ptr,  # N: the temperature's row sums w sum_j (P - onehot)_ij s_ij
    row0,
    n_chunk_rows,
    n_rows,
    n_cols,
    n_grad_cols,
    n_splits,
    stride_part,
    stride_w,
    stride_ds,
    stride_ds2,
    eps_ptr,
    HAS_TARGETS: tl.constexpr,
    GROUPED: tl.constexpr,
    NORMALIZED: tl.constexpr,
    ACC_FP64: tl.constexpr,
    EMPTY_ROWS: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_in = local < n_chunk_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < n_cols
    mask = row_in[:, None] & col_in[None, :]
    out_ptrs = ds_ptr + local[:, None] * stride_ds + cols[None, :]
    mask2 = row_in[:, None] & (cols[None, :] < n_grad_cols)
    out2_ptrs = ds2_ptr + local[:, None] * stride_ds2 + cols[None, :]
    row_groups = load_groups(row_groups_ptr, rows, n_rows, GROUPED)
    col_groups = load_groups(key_groups_ptr, cols, n_grad_cols, GROUPED)
    if GROUPED:
        visit = groups_overlap(row_groups, row_in, col_groups, cols < n_grad_cols,
                               tl.program_id(1) * BLOCK_N + BLOCK_N > n_grad_cols, GROUPED)
    else:
        visit = True
    # The splits' statistics, combined into the row log-sum-exp (each program does it
    # for its rows: n_splits values per row, nothing next to a tile).
    lse_max = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
    for split in range(0, n_splits):
        lse_max = tl.maximum(lse_max, tl.load(part_max_ptr + split * stride_part + local, mask=row_in,
                                              other=float("-inf")))
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    sim_total = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    target_logit = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    target_sim = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for split in range(0, n_splits):
        at = split * stride_part + local
        part_max = tl.load(part_max_ptr + at, mask=row_in, other=float("-inf"))
        factor = tl.where(part_max == float("-inf"), 0.0, tl.exp(part_max - shift))
        total += factor * tl.load(part_sum_ptr + at, mask=row_in, other=0.0)
        sim_total += factor * tl.load(part_ssum_ptr + at, mask=row_in, other=0.0)
        target_logit += tl.load(part_target_ptr + at, mask=row_in, other=0.0)
        target_sim += tl.load(part_starget_ptr + at, mask=row_in, other=0.0)
    lse = tl.where(row_in, shift + tl.log(tl.where(row_in, total, 1.0)), 0.0)
    weight = tl.load(params_ptr + 3)
    if tl.program_id(1) == 0:
        tl.store(loss_ptr + rows, lse - target_logit, mask=row_in)
        # In the accumulator dtype from the similarities themselves, not from dq's
        # 16-bit operand: the temperature's gradient as exact as the recomputing paths'.
        mean_sim = tl.where(total > 0, sim_total / tl.where(total > 0, total, 1.0), 0.0)
        tl.store(row_dot_ptr + rows, weight * (mean_sim - target_sim), mask=row_in)
    if visit:
        inv_tau = tl.load(params_ptr)
        targets = load_targets(targets_ptr, rows, row_in, HAS_TARGETS)
        logits = tl.load(w_ptr + local[:, None] * stride_w + cols[None, :], mask=mask, other=float("-inf"))
        probs = tl.exp(logits - finite_lse(lse, EMPTY_ROWS)[:, None])  # 0 in a row with no entry
        p_minus = tl.where(cols[None, :] == targets[:, None], probs - 1.0, probs)
        if NORMALIZED:
            eps = tl.load(eps_ptr)
            row_scale = load_scales(q_norm_ptr, rows, n_rows, eps, NORMALIZED)
            col_scale = load_scales(k_norm_ptr, cols, n_cols, eps, NORMALIZED)
        else:
            row_scale = tl.full((BLOCK_M,), 1.0, dtype=acc_dtype)
            col_scale = tl.full((BLOCK_N,), 1.0, dtype=acc_dtype)
        if SPLIT:
            # float16: each operand keeps P - onehot and the one factor that cannot leave
            # its product's sum, over its maximum, times 2^15 (module docstring); the rest
            # multiplies the products' fp32 results.
            col_max = tl.load(operand_scales_ptr)
            row_max = tl.load(operand_scales_ptr + 1)
            ds = p_minus * (col_scale * (GRAD_OPERAND_SCALE / col_max))[None, :]
            ds2 = p_minus * (weight * row_scale * (GRAD_OPERAND_SCALE / row_max))[:, None]
            tl.store(out2_ptrs, ds2.to(ds2_ptr.dtype.element_ty), mask=mask2)
        else:
            # bfloat16 (and fp32 / fp64) dS keeps fp32's exponent range: every factor can
            # stay folded in (module docstring); its one rounding is the operand's own.
            ds = p_minus * ((weight * inv_tau) * row_scale)[:, None] * col_scale[None, :]
        tl.store(out_ptrs, matmul_operand(ds, ds_ptr.dtype.element_ty, UPCAST).to(ds_ptr.dtype.element_ty),
                 mask=mask)
    else:
        # No common group: zero gradient (the workspace is reused between chunks).
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=ds_ptr.dtype.element_ty), mask=mask)
        if SPLIT:
            tl.store(out2_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=ds2_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _one_pass_rows_kernel(
    grad_ptr,  # rows of a gradient (accumulator dtype), corrected in place
    x_ptr,  # the matching input rows
    norm_ptr,  # their L2 norms
    n_rows,
    dim,
    stride_grad,
    stride_x,
    eps_ptr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Fused normalization's rank-1 term, per row: g_i -= (x_i . g_i) proj_i x_i
    (F.normalize's backward)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_rows
    dot = tl.zeros((BLOCK_R,), dtype=grad_ptr.dtype.element_ty)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = row_in[:, None] & (dd[None, :] < dim)
        grad = tl.load(grad_ptr + rows[:, None] * stride_grad + dd[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(grad.dtype)
        dot += tl.sum(grad * x, 1)
    coef = dot * load_projections(norm_ptr, rows, n_rows, tl.load(eps_ptr))
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = row_in[:, None] & (dd[None, :] < dim)
        grad_ptrs = grad_ptr + rows[:, None] * stride_grad + dd[None, :]
        grad = tl.load(grad_ptrs, mask=mask, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(grad.dtype)
        tl.store(grad_ptrs, grad - coef[:, None].to(grad.dtype) * x, mask=mask)


#: The switches (launch.Switches) the gradient kernel reads: it takes them one by one, so
#: that rules it does not read (the logits kernel applied them) compile no variants of it.
GRADS_SWITCHES = ("HAS_TARGETS", "GROUPED", "NORMALIZED", "ACC_FP64", "EMPTY_ROWS", "UPCAST")

#: Block shapes of the two kernels without tl.dot. The gradient kernel streams W: 16 x 128
#: tiles on 8 warps take 32 registers on sm_90a with every option off, 72 with all on, and
#: never spill (on 4 warps float16's operand split spilled 8 bytes with every option on;
#: 64 x 128 on 8 warps took 128 and 255: one block per SM in a bandwidth-bound pass);
#: the row kernel as _project_rows_kernel (8 x 128 on 4 warps).
GRADS_BLOCKS = dict(BLOCK_M=16, BLOCK_N=128, num_warps=8)
ROWS_BLOCKS = dict(BLOCK_R=8, BLOCK_D=128, num_warps=4)
_INTERPRETER_GRADS_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
_INTERPRETER_ROWS_BLOCKS = dict(BLOCK_R=4, BLOCK_D=16, num_warps=1)


def one_pass_config(kernel: str, dtype: torch.dtype, dim: int, rules: bool = False):
    """The launch configuration of a one-pass kernel on the GPU, as compile_report
    reports it (the logits kernel's from fastcl.ops.configs, the others' fixed here)."""
    from .configs import KernelConfig

    if kernel == "one_pass_logits":
        return kernel_config("one_pass_logits", dtype, dim, rules=rules)
    if kernel == "one_pass_grads":
        return KernelConfig(GRADS_BLOCKS["BLOCK_M"], GRADS_BLOCKS["BLOCK_N"], 0, 0, GRADS_BLOCKS["num_warps"], 3)
    if kernel == "one_pass_rows":
        return KernelConfig(ROWS_BLOCKS["BLOCK_R"], 0, ROWS_BLOCKS["BLOCK_D"], 0, ROWS_BLOCKS["num_warps"], 3)
    raise ValueError(f"unknown one-pass kernel {kernel!r}")


def one_pass_signature(kernel: str, t: str, acc: str, switches) -> tuple:
    """(kernel, signature, constexprs) of the one-pass kernels without a product, for
    fastcl.ops.compile_report: ``t`` / ``acc`` the Triton names of the input and
    accumulator dtypes, ``switches`` the report's launch.Switches."""
    if kernel == "one_pass_grads":
        sig = dict(params_ptr=f"*{acc}", targets_ptr="*i64", row_groups_ptr="*i64", key_groups_ptr="*i64",
                   q_norm_ptr=f"*{acc}", k_norm_ptr=f"*{acc}", w_ptr=f"*{acc}", part_max_ptr=f"*{acc}",
                   part_sum_ptr=f"*{acc}", part_target_ptr=f"*{acc}", part_ssum_ptr=f"*{acc}",
                   part_starget_ptr=f"*{acc}", ds_ptr=f"*{t}", ds2_ptr=f"*{t}", operand_scales_ptr=f"*{acc}",
                   loss_ptr=f"*{acc}", row_dot_ptr=f"*{acc}",
                   row0="i32", n_chunk_rows="i32", n_rows="i32", n_cols="i32", n_grad_cols="i32", n_splits="i32",
                   stride_part="i32", stride_w="i32", stride_ds="i32", stride_ds2="i32", eps_ptr=f"*{acc}")
        constexprs = {name: getattr(switches, name) for name in GRADS_SWITCHES}
        return _one_pass_grads_kernel, sig, dict(constexprs, SPLIT=t == "fp16", BLOCK_M=GRADS_BLOCKS["BLOCK_M"],
                                                 BLOCK_N=GRADS_BLOCKS["BLOCK_N"])
    if kernel == "one_pass_rows":
        sig = dict(grad_ptr=f"*{acc}", x_ptr=f"*{t}", norm_ptr=f"*{acc}", n_rows="i32", dim="i32",
                   stride_grad="i32", stride_x="i32", eps_ptr=f"*{acc}")
        return _one_pass_rows_kernel, sig, dict(BLOCK_R=ROWS_BLOCKS["BLOCK_R"], BLOCK_D=ROWS_BLOCKS["BLOCK_D"])
    raise ValueError(f"unknown one-pass kernel {kernel!r}")


def one_pass_rows(n_rows: int, n_cols: int, element_size: int, acc_size: int, chunk_rows: int = 0) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else as many as keep the chunk's W
    (accumulator dtype) and dS (input dtype) within ``FASTCL_WORKSPACE_BYTES``."""
    if chunk_rows > 0:
        return max(1, min(n_rows, chunk_rows))
    cap = int(os.environ.get("FASTCL_WORKSPACE_BYTES", DEFAULT_WORKSPACE_BYTES))
    return max(1, min(n_rows, cap // max(n_cols * (element_size + acc_size), 1)))


def _column_splits(row_blocks: int, n_cols: int, block_n: int, device: torch.device) -> int:
    """Column splits of the logits kernel: enough programs for every SM (4 per SM), or
    3 under the interpreter, so that tests cross split boundaries."""
    tiles = triton.cdiv(n_cols, block_n)
    if device.type == "cuda":
        wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        wanted = 3 * row_blocks
    return max(1, min(tiles, triton.cdiv(wanted, row_blocks)))


#: torch.addmm(..., out_dtype=torch.float32, out=...) for 16-bit CUDA operands.
_ADDMM_OUT_DTYPE = torch._C._dispatch_has_kernel_for_dispatch_key("aten::addmm.dtype_out", "CUDA")


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b (accumulate: out += a @ b), ``out`` in the accumulator dtype: 16-bit
    operands accumulate in fp32 inside the product (cuBLAS's out_dtype), with no
    temporary; same-dtype products are plain."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(out, a, b, out_dtype=out.dtype, beta=1 if accumulate else 0, out=out)
    else:  # the interpreter's CPU tensors (or a torch without it): operands upcast, exactly
        product = a.to(out.dtype) @ b.to(out.dtype)
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)


def infonce_forward_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    params: torch.Tensor,
    targets: torch.Tensor | None,
    layout: ColumnLayout,
    row_weight: float,
    need_dq: bool = True,
    need_dk: bool = True,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    normalize_eps: float | None = None,
    chunk_rows: int = 0,
    thresholds: torch.Tensor | None = None,
    guide: GuideMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_rows, dq, dk, row_dot)`` of ``torch.ops.fastcl.infonce_fwd_grad`` on CUDA
    (or interpreted): the per-row losses, and the gradients and temperature row sums for
    every row's incoming gradient ``row_weight``, all in the accumulator dtype. A
    gradient not asked for is an empty tensor. Arguments as
    :func:`fastcl.ops.infonce_fwd.infonce_forward` (``thresholds`` included); ``chunk_rows`` as
    :func:`one_pass_rows`.
    """
    n_rows, dim = q.shape
    n_cols, n_grad = layout.n_cols, layout.n_grad_cols
    acc = accumulator_dtype(q.dtype)
    device = q.device
    loss_rows = torch.empty(n_rows, dtype=acc, device=device)
    want_dk = need_dk and n_grad > 0
    dq = torch.empty((n_rows, dim), dtype=acc, device=device) if need_dq else q.new_empty((0, dim), dtype=acc)
    dk = torch.zeros((n_grad, dim), dtype=acc, device=device) if want_dk else q.new_empty((0, dim), dtype=acc)
    row_dot = torch.empty(n_rows if need_dq else 0, dtype=acc, device=device)
    if n_rows == 0:
        return loss_rows, dq, dk, row_dot
    # The row weight travels with the other scalars, in the accumulator dtype (a Python
    # float would be fp32 on the GPU).
    params4 = torch.cat([params.to(acc).reshape(3), torch.full((1,), row_weight, dtype=acc, device=device)])
    # float16: dq's and dk's operands apart (module docstring, "Precision"), dk's n_grad wide.
    split = q.dtype == torch.float16
    chunk = one_pass_rows(n_rows, n_cols, q.element_size() * (2 if split else 1), torch.finfo(acc).bits // 8,
                          chunk_rows)
    workspace = torch.empty((chunk, n_cols), dtype=acc, device=device)
    ds_buffer = torch.empty((chunk, n_cols), dtype=q.dtype, device=device)
    ds2_buffer = torch.empty((chunk, n_grad), dtype=q.dtype, device=device) if split else ds_buffer
    ins, segments, switches = tile_inputs(q, k, params4, targets, layout, groups, normalize_eps, thresholds,
                                          guide)
    eps, q_norm, k_norm = ins.scalars, ins.q_norm, ins.k_norm
    normalized = switches.NORMALIZED
    if split:
        # What the products' fp32 results are multiplied by: dq_i by (1/tau) max(c) / 2^15
        # and w r_i, dk_j by (1/tau) max|w r| / 2^15 and c_j.
        weights = torch.full((n_rows,), row_weight, dtype=acc, device=device)
        operand_scales = backward_operand_scales(q_norm, k_norm, weights, normalize_eps, acc)
        inv_tau = params4[0]
        row_factors = weights / q_norm.clamp_min(normalize_eps) if normalized else weights
        dq_factors = row_factors * (inv_tau * operand_scales[0] / GRAD_OPERAND_SCALE.value)
        dk_factors = inv_tau * operand_scales[1] / GRAD_OPERAND_SCALE.value
        if normalized:
            dk_factors = dk_factors / k_norm[:n_grad].clamp_min(normalize_eps)
    else:
        operand_scales = params4  # read by no kernel
    cfg = kernel_config("one_pass_logits", q.dtype, dim, device, rules=extra_rules(switches))
    grads_blocks = _INTERPRETER_GRADS_BLOCKS if interpreting() else GRADS_BLOCKS
    row_blocks = triton.cdiv(chunk, cfg.BLOCK_M)
    n_splits = _column_splits(row_blocks, n_cols, cfg.BLOCK_N, device)
    split_cols = triton.cdiv(triton.cdiv(n_cols, n_splits), cfg.BLOCK_N) * cfg.BLOCK_N
    n_splits = triton.cdiv(n_cols, split_cols)
    partials = torch.empty((5, n_splits, chunk), dtype=acc, device=device)
    scratch_dots = None if need_dq else torch.empty(n_rows, dtype=acc, device=device)  # written, never read
    grads_switches = {name: getattr(switches, name) for name in GRADS_SWITCHES}
    for row0 in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - row0)
        part = partials
        _one_pass_logits_kernel[(triton.cdiv(rows, cfg.BLOCK_M), n_splits)](
            ins, segments, workspace, *part, row0, rows, workspace.stride(0), split_cols, chunk,
            SW=switches, **block_options(cfg))
        ds, ds2 = ds_buffer[:rows], ds2_buffer[:rows]
        grid = (triton.cdiv(rows, grads_blocks["BLOCK_M"]), triton.cdiv(n_cols, grads_blocks["BLOCK_N"]))
        _one_pass_grads_kernel[grid](
            params4, ins.targets, ins.row_groups, ins.key_groups, q_norm, k_norm, workspace, *part, ds, ds2,
            operand_scales, loss_rows, row_dot if need_dq else scratch_dots, row0, rows, n_rows, n_cols, n_grad,
            n_splits, chunk, workspace.stride(0), ds.stride(0), ds2.stride(0), eps, **grads_switches, SPLIT=split,
            **grads_blocks)
        if need_dq:
            _product_into(dq[row0:row0 + rows], ds, k, accumulate=False)
            if split:
                dq[row0:row0 + rows] *= dq_factors[row0:row0 + rows, None]
        if want_dk:
            _product_into(dk, (ds2 if split else ds[:, :n_grad]).T, q[row0:row0 + rows], accumulate=True)
    if want_dk and split:
        dk *= dk_factors[:, None] if normalized else dk_factors
    rows_blocks = _INTERPRETER_ROWS_BLOCKS if interpreting() else ROWS_BLOCKS
    for grad, x, norm, wanted in ((dq, q, q_norm, need_dq), (dk, k, k_norm, want_dk)):
        if wanted and normalized:
            _one_pass_rows_kernel[(triton.cdiv(grad.shape[0], rows_blocks["BLOCK_R"]),)](
                grad, x, norm, grad.shape[0], dim, grad.stride(0), x.stride(0), eps, **rows_blocks)
    return loss_rows, dq, dk, row_dot
