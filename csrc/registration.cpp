// Registers fastcl's operators with PyTorch's dispatcher:
//
//   torch.ops.fastcl.infonce_fwd(q, k, params, targets, *layout, row_groups, key_groups,
//                                normalize_eps=None) -> (lse, target_logit)
//   torch.ops.fastcl.infonce_bwd(q, k, params, targets, *layout, row_groups, key_groups,
//                                lse, grad_rows, need_dq, need_dk, normalize_eps=None)
//       -> (dq, dk, row_dot)
//   torch.ops.fastcl.infonce_fwd_grad(q, k, params, targets, *layout, row_groups, key_groups,
//                                     row_weight, need_dq, need_dk, block_rows, block_cols,
//                                     normalize_eps=None) -> (loss_rows, dq, dk, row_dot)
//
// (the last: one pass for a reduced loss, see infonce_cpu.h), with `*layout` the first
// nine fields of fastcl.ops.layout.ColumnLayout in order, and trailing optional
// arguments with defaults: normalize_eps (when given, the rows of q and k are raw and
// the operators normalize them on the fly, see infonce_cpu.h), then the layout's
// per-entry rules (n_hard_blocks, hardness_mode, hardness_strength) and the
// false-negative margin's per-row thresholds, and the guide rule's three tensors
// (guide_rows, guide_cols, guide_thresholds, see infonce_cpu.h). Calls written for the nine-field schemas
// keep their meaning. This file defines the
// schemas and the CPU kernels; fastcl/ops/operators.py adds the CUDA kernels (the Triton
// launchers), the fake (meta) kernels for torch.compile / torch.export, and defines the
// same schemas itself when this library cannot be built or loaded. The schema strings
// must match operators.py's SCHEMAS (tests/test_native.py checks).

#include <torch/library.h>

#include "infonce_cpu.h"

