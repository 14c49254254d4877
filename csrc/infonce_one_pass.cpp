// Native CPU one-pass InfoNCE: the per-row losses and the gradients of a reduced loss
// in one sweep over the logits, 6NMD FLOPs instead of the forward's 2NMD plus the
// recomputing backward's 6NMD.
//
// When the loss is reduced (mean or sum), every row's incoming gradient is the same
// weight w (1/N or 1) times the one scalar that autograd hands the backward later. So
// the gradients with respect to q and k can be formed now, with w, and the backward
// only scales them. Per chunk of R query rows (ATen's pool threads take chunks one at a
// time, as in infonce_cpu.cpp):
//
//   1. per tile of key columns: S_t = q_R k_t^T into the chunk's strip (BLAS), turned
//      into logits on the block while it is in cache (1/tau, the row and column inverse
//      norms of fused normalization, the layout's weights and masks, the hardness
//      penalty, the false-negative margin and the guide), the row maxima and the target logits
//      picked out. The penalty moves a logit's value only: the steps below, which hold
//      d logit / d sim = 1/tau, stay as they are;
//   2. per tile: E = exp(logit - max) in ATen's vectorized exp (arguments clamped to its
//      fast range, see ExpRange), the row sums, and E scaled by the column inverse norms
//      c_j; the row's target entry then gets c_t * sum_i subtracted, so that with
//      f_i = w r_i / sum_i the gradient of the loss with respect to the raw product
//      q_i . k_j is (1/tau) f_i E''_ij;
//   3. per tile, two more products: A_R += E''_t k_t (dq before its row factors) and
//      dk_t += E''_t^T (f q_R / tau). dk tiles are shared by all chunks, which add into
//      each in chunk order (TileTurns): the result does not depend on scheduling. A chunk
//      whose turn at a tile has not come yet does its next dq product meanwhile.
//   4. per row: dq_i = (f_i / tau) (A_i - (q_i . A_i) proj_i q_i) (the rank-1 term of
//      normalization's backward, proj_i = 1 / |q_i|^2, 0 when eps clamps the norm), and
//      the temperature's row sum sum_j G_ij cos_ij = f_i (q_i . A_i): the cosines never
//      need to be kept. dk gets its rank-1 terms once complete: (k_j . dk_j) proj_j k_j.
//
// Memory: the loss rows, dq and dk, (N + M) D values, plus per thread one R x M strip
// (only the visited tiles' columns with groups) and R x D of scaled rows. The caller
// bounds R so that the strips stay within the size of the gradients (fastcl/ops/configs.py).
//
// fp32 and fp64 compute in their own precision; bf16 and fp16 inputs are copied to fp32
// and the gradients stay in fp32 (the autograd Function casts them after scaling).

#include "infonce_common.h"
#include "row_loops.h"

