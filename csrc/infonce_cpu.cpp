// Native CPU forward and backward of the fused InfoNCE loss.
//
// Work is split into chunks of query rows, which the threads of ATen's pool take one at
// a time, and, within a chunk, tiles of key columns. Per (chunk, tile) the similarity block
// S = q_chunk @ k_tile^T comes from one product (block_product into a per-thread buffer:
// oneDNN or ATen's BLAS, single-threaded inside the pool), and the softmax is fused on that
// block while it is in cache:
//
//   forward:  logits -> running row max and rescaled sum (online log-sum-exp, as the
//             Triton kernel does) and the target logit; nothing N x M is kept.
//   backward: G = g_i * (exp(logit - lse_i) - [j == t_i]) on the block, then two more
//             products: dq_chunk += G k_tile / tau and dk_tile += G^T q_chunk / tau.
//
// So the forward costs 2NMD FLOPs and the backward 6NMD (S recomputed once, no second
// pass for dk), and memory is O((N + M) * D) for inputs and gradients plus two
// rows x cols blocks per thread. dq rows belong to one chunk, so one thread; dk tiles
// are shared by all chunks, which add into each tile in chunk order (TileTurns), so
// the result does not depend on scheduling.
//
// Masked columns (NT-Xent's self column, other groups' keys, entries the false-negative
// margin or the guide drops) get logit -inf, so exp = 0: they drop out of the softmax and receive no
// gradient; a target of -1 (the ring's "not in this block") matches no column. The
// hardness penalty moves a logit's value only, so the backward's G = g (P - onehot) uses
// the penalized softmax and its products stay those of 1/tau.
//
// fp32 and fp64 compute in their own precision; bf16 and fp16 inputs are copied to
// fp32 first ((N + M) * D extra) and the gradients are cast back at the end.
//
// Normalization (normalize_eps set) is fused the same way: the kernels take raw rows
// and one inverse norm per row, r_i = 1 / max(|q_i|, eps) and c_j likewise, so the
// cosine block is S_ij * r_i * c_j, straight out of the same product. With g_i the
// gradient with respect to the unit row q^_i, F.normalize's backward is
//   dq_i = r_i g_i - [|q_i| > eps] r_i (g_i . q^_i) q^_i,
// and g_i . q^_i = (1/tau) sum_j G_ij cos_ij is row_dot_i, which the backward sums
// anyway (the 1/tau gradient). So G is scaled by r_i c_j before the two products and
// one rank-1 correction per row follows; for dk the same, with the column sums
// col_dot_j = sum_i G_ij cos_ij added per tile in chunk order. Neither the unit rows
// nor their gradients (4 (N + M) D values) ever exist.

#include "infonce_cpu.h"
#include "infonce_common.h"