namespace fastcl {
namespace {

ColumnLayout make_layout(int64_t n_cols, int64_t n_grad_cols, int64_t hard_start, int64_t n_hard,
                         int64_t gauss_start, double log_hard_weight, double log_gauss_weight,
                         int64_t self_start, int64_t n_self, int64_t n_hard_blocks, int64_t hardness_mode,
                         double hardness_strength) {
  return ColumnLayout{n_cols,           n_grad_cols, hard_start, n_hard,        gauss_start,  log_hard_weight,
                      log_gauss_weight, self_start,  n_self,     n_hard_blocks, hardness_mode, hardness_strength};
}

std::tuple<at::Tensor, at::Tensor> infonce_fwd(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& params,
                                               const c10::optional<at::Tensor>& targets,
                                               int64_t n_cols, int64_t n_grad_cols,
                                               int64_t hard_start, int64_t n_hard,
                                               int64_t gauss_start, double log_hard_weight,
                                               double log_gauss_weight, int64_t self_start,
                                               int64_t n_self,
                                               const c10::optional<at::Tensor>& row_groups,
                                               const c10::optional<at::Tensor>& key_groups,
                                               c10::optional<double> normalize_eps,
                                               int64_t n_hard_blocks, int64_t hardness_mode,
                                               double hardness_strength,
                                               const c10::optional<at::Tensor>& thresholds,
                                               const c10::optional<at::Tensor>& guide_rows,
                                               const c10::optional<at::Tensor>& guide_cols,
                                               const c10::optional<at::Tensor>& guide_thresholds) {
  return infonce_forward_cpu(q, k, params, targets,
                             make_layout(n_cols, n_grad_cols, hard_start, n_hard, gauss_start,
                                         log_hard_weight, log_gauss_weight, self_start, n_self,
                                         n_hard_blocks, hardness_mode, hardness_strength),
                             Groups{row_groups, key_groups}, normalize_eps, thresholds,
                                  Guide{guide_rows, guide_cols, guide_thresholds});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, int64_t n_cols, int64_t n_grad_cols,
    int64_t hard_start, int64_t n_hard, int64_t gauss_start, double log_hard_weight,
    double log_gauss_weight, int64_t self_start, int64_t n_self,
    const c10::optional<at::Tensor>& row_groups, const c10::optional<at::Tensor>& key_groups,
    const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq, bool need_dk,
    c10::optional<double> normalize_eps, int64_t n_hard_blocks, int64_t hardness_mode,
    double hardness_strength, const c10::optional<at::Tensor>& thresholds,
    const c10::optional<at::Tensor>& guide_rows, const c10::optional<at::Tensor>& guide_cols,
    const c10::optional<at::Tensor>& guide_thresholds) {
  return infonce_backward_cpu(q, k, params, targets,
                              make_layout(n_cols, n_grad_cols, hard_start, n_hard, gauss_start,
                                          log_hard_weight, log_gauss_weight, self_start, n_self,
                                          n_hard_blocks, hardness_mode, hardness_strength),
                              Groups{row_groups, key_groups}, lse, grad_rows, need_dq, need_dk,
                              normalize_eps, thresholds,
                                  Guide{guide_rows, guide_cols, guide_thresholds});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_grad(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, int64_t n_cols, int64_t n_grad_cols,
    int64_t hard_start, int64_t n_hard, int64_t gauss_start, double log_hard_weight,
    double log_gauss_weight, int64_t self_start, int64_t n_self,
    const c10::optional<at::Tensor>& row_groups, const c10::optional<at::Tensor>& key_groups,
    double row_weight, bool need_dq, bool need_dk, int64_t block_rows, int64_t block_cols,
    c10::optional<double> normalize_eps, int64_t n_hard_blocks, int64_t hardness_mode,
    double hardness_strength, const c10::optional<at::Tensor>& thresholds,
    const c10::optional<at::Tensor>& guide_rows, const c10::optional<at::Tensor>& guide_cols,
    const c10::optional<at::Tensor>& guide_thresholds) {
  return infonce_forward_grad_cpu(q, k, params, targets,
                                  make_layout(n_cols, n_grad_cols, hard_start, n_hard, gauss_start,
                                              log_hard_weight, log_gauss_weight, self_start, n_self,
                                              n_hard_blocks, hardness_mode, hardness_strength),
                                  Groups{row_groups, key_groups}, row_weight, need_dq, need_dk,
                                  block_rows, block_cols, normalize_eps, thresholds,
                                  Guide{guide_rows, guide_cols, guide_thresholds});
}

}  // namespace

TORCH_LIBRARY(fastcl, m) {
  m.def(
      "infonce_fwd(Tensor q, Tensor k, Tensor params, Tensor? targets, int n_cols, "
      "int n_grad_cols, int hard_start, int n_hard, int gauss_start, float log_hard_weight, "
      "float log_gauss_weight, int self_start, int n_self, Tensor? row_groups, Tensor? key_groups, "
      "float? normalize_eps=None, int n_hard_blocks=1, int hardness_mode=0, float hardness_strength=0., "
      "Tensor? thresholds=None, Tensor? guide_rows=None, Tensor? guide_cols=None, "
      "Tensor? guide_thresholds=None) -> (Tensor lse, Tensor target_logit)");
  m.def(
      "infonce_bwd(Tensor q, Tensor k, Tensor params, Tensor? targets, int n_cols, "
      "int n_grad_cols, int hard_start, int n_hard, int gauss_start, float log_hard_weight, "
      "float log_gauss_weight, int self_start, int n_self, Tensor? row_groups, Tensor? key_groups, "
      "Tensor lse, Tensor grad_rows, bool need_dq, bool need_dk, float? normalize_eps=None, "
      "int n_hard_blocks=1, int hardness_mode=0, float hardness_strength=0., Tensor? thresholds=None, "
      "Tensor? guide_rows=None, Tensor? guide_cols=None, "
      "Tensor? guide_thresholds=None) "
      "-> (Tensor dq, Tensor dk, Tensor row_dot)");
  m.def(
      "infonce_fwd_grad(Tensor q, Tensor k, Tensor params, Tensor? targets, int n_cols, "
      "int n_grad_cols, int hard_start, int n_hard, int gauss_start, float log_hard_weight, "
      "float log_gauss_weight, int self_start, int n_self, Tensor? row_groups, Tensor? key_groups, "
      "float row_weight, bool need_dq, bool need_dk, int block_rows, int block_cols, "
      "float? normalize_eps=None, int n_hard_blocks=1, int hardness_mode=0, float hardness_strength=0., "
      "Tensor? thresholds=None, Tensor? guide_rows=None, Tensor? guide_cols=None, "
      "Tensor? guide_thresholds=None) -> (Tensor loss_rows, Tensor dq, Tensor dk, Tensor row_dot)");
}

TORCH_LIBRARY_IMPL(fastcl, CPU, m) {
  m.impl("infonce_fwd", &infonce_fwd);
  m.impl("infonce_bwd", &infonce_bwd);
  m.impl("infonce_fwd_grad", &infonce_fwd_grad);
}

}  // namespace fastcl