namespace fastcl {
namespace {

using namespace detail;

// Rows per chunk and columns per tile. 0 takes a default that suits direct operator
// calls (fastcl's loss passes the sizes its rule chooses, fastcl/ops/configs.py): at
// least one chunk per thread, 256 x 512 blocks.
Tiling one_pass_tiling(int64_t n_rows, int64_t n_cols, int64_t block_rows, int64_t block_cols, bool grouped) {
  TORCH_CHECK(block_rows >= 0 && block_cols >= 0, "fastcl::infonce_fwd_grad: block_rows and block_cols must be >= 0, "
              "got ", block_rows, " and ", block_cols);
  int64_t rows = block_rows;
  int64_t cols = block_cols;
  if (rows == 0) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    rows = std::min<int64_t>(grouped ? GROUPED_TILE_ROWS : 256, std::max<int64_t>(32, (n_rows + threads - 1) / threads));
  }
  if (cols == 0) {
    cols = grouped ? GROUPED_TILE_COLS : 512;
  }
  rows = std::max<int64_t>(1, std::min(rows, n_rows));
  cols = std::max<int64_t>(1, std::min(cols, n_cols));
  return {rows, cols, (n_rows + rows - 1) / rows, (n_cols + cols - 1) / cols};
}

// x (nr x nc, rows r0.., columns c0..) holds raw products; they become logits in place:
// s * row_factor[i] * col_scale[j] (1/tau, times the inverse norms with normalization),
// plus the layout's weights, -inf where a column is not a candidate of the row. With
// per-entry rules (the hardness penalty, the margin), which read each similarity, the
// products first become similarities (times the inverse norms q_inv[i] c[j], both null
// without normalization), then logits (to_logits).
template <typename acc_t>
void products_to_logits(acc_t* x, int64_t nr, int64_t nc, int64_t r0, int64_t c0, const acc_t* row_factor,
                        const acc_t* q_inv, const acc_t* col_scale, const ColumnLayout& layout,
                        const GroupIds& groups, const EntryRules<acc_t>& rules) {
  if (rules.active()) {
    if (q_inv != nullptr) {
      for (int64_t i = 0; i < nr; ++i) {
        rows::scale(x + i * nc, nc, q_inv[i], col_scale);
      }
    }
    to_logits(x, x, nr, nc, r0, c0, layout, groups, rules);
    return;
  }
  for (int64_t i = 0; i < nr; ++i) {
    rows::scale(x + i * nc, nc, row_factor[i], col_scale);
  }
  add_weights_and_masks(x, nr, nc, r0, c0, rules.w, layout, groups);
}

// A visited tile of a chunk: its columns and where its block sits in the strip.
struct StripTile {
  int64_t tile;
  int64_t c0;
  int64_t nc;
  int64_t offset;
};

template <typename acc_t>
void one_pass_kernel(const at::Tensor& q, const at::Tensor& k, const acc_t* params, const int64_t* targets,
                     const ColumnLayout& layout, const GroupIds& groups, const RowScales<acc_t>& scales,
                     const acc_t* thresholds, const GuideRule<acc_t>& guide, acc_t row_weight, const Tiling& tiling,
                     acc_t* loss_rows, at::Tensor& dq, at::Tensor& dk, acc_t* row_dot) {
  const int64_t n_rows = q.size(0);
  const int64_t n_cols = k.size(0);
  const int64_t dim = q.size(1);
  const bool need_dq = dq.defined();
  const bool need_dk = dk.defined();
  const GroupSkips skips(groups, tiling, n_rows, n_cols, layout.n_grad_cols);
  const EntryRules<acc_t> rules(layout, params, targets, thresholds);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t exp_floor = ExpRange<acc_t>::floor;
  const acc_t cutoff = exp_cutoff<acc_t>();
  TileTurns turns(tiling.n_tiles, tiling.n_chunks, skips);

  // The strip holds the visited tiles of a chunk: every column without groups, else the
  // most that any chunk visits.
  int64_t strip_cols = n_cols;
  if (groups.rows != nullptr) {
    strip_cols = 0;
    for (int64_t chunk = 0; chunk < tiling.n_chunks; ++chunk) {
      int64_t cols = 0;
      for (int64_t tile = 0; tile < tiling.n_tiles; ++tile) {
        if (!skips.skip(chunk, tile)) {
          cols += std::min(tiling.cols, n_cols - tile * tiling.cols);
        }
      }
      strip_cols = std::max(strip_cols, cols);
    }
  }
  const acc_t* q_data = q.data_ptr<acc_t>();

  for_chunks_in_pool(tiling, [&](std::atomic<int64_t>& next_chunk) {
    const at::Tensor strip = at::empty({std::max<int64_t>(1, tiling.rows * strip_cols)}, q.options());
    const at::Tensor q_scaled_buffer = need_dk ? at::empty({tiling.rows, dim}, q.options()) : at::Tensor();
    const at::Tensor guide_block = guide_buffer(guide, tiling);
    std::vector<acc_t> row_factor(tiling.rows), row_max(tiling.rows), row_sum(tiling.rows), target_logit(tiling.rows);
    std::vector<int64_t> target_at(tiling.rows);  // the target's index in the strip, -1 if none
    std::vector<StripTile> visited;
    std::vector<size_t> pending;  // visited tiles whose dk product is still to do
    acc_t* base = strip.data_ptr<acc_t>();
    try {
      for (int64_t chunk = next_chunk++; chunk < tiling.n_chunks; chunk = next_chunk++) {
        const int64_t r0 = chunk * tiling.rows;
        const int64_t nr = std::min(tiling.rows, n_rows - r0);
        const at::Tensor q_chunk = q.narrow(0, r0, nr);
        for (int64_t i = 0; i < nr; ++i) {
          row_factor[i] = scales.enabled() ? rules.w.inv_tau * scales.q_inv[r0 + i] : rules.w.inv_tau;
        }
        std::fill(row_max.begin(), row_max.end(), neg_inf);
        std::fill(target_logit.begin(), target_logit.end(), acc_t(0));
        std::fill(target_at.begin(), target_at.end(), int64_t(-1));
        visited.clear();
        int64_t offset = 0;
        for (int64_t tile = 0; tile < tiling.n_tiles; ++tile) {
          if (!skips.skip(chunk, tile)) {
            const int64_t c0 = tile * tiling.cols;
            const int64_t nc = std::min(tiling.cols, n_cols - c0);
            visited.push_back({tile, c0, nc, offset});
            offset += nr * nc;
          }
        }

        // 1. Logits, row maxima and target logits, block by block.
        for (const StripTile& t : visited) {
          at::Tensor block = strip.narrow(0, t.offset, nr * t.nc).view({nr, t.nc});
          block_product(q_chunk, k.narrow(0, t.c0, t.nc).t(), block, false);
          acc_t* x = base + t.offset;
          products_to_logits(x, nr, t.nc, r0, t.c0, row_factor.data(), scales.enabled() ? scales.q_inv + r0 : nullptr,
                             scales.enabled() ? scales.k_inv + t.c0 : nullptr, layout, groups, rules);
          apply_guide(x, nr, t.nc, r0, t.c0, guide, targets, layout.n_grad_cols, guide_block);
          for (int64_t i = 0; i < nr; ++i) {
            const acc_t* row = x + i * t.nc;
            const int64_t target = target_of(targets, r0 + i);  // -1 lies in no tile
            if (target >= t.c0 && target < t.c0 + t.nc) {
              target_logit[i] = row[target - t.c0];
              target_at[i] = t.offset + i * t.nc + (target - t.c0);
            }
            row_max[i] = std::max(row_max[i], rows::max(row, t.nc));
          }
        }

        // 2. E = exp(logit - max), the row sums, E scaled by the column inverse norms.
        std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
        for (const StripTile& t : visited) {
          acc_t* x = base + t.offset;
          for (int64_t i = 0; i < nr; ++i) {
            // A row with no candidate at all keeps its -inf logits at -inf (exp 0).
            const acc_t shift = row_max[i] == neg_inf ? acc_t(0) : row_max[i];
            rows::shift_floor(x + i * t.nc, t.nc, shift, exp_floor);  // see ExpRange
          }
          strip.narrow(0, t.offset, nr * t.nc).exp_();
          const acc_t* col_scale = scales.enabled() ? scales.k_inv + t.c0 : nullptr;
          for (int64_t i = 0; i < nr; ++i) {  // exp at or below the cutoff counts as 0; a NaN stays NaN
            row_sum[i] += rows::cut_sum_scale(x + i * t.nc, t.nc, cutoff, col_scale);
          }
        }
        for (int64_t i = 0; i < nr; ++i) {
          const acc_t shift = row_max[i] == neg_inf ? acc_t(0) : row_max[i];
          loss_rows[r0 + i] = shift + std::log(row_sum[i]) - target_logit[i];
          if (target_at[i] >= 0) {  // E'' = E c - [j == t] c_t sum: P - onehot, times sum / c
            const int64_t target = target_of(targets, r0 + i);
            base[target_at[i]] -= (scales.enabled() ? scales.k_inv[target] : acc_t(1)) * row_sum[i];
          }
          // f_i: the gradient with respect to the raw products is (1/tau) f_i E''. A row
          // with every entry masked (sum 0, E'' 0) gets no gradient: f_i 0, not w / 0.
          row_factor[i] = row_sum[i] == acc_t(0)
                              ? acc_t(0)
                              : row_weight * (scales.enabled() ? scales.q_inv[r0 + i] : acc_t(1)) / row_sum[i];
        }

        // 3. The products: dq's A_R += E''_t k_t, dk_t += E''_t^T (f q_R / tau).
        at::Tensor q_scaled;
        if (need_dk) {
          q_scaled = q_scaled_buffer.narrow(0, 0, nr);
          acc_t* out = q_scaled.data_ptr<acc_t>();
          for (int64_t i = 0; i < nr; ++i) {
            rows::scaled_copy(out + i * dim, q_data + (r0 + i) * dim, dim, row_factor[i] * rules.w.inv_tau);
          }
        }
        at::Tensor dq_chunk = need_dq ? dq.narrow(0, r0, nr) : at::Tensor();
        auto dk_product = [&](const StripTile& t) {
          const int64_t n_grad = std::min(t.nc, layout.n_grad_cols - t.c0);
          at::Tensor block = strip.narrow(0, t.offset, nr * t.nc).view({nr, t.nc});
          at::Tensor dk_tile = dk.narrow(0, t.c0, n_grad);
          block_product(block.narrow(1, 0, n_grad).t(), q_scaled, dk_tile, true);
          turns.done(t.tile);
        };
        pending.clear();
        for (size_t v = 0; v < visited.size(); ++v) {
          if (need_dk && visited[v].c0 < layout.n_grad_cols) {
            pending.push_back(v);
          }
        }
        size_t n_done = 0;  // pending[0, n_done) are done
        bool dq_started = false;
        if (need_dq) {
          for (const StripTile& t : visited) {
            at::Tensor block = strip.narrow(0, t.offset, nr * t.nc).view({nr, t.nc});
            block_product(block, k.narrow(0, t.c0, t.nc), dq_chunk, dq_started);
            dq_started = true;
            // Whatever dk products can go now, without waiting.
            for (size_t p = n_done; p < pending.size(); ++p) {
              if (turns.ready(visited[pending[p]].tile, chunk)) {
                dk_product(visited[pending[p]]);
                std::swap(pending[p], pending[n_done]);
                ++n_done;
              }
            }
          }
        }
        // The rest of dk, in tile order, waiting for each turn.
        std::sort(pending.begin() + n_done, pending.end());
        for (; n_done < pending.size(); ++n_done) {
          const StripTile& t = visited[pending[n_done]];
          turns.wait_for(t.tile, chunk);
          dk_product(t);
        }

        // 4. dq's row factors and normalization's rank-1 term; the temperature's row sums.
        if (need_dq) {
          acc_t* a = dq_chunk.data_ptr<acc_t>();
          if (!dq_started) {
            std::fill(a, a + nr * dim, acc_t(0));
          }
          for (int64_t i = 0; i < nr; ++i) {
            acc_t* a_row = a + i * dim;
            const acc_t* q_row = q_data + (r0 + i) * dim;
            const acc_t dot = rows::dot(a_row, q_row, dim);
            const acc_t f = row_factor[i];
            row_dot[r0 + i] = f * dot;
            const acc_t proj = scales.enabled() ? dot * scales.q_proj[r0 + i] : acc_t(0);
            rows::scale_minus(a_row, q_row, dim, f * rules.w.inv_tau, proj);
          }
        }
      }
    } catch (...) {
      turns.abort();
      throw;
    }
  });
  if (scales.enabled() && need_dk) {
    // The rank-1 terms of the key rows, now that dk is complete: (k_j . dk_j) proj_j k_j.
    acc_t* dk_data = dk.data_ptr<acc_t>();
    const acc_t* k_data = k.data_ptr<acc_t>();
    at::parallel_for(0, layout.n_grad_cols, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        acc_t* g = dk_data + j * dim;
        const acc_t* x = k_data + j * dim;
        rows::scale_minus(g, x, dim, acc_t(1), rows::dot(g, x, dim) * scales.k_proj[j]);
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_forward_grad_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& params, const c10::optional<at::Tensor>& targets,
    const ColumnLayout& layout, const Groups& groups, double row_weight, bool need_dq, bool need_dk,
    int64_t block_rows, int64_t block_cols, c10::optional<double> normalize_eps,
    const c10::optional<at::Tensor>& thresholds, const Guide& guide) {
  const char* fn = "fastcl::infonce_fwd_grad";
  const CheckedRules checked = check_rules(fn, q, k, params, targets, layout, groups, thresholds, guide);
  TORCH_CHECK(std::isfinite(row_weight), fn, ": row_weight must be finite, got ", row_weight);
  const at::ScalarType acc = checked.acc;
  const int64_t n_rows = q.size(0);
  const int64_t dim = q.size(1);
  const bool want_dk = need_dk && layout.n_grad_cols > 0;
  const at::TensorOptions acc_options = q.options().dtype(acc);
  // Detached: the kernel's own products are not part of any autograd graph.
  const at::Tensor qa = q.detach().to(acc).contiguous();
  const at::Tensor ka = k.detach().to(acc).contiguous();
  const at::Tensor pa = params.contiguous();
  at::Tensor loss_rows = at::empty({n_rows}, acc_options);
  at::Tensor dq = need_dq ? at::empty({n_rows, dim}, acc_options) : at::Tensor();
  at::Tensor dk = want_dk ? at::zeros({layout.n_grad_cols, dim}, acc_options) : at::Tensor();
  at::Tensor row_dot = at::empty({need_dq ? n_rows : 0}, acc_options);
  if (n_rows > 0) {
    const Tiling tiling = one_pass_tiling(n_rows, layout.n_cols, block_rows, block_cols, checked.groups.first.defined());
    const at::Tensor scale_storage = row_scale_storage(fn, qa, ka, normalize_eps);
    AT_DISPATCH_FLOATING_TYPES(acc, "infonce_forward_grad_cpu", [&] {
      one_pass_kernel<scalar_t>(qa, ka, pa.data_ptr<scalar_t>(), checked.target_pointer(),
                                layout, group_pointers(checked.groups),
                                scale_pointers<scalar_t>(scale_storage, n_rows, ka.size(0)),
                                checked.threshold_pointer<scalar_t>(), guide_rule<scalar_t>(checked.guide),
                                scalar_t(row_weight),
                                tiling, loss_rows.data_ptr<scalar_t>(), dq, dk,
                                need_dq ? row_dot.data_ptr<scalar_t>() : nullptr);
    });
  }
  return {loss_rows, need_dq ? dq : at::empty({0, dim}, acc_options),
          want_dk ? dk : at::empty({0, dim}, acc_options), row_dot};
}

}  // namespace fastcl