namespace fastcl {
namespace {

using namespace detail;

template <typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const acc_t* params,
                    const int64_t* targets, const ColumnLayout& layout, const GroupIds& groups,
                    const RowScales<acc_t>& scales, const acc_t* thresholds, const GuideRule<acc_t>& guide,
                    acc_t* lse, acc_t* target_logit) {
  const int64_t n_rows = q.size(0);
  const int64_t n_cols = k.size(0);
  const Tiling tiling = make_tiling(n_rows, n_cols, groups.rows != nullptr);
  const GroupSkips skips(groups, tiling, n_rows, n_cols, layout.n_grad_cols);
  const EntryRules<acc_t> rules(layout, params, targets, thresholds);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t exp_floor = ExpRange<acc_t>::floor;
  const acc_t cutoff = exp_cutoff<acc_t>();

  for_chunks_in_pool(tiling, [&](std::atomic<int64_t>& next_chunk) {
    const at::Tensor buffer = at::empty({tiling.rows * tiling.cols}, q.options());
    const at::Tensor guide_block = guide_buffer(guide, tiling);
    std::vector<acc_t> run_max(tiling.rows);
    std::vector<acc_t> run_sum(tiling.rows);
    for (int64_t chunk = next_chunk++; chunk < tiling.n_chunks; chunk = next_chunk++) {
      const int64_t r0 = chunk * tiling.rows;
      const int64_t nr = std::min(tiling.rows, n_rows - r0);
      const at::Tensor q_chunk = q.narrow(0, r0, nr);
      std::fill(run_max.begin(), run_max.end(), neg_inf);
      std::fill(run_sum.begin(), run_sum.end(), acc_t(0));
      std::fill(target_logit + r0, target_logit + r0 + nr, acc_t(0));
      for (int64_t tile = 0; tile < tiling.n_tiles; ++tile) {
        if (skips.skip(chunk, tile)) {
          continue;
        }
        const int64_t c0 = tile * tiling.cols;
        const int64_t nc = std::min(tiling.cols, n_cols - c0);
        at::Tensor block = block_view(buffer, nr, nc);
        block_product(q_chunk, k.narrow(0, c0, nc).t(), block, false);
        acc_t* x = block.data_ptr<acc_t>();
        if (scales.enabled()) {
          scale_block(x, nr, nc, scales.q_inv + r0, scales.k_inv + c0);
        }
        to_logits(x, x, nr, nc, r0, c0, layout, groups, rules);
        apply_guide(x, nr, nc, r0, c0, guide, targets, layout.n_grad_cols, guide_block);
        for (int64_t i = 0; i < nr; ++i) {
          acc_t* row = x + i * nc;
          const int64_t t = target_of(targets, r0 + i);  // -1 lies in no tile
          if (t >= c0 && t < c0 + nc) {
            target_logit[r0 + i] = row[t - c0];
          }
          acc_t new_max = run_max[i];
          for (int64_t j = 0; j < nc; ++j) {
            new_max = std::max(new_max, row[j]);
          }
          // A row may have no candidate yet (masked columns only): keep its -inf logits
          // at -inf (exp 0) instead of forming -inf - -inf.
          const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;
          for (int64_t j = 0; j < nc; ++j) {
            row[j] = std::max(row[j] - shift, exp_floor);  // see ExpRange
          }
          run_sum[i] = run_max[i] == neg_inf ? acc_t(0) : run_sum[i] * std::exp(run_max[i] - new_max);
          run_max[i] = new_max;
        }
        block.exp_();  // ATen's vectorized exp (AVX2 / AVX-512 picked at run time)
        for (int64_t i = 0; i < nr; ++i) {
          const acc_t* row = x + i * nc;
          acc_t sum = 0;
          for (int64_t j = 0; j < nc; ++j) {
            sum += row[j] <= cutoff ? acc_t(0) : row[j];  // written so that a NaN stays NaN
          }
          run_sum[i] += sum;
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        lse[r0 + i] = run_max[i] + std::log(run_sum[i]);
      }
    }
  });
}


template <typename acc_t>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const acc_t* params,
                     const int64_t* targets, const ColumnLayout& layout, const GroupIds& groups,
                     const RowScales<acc_t>& scales, const acc_t* thresholds, const GuideRule<acc_t>& guide,
                     const acc_t* lse,
                     const acc_t* grad_rows,
                     at::Tensor& dq, at::Tensor& dk, acc_t* row_dot, acc_t* col_dot) {
  const int64_t n_rows = q.size(0);
  const int64_t n_cols = k.size(0);
  const int64_t dim = q.size(1);
  const bool need_dq = dq.defined();
  const bool need_dk = dk.defined();
  const Tiling tiling = make_tiling(n_rows, n_cols, groups.rows != nullptr);
  const GroupSkips skips(groups, tiling, n_rows, n_cols, layout.n_grad_cols);
  const EntryRules<acc_t> rules(layout, params, targets, thresholds);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  TileTurns turns(tiling.n_tiles, tiling.n_chunks, skips);
  constexpr acc_t exp_floor = ExpRange<acc_t>::floor;
  const acc_t cutoff = exp_cutoff<acc_t>();

  for_chunks_in_pool(tiling, [&](std::atomic<int64_t>& next_chunk) {
    const at::Tensor sim_buffer = at::empty({tiling.rows * tiling.cols}, q.options());
    const at::Tensor grad_buffer = at::empty({tiling.rows * tiling.cols}, q.options());
    const at::Tensor guide_block = guide_buffer(guide, tiling);
    std::vector<acc_t> chunk_row_dot(tiling.rows);
    std::vector<acc_t> tile_col_dot(scales.enabled() && need_dk ? tiling.cols : 0);
    try {
      for (int64_t chunk = next_chunk++; chunk < tiling.n_chunks; chunk = next_chunk++) {
        const int64_t r0 = chunk * tiling.rows;
        const int64_t nr = std::min(tiling.rows, n_rows - r0);
        const at::Tensor q_chunk = q.narrow(0, r0, nr);
        at::Tensor dq_chunk;
        if (need_dq) {
          dq_chunk = dq.narrow(0, r0, nr);
          dq_chunk.zero_();
        }
        std::fill(chunk_row_dot.begin(), chunk_row_dot.end(), acc_t(0));
        for (int64_t tile = 0; tile < tiling.n_tiles; ++tile) {
          const int64_t c0 = tile * tiling.cols;
          const int64_t nc = std::min(tiling.cols, n_cols - c0);
          const bool tile_dk = need_dk && c0 < layout.n_grad_cols;
          if ((!need_dq && !tile_dk) || skips.skip(chunk, tile)) {
            continue;  // columns past n_grad_cols only feed dq; skipped blocks have G = 0
          }
          const at::Tensor k_tile = k.narrow(0, c0, nc);
          at::Tensor sim = block_view(sim_buffer, nr, nc);
          at::Tensor grad = block_view(grad_buffer, nr, nc);
          block_product(q_chunk, k_tile.t(), sim, false);
          if (scales.enabled()) {
            scale_block(sim.data_ptr<acc_t>(), nr, nc, scales.q_inv + r0, scales.k_inv + c0);
          }
          const acc_t* s = sim.data_ptr<acc_t>();
          acc_t* x = grad.data_ptr<acc_t>();
          to_logits(x, s, nr, nc, r0, c0, layout, groups, rules);
          apply_guide(x, nr, nc, r0, c0, guide, targets, layout.n_grad_cols, guide_block);
          for (int64_t i = 0; i < nr; ++i) {
            acc_t* row = x + i * nc;
            // A row with every entry masked (lse -inf) keeps its -inf logits at -inf
            // (probability 0) instead of forming -inf - -inf.
            const acc_t row_lse = lse[r0 + i] == neg_inf ? acc_t(0) : lse[r0 + i];
            for (int64_t j = 0; j < nc; ++j) {
              row[j] = std::max(row[j] - row_lse, exp_floor);  // see ExpRange
            }
          }
          grad.exp_();  // the softmax P of the block
          for (int64_t i = 0; i < nr; ++i) {
            acc_t* row = x + i * nc;
            const acc_t g = grad_rows[r0 + i];
            for (int64_t j = 0; j < nc; ++j) {
              row[j] = row[j] <= cutoff ? acc_t(0) : row[j] * g;  // g_i P_ij (a NaN stays NaN)
            }
            const int64_t t = target_of(targets, r0 + i);  // -1 lies in no tile
            if (t >= c0 && t < c0 + nc) {
              row[t - c0] -= g;  // G = g_i (P - onehot): the gradient of the loss w.r.t. the logits
            }
            if (need_dq) {
              // sum_j G s: summed over rows, the gradient with respect to 1 / tau.
              const acc_t* s_row = s + i * nc;
              acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
              int64_t j = 0;
              for (; j + 4 <= nc; j += 4) {
                dot0 += row[j] * s_row[j];
                dot1 += row[j + 1] * s_row[j + 1];
                dot2 += row[j + 2] * s_row[j + 2];
                dot3 += row[j + 3] * s_row[j + 3];
              }
              for (; j < nc; ++j) {
                dot0 += row[j] * s_row[j];
              }
              chunk_row_dot[i] += (dot0 + dot1) + (dot2 + dot3);
            }
          }
          const int64_t n_grad = tile_dk ? std::min(nc, layout.n_grad_cols - c0) : 0;
          if (scales.enabled()) {
            if (tile_dk) {  // this block's share of col_dot_j = sum_i G_ij cos_ij
              std::fill(tile_col_dot.begin(), tile_col_dot.begin() + n_grad, acc_t(0));
              for (int64_t i = 0; i < nr; ++i) {
                const acc_t* row = x + i * nc;
                const acc_t* s_row = s + i * nc;
                for (int64_t j = 0; j < n_grad; ++j) {
                  tile_col_dot[j] += row[j] * s_row[j];
                }
              }
            }
            scale_block(x, nr, nc, scales.q_inv + r0, scales.k_inv + c0);
          }
          if (need_dq) {
            block_product(grad, k_tile, dq_chunk, /*accumulate=*/true, /*alpha=*/rules.w.inv_tau);
          }
          if (tile_dk) {
            at::Tensor dk_tile = dk.narrow(0, c0, n_grad);
            turns.wait_for(tile, chunk);
            block_product(grad.narrow(1, 0, n_grad).t(), q_chunk, dk_tile, /*accumulate=*/true,
                          /*alpha=*/rules.w.inv_tau);
            if (scales.enabled()) {
              for (int64_t j = 0; j < n_grad; ++j) {
                col_dot[c0 + j] += tile_col_dot[j];
              }
            }
            turns.done(tile);
          }
        }
        if (need_dq) {
          std::copy(chunk_row_dot.begin(), chunk_row_dot.begin() + nr, row_dot + r0);
          if (scales.enabled()) {
            // The projection term of the normalization: dq_i -= (1/tau) row_dot_i q_proj_i q_i.
            for (int64_t i = 0; i < nr; ++i) {
              chunk_row_dot[i] *= rules.w.inv_tau * scales.q_proj[r0 + i];
            }
            subtract_scaled_rows(dq_chunk.data_ptr<acc_t>(), q_chunk.data_ptr<acc_t>(), chunk_row_dot.data(),
                                 nr, dim);
          }
        }
      }
    } catch (...) {
      turns.abort();
      throw;
    }
  });
  if (scales.enabled() && need_dk) {
    // The projection term of the key rows, now that col_dot is complete.
    const int64_t n_grad = layout.n_grad_cols;
    for (int64_t j = 0; j < n_grad; ++j) {
      col_dot[j] *= rules.w.inv_tau * scales.k_proj[j];
    }
    acc_t* dk_data = dk.data_ptr<acc_t>();
    const acc_t* k_data = k.data_ptr<acc_t>();
    at::parallel_for(0, n_grad, 256, [&](int64_t begin, int64_t end) {
      subtract_scaled_rows(dk_data + begin * dim, k_data + begin * dim, col_dot + begin, end - begin, dim);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> infonce_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, const ColumnLayout& layout, const Groups& groups,
    c10::optional<double> normalize_eps, const c10::optional<at::Tensor>& thresholds, const Guide& guide) {
  const CheckedRules checked = check_rules("fastcl::infonce_fwd", q, k, params, targets, layout, groups,
                                           thresholds, guide);
  const at::ScalarType acc = checked.acc;
  // Detached: the kernel's own products are not part of any autograd graph.
  const at::Tensor qa = q.detach().to(acc).contiguous();
  const at::Tensor ka = k.detach().to(acc).contiguous();
  const at::Tensor pa = params.contiguous();
  at::Tensor lse = at::empty({q.size(0)}, q.options().dtype(acc));
  at::Tensor target_logit = at::empty({q.size(0)}, q.options().dtype(acc));
  if (q.size(0) == 0) {
    return {lse, target_logit};
  }
  const at::Tensor scale_storage = row_scale_storage("fastcl::infonce_fwd", qa, ka, normalize_eps);
  AT_DISPATCH_FLOATING_TYPES(acc, "infonce_forward_cpu", [&] {
    forward_kernel<scalar_t>(qa, ka, pa.data_ptr<scalar_t>(),
                             checked.target_pointer(), layout,
                             group_pointers(checked.groups),
                             scale_pointers<scalar_t>(scale_storage, qa.size(0), ka.size(0)),
                             checked.threshold_pointer<scalar_t>(), guide_rule<scalar_t>(checked.guide),
                             lse.data_ptr<scalar_t>(),
                             target_logit.data_ptr<scalar_t>());
  });
  return {lse, target_logit};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
    const c10::optional<at::Tensor>& targets, const ColumnLayout& layout, const Groups& groups,
    const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq, bool need_dk,
    c10::optional<double> normalize_eps, const c10::optional<at::Tensor>& thresholds, const Guide& guide) {
  const CheckedRules checked = check_rules("fastcl::infonce_bwd", q, k, params, targets, layout, groups,
                                           thresholds, guide);
  const at::ScalarType acc = checked.acc;
  const int64_t n_rows = q.size(0);
  const int64_t dim = q.size(1);
  TORCH_CHECK(lse.device().is_cpu() && lse.dim() == 1 && lse.size(0) == n_rows &&
                  lse.scalar_type() == acc,
              "fastcl::infonce_bwd: lse must be a 1-D CPU ", acc, " tensor of length ", n_rows,
              ", got ", lse.scalar_type(), " of shape ", lse.sizes());
  TORCH_CHECK(grad_rows.device().is_cpu() && grad_rows.dim() == 1 && grad_rows.size(0) == n_rows &&
                  at::isFloatingType(grad_rows.scalar_type()),
              "fastcl::infonce_bwd: grad_rows must be a 1-D floating CPU tensor of length ", n_rows,
              ", got ", grad_rows.scalar_type(), " of shape ", grad_rows.sizes());
  const bool want_dk = need_dk && layout.n_grad_cols > 0;
  const at::TensorOptions acc_options = q.options().dtype(acc);
  // Detached: the kernel's own products are not part of any autograd graph.
  const at::Tensor qa = q.detach().to(acc).contiguous();
  const at::Tensor ka = k.detach().to(acc).contiguous();
  const at::Tensor pa = params.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor g = grad_rows.to(acc).contiguous();
  // fp32 / fp64 inputs accumulate straight into the outputs; half inputs into fp32.
  at::Tensor dq_acc = need_dq ? at::empty({n_rows, dim}, acc_options) : at::Tensor();
  at::Tensor dk_acc = want_dk ? at::zeros({layout.n_grad_cols, dim}, acc_options) : at::Tensor();
  at::Tensor row_dot = at::empty({need_dq ? n_rows : 0}, acc_options);
  if (n_rows > 0 && (need_dq || want_dk)) {
    const at::Tensor scale_storage = row_scale_storage("fastcl::infonce_bwd", qa, ka, normalize_eps);
    at::Tensor col_dot = at::zeros({scale_storage.defined() && want_dk ? layout.n_grad_cols : 0}, acc_options);
    AT_DISPATCH_FLOATING_TYPES(acc, "infonce_backward_cpu", [&] {
      backward_kernel<scalar_t>(qa, ka, pa.data_ptr<scalar_t>(),
                                checked.target_pointer(), layout,
                                group_pointers(checked.groups),
                                scale_pointers<scalar_t>(scale_storage, n_rows, ka.size(0)),
                                checked.threshold_pointer<scalar_t>(), guide_rule<scalar_t>(checked.guide),
                                lse_c.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dq_acc, dk_acc,
                                need_dq ? row_dot.data_ptr<scalar_t>() : nullptr,
                                col_dot.data_ptr<scalar_t>());
    });
  }
  at::Tensor dq = need_dq ? dq_acc.to(q.scalar_type()) : at::empty({0, dim}, q.options());
  at::Tensor dk = want_dk ? dk_acc.to(q.scalar_type()) : at::empty({0, dim}, q.options());
  return {dq, dk, row_dot};
}

}  // namespace fastcl
