// Native CPU kernels of the fused InfoNCE loss: the two backend functions that the
// Triton kernels (fastcl/ops/infonce_fwd.py, infonce_bwd_slab.py) and the chunked PyTorch
// path (fastcl/ops/chunked.py) implement, with the same arguments and outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastcl {

// The hardness penalty's modes (fastcl.ops.layout.HARDNESS_*): which entries of a row
// get s * sim added to their logit's value.
enum HardnessMode : int64_t {
  HARDNESS_NONE = 0,
  HARDNESS_IN_BATCH = 1,  // every column but the target and the row's own hard negatives
  HARDNESS_HARD = 2,      // the row's own hard negatives, except the target
  HARDNESS_ALL = 3,       // every column but the target
};

// fastcl.ops.layout.ColumnLayout, flattened: where each kind of candidate sits among
// the M = n_cols key columns, the additive logit weights, and the per-entry rules
// (its docstring is the specification).
struct ColumnLayout {
  int64_t n_cols;
  int64_t n_grad_cols;
  int64_t hard_start;
  int64_t n_hard;
  int64_t gauss_start;
  double log_hard_weight;
  double log_gauss_weight;
  int64_t self_start;  // row i < n_self does not score column self_start + i (NT-Xent)
  int64_t n_self;
  // Row i < n_hard owns the columns hard_start + b * n_hard + i, b in [0, n_hard_blocks).
  int64_t n_hard_blocks = 1;
  int64_t hardness_mode = HARDNESS_NONE;
  double hardness_strength = 0.0;  // s >= 0: the penalty s * sim, on the logit's value only

  // As in Python: a weight of 1 (log 0) costs nothing. The values the kernels add come
  // from params (so they stay exact in fp64 and on the device); these only gate work.
  bool hard_weighted() const { return n_hard > 0 && log_hard_weight != 0.0; }
  bool gauss_weighted() const { return gauss_start < n_cols && log_gauss_weight != 0.0; }
  bool penalized() const { return hardness_mode != HARDNESS_NONE && hardness_strength != 0.0; }
};

// Optional group ids (token-level InfoNCE): row i scores a column j < n_grad_cols only
// when key_groups[j] == row_groups[i]; later columns are shared by every group.
struct Groups {
  c10::optional<at::Tensor> rows;
  c10::optional<at::Tensor> keys;
};

// The guide rule (fastcl.ops.layout.GuideMask; all unset: off): unit rows of a second
// model for the query rows (rows, N x Dg) and for the gradient columns (cols,
// n_grad_cols x Dg), and one threshold per row. Entry (i, j) with j < n_grad_cols and
// j != t_i is masked (-inf) when rows_i . cols_j > thresholds[i]; no gradient flows
// through it. Every function takes it and must be given the forward's.
struct Guide {
  c10::optional<at::Tensor> rows;
  c10::optional<at::Tensor> cols;
  c10::optional<at::Tensor> thresholds;
};

// Per-row (lse, target_logit) in the accumulator dtype (fp64 for fp64 inputs, else fp32).
// A target of -1 matches no column (target_logit 0).
//
// thresholds: the false-negative margin (unset: off), one value per row: entry (i, j)
// with j != t_i and sim_ij > thresholds[i] is masked (-inf). Every function takes it and
// must be given the same thresholds as the forward, so that they mask the same entries.
//
// normalize_eps: when set, q and k are raw rows and the kernel scores their cosines,
// as if each row had gone through F.normalize(x, dim=-1, eps=normalize_eps) first,
// without the normalized copies (one scale per row instead; the backward returns the
// gradients with respect to the raw rows). When unset, q and k are scored as given.
std::tuple<at::Tensor, at::Tensor> infonce_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, const ColumnLayout& layout, const Groups& groups,
    c10::optional<double> normalize_eps, const c10::optional<at::Tensor>& thresholds, const Guide& guide);

// (dq, dk, row_dot): dq N x D and dk n_grad_cols x D in the input dtype, row_dot (length
// N, accumulator dtype: sum_j dL/dlogit_ij * cos_ij, the 1/tau gradient) with dq; a
// gradient that is not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, const ColumnLayout& layout, const Groups& groups,
    const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq, bool need_dk,
    c10::optional<double> normalize_eps, const c10::optional<at::Tensor>& thresholds, const Guide& guide);

// One pass for a reduced loss (infonce_one_pass.cpp): (loss_rows, dq, dk, row_dot) with
// every row's incoming gradient equal to row_weight (1/N for a mean, 1 for a sum): the
// per-row losses (lse - target_logit), and the gradients and the temperature's row sums
// that infonce_backward_cpu would return for grad_rows = row_weight, formed in the same
// sweep as the losses (6NMD FLOPs instead of 8NMD). Results in the accumulator dtype
// (fp32 for half inputs: the caller scales, then casts). block_rows / block_cols: rows
// per chunk and columns per tile, 0 for defaults.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_forward_grad_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, const ColumnLayout& layout, const Groups& groups,
    double row_weight, bool need_dq, bool need_dk, int64_t block_rows, int64_t block_cols,
    c10::optional<double> normalize_eps, const c10::optional<at::Tensor>& thresholds, const Guide& guide);

}  // namespace fastcl
