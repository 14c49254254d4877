// Internals shared by the native CPU kernels (infonce_cpu.cpp: the forward and the
// recomputing backward; infonce_one_pass.cpp: the forward that forms the gradients):
// tiling, the column layout's logits, fused normalization's row scales, group skips, the
// exp range, dk turns and the argument checks. Not part of the extension's interface.
#pragma once

#include "infonce_cpu.h"
#include "row_loops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

// MKL's per-thread thread count, exported by libtorch_cpu when torch is built with MKL.
// This is the C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the
// lower-case symbol is the Fortran one, which takes a pointer). Weak, so the extension
// still loads into a torch without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// oneDNN's matrix product, exported by libtorch_cpu (ATen's mkldnn_matmul: result =
// beta * result + alpha * mat1 @ mat2) but declared in no installed header. Weak, so the
// extension still loads into a torch without it; products then go through ATen.
namespace at {
namespace native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace fastcl {
namespace detail {

// The block products run inside ATen's thread pool, one per pool thread: MKL must not
// start threads of its own there. torch turns MKL's dynamic adjustment off, so MKL
// would otherwise run every product with all cores from each pool thread, and the
// oversubscribed spin-waits cost up to 40x on a loaded 2-core machine (measured).
// Other BLAS libraries in torch builds run single-threaded inside an OpenMP region.
// Each pool thread also takes on the caller's thread-local state (below autograd, grad
// mode, ...), which OpenMP threads do not inherit.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      MKL_Set_Num_Threads_Local(previous_);
    }
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

// Whether fp32 block products go through oneDNN. torch's CPU builds route fp32 torch.mm
// to MKL, whose kernels on AMD processors are its AVX2 ones; oneDNN's run AVX-512
// wherever the processor has it: 2.2x the FLOP rate on the blocks here (240 against 110
// GFLOP/s per core, 256 x 768 x 512, measured on an AVX-512 AMD EPYC). Used when the
// symbol exists, oneDNN is enabled (torch.backends.mkldnn.enabled), FASTCL_CPU_PRODUCTS
// is not "aten", and a first product checked against plain arithmetic agrees.
bool onednn_products();

// Below this many multiply-adds a product goes through ATen even with oneDNN on: oneDNN
// spends about 12 us per call setting up (measured: 16 x 128 x 16 blocks took 4x longer),
// about what MKL takes for 2^21 multiply-adds here.
constexpr int64_t ONEDNN_MIN_MACS = int64_t(1) << 22;

// c = alpha a @ b (accumulate: c += alpha a @ b), single-threaded inside a pool thread
// (see SequentialBlas); a, b and c may be transposed views of contiguous blocks.
inline void block_product(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool accumulate,
                          double alpha = 1.0) {
  if (c.scalar_type() == at::kFloat && a.size(0) * a.size(1) * b.size(1) >= ONEDNN_MIN_MACS &&
      onednn_products()) {
    at::native::mkldnn_matmul(a, b, c, accumulate ? 1.0f : 0.0f, float(alpha));
  } else if (accumulate || alpha != 1.0) {
    c.addmm_(a, b, accumulate ? 1.0 : 0.0, alpha);  // beta 0: c's old values are ignored
  } else {
    at::mm_out(c, a, b);
  }
}

inline int64_t env_positive_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return fallback;
  }
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK(*end == '\0' && parsed > 0, name, " must be a positive integer, got '", value, "'");
  return parsed;
}

// Rows per chunk and columns per tile. 256 x 512 fp32 blocks (512 KiB, two per thread)
// stay in a 2 MiB L2 and are large enough for BLAS to run near its peak; measured with
// benchmarks/cpu_native.py (FASTCL_CPU_TILE_ROWS / FASTCL_CPU_TILE_COLS override them).
// With groups, smaller blocks: a block is skipped only when none of its rows shares a
// group with any of its columns, so blocks near a sequence's size waste the least.
constexpr int64_t GROUPED_TILE_ROWS = 64;
constexpr int64_t GROUPED_TILE_COLS = 64;

struct Tiling {
  int64_t rows;
  int64_t cols;
  int64_t n_chunks;
  int64_t n_tiles;
};

inline Tiling make_tiling(int64_t n_rows, int64_t n_cols, bool grouped) {
  int64_t rows = env_positive_int("FASTCL_CPU_TILE_ROWS", grouped ? GROUPED_TILE_ROWS : 256);
  int64_t cols = env_positive_int("FASTCL_CPU_TILE_COLS", grouped ? GROUPED_TILE_COLS : 512);
  // At least one chunk per thread when there are enough rows, but no chunk below 32 rows
  // (thin products waste the BLAS kernel).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  rows = std::min(rows, std::max<int64_t>(32, (n_rows + threads - 1) / threads));
  rows = std::max<int64_t>(1, std::min(rows, n_rows));
  cols = std::max<int64_t>(1, std::min(cols, n_cols));
  return {rows, cols, (n_rows + rows - 1) / rows, (n_cols + cols - 1) / cols};
}

// One worker per pool thread (at most one per chunk). Workers take chunks from a shared
// counter rather than a fixed split, so a thread that the OS preempts (a busy machine)
// holds up only the chunk it is on, not a whole half of the rows.
inline int64_t pool_workers(const Tiling& tiling) {
  return std::max<int64_t>(1, std::min<int64_t>(tiling.n_chunks, at::get_num_threads()));
}

// Runs worker(next_chunk) once on each of pool_workers(tiling) pool threads, with the
// caller's thread-local state and single-threaded BLAS (see SequentialBlas); a worker
// claims row chunks with next_chunk++ until it passes tiling.n_chunks.
template <typename Worker>
void for_chunks_in_pool(const Tiling& tiling, Worker&& worker) {
  const at::ThreadLocalState caller_state;
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, pool_workers(tiling), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const SequentialBlas sequential_blas;
    worker(next_chunk);
  });
}

inline at::ScalarType accumulator_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous rows x cols view at the start of a per-thread buffer.
inline at::Tensor block_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// Group ids of the rows and of the first n_grad_cols columns (both null without groups).
struct GroupIds {
  const int64_t* rows;
  const int64_t* keys;
};

inline int64_t target_of(const int64_t* targets, int64_t row) {
  return targets != nullptr ? targets[row] : row;
}

// The kernels' params array, in the accumulator dtype: 1 / tau, then the log weights of a
// row's own hard negative and of the Gaussian columns.
template <typename acc_t>
struct LogitParams {
  explicit LogitParams(const acc_t* params)
      : inv_tau(params[0]), log_hard_weight(params[1]), log_gauss_weight(params[2]) {}
  acc_t inv_tau;
  acc_t log_hard_weight;
  acc_t log_gauss_weight;
};

// x (nr x nc, rows r0.., columns c0..) holds scaled similarities; it gets the layout's
// weights (hard-negative and Gaussian) added, and -inf where a column is not a candidate
// of the row (the row itself, another group's key).
template <typename acc_t>
void add_weights_and_masks(acc_t* x, int64_t nr, int64_t nc, int64_t r0, int64_t c0, const LogitParams<acc_t>& w,
                           const ColumnLayout& layout, const GroupIds& groups) {
  if (layout.hard_weighted()) {
    // Row i < n_hard has its own hard negatives at columns hard_start + b * n_hard + i.
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t row = r0 + i;
      if (row >= layout.n_hard) {
        break;
      }
      for (int64_t b = 0; b < layout.n_hard_blocks; ++b) {
        const int64_t col = layout.hard_start + b * layout.n_hard + row;
        if (col >= c0 && col < c0 + nc) {
          x[i * nc + (col - c0)] += w.log_hard_weight;
        }
      }
    }
  }
  if (layout.gauss_weighted() && layout.gauss_start < c0 + nc) {
    const int64_t j0 = std::max<int64_t>(layout.gauss_start - c0, 0);
    for (int64_t i = 0; i < nr; ++i) {
      acc_t* row = x + i * nc;
      for (int64_t j = j0; j < nc; ++j) {
        row[j] += w.log_gauss_weight;
      }
    }
  }
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (layout.n_self > 0) {
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t row = r0 + i;
      const int64_t col = layout.self_start + row;
      if (row < layout.n_self && col >= c0 && col < c0 + nc) {
        x[i * nc + (col - c0)] = neg_inf;
      }
    }
  }
  if (groups.rows != nullptr && c0 < layout.n_grad_cols) {
    const int64_t j_end = std::min(nc, layout.n_grad_cols - c0);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t group = groups.rows[r0 + i];
      acc_t* row = x + i * nc;
      const int64_t* key_groups = groups.keys + c0;
      for (int64_t j = 0; j < j_end; ++j) {
        if (key_groups[j] != group) {
          row[j] = neg_inf;
        }
      }
    }
  }
}

// The guide rule (infonce_cpu.h): the unit guide rows of the query rows (N x Dg) and of
// the gradient columns (n_grad_cols x Dg) and one threshold per row; null thresholds: off.
template <typename acc_t>
struct GuideRule {
  at::Tensor rows;
  at::Tensor cols;
  const acc_t* thresholds = nullptr;
  bool active() const { return thresholds != nullptr; }
};

// x (nr x nc, rows r0.., columns c0..) holds logits; the guide sets -inf on the entries
// it drops: gradient columns j other than the row's target whose guide product with the
// row exceeds the row's threshold. The guide block is formed here, where the logits are,
// in `buffer` (at least nr x nc values): nothing N x M is kept.
template <typename acc_t>
void apply_guide(acc_t* x, int64_t nr, int64_t nc, int64_t r0, int64_t c0, const GuideRule<acc_t>& guide,
                 const int64_t* targets, int64_t n_grad_cols, const at::Tensor& buffer) {
  if (!guide.active() || c0 >= n_grad_cols) {
    return;
  }
  const int64_t ng = std::min(nc, n_grad_cols - c0);
  at::Tensor block = block_view(buffer, nr, ng);
  block_product(guide.rows.narrow(0, r0, nr), guide.cols.narrow(0, c0, ng).t(), block, false);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* g = block.data_ptr<acc_t>();
  for (int64_t i = 0; i < nr; ++i) {
    const acc_t threshold = guide.thresholds[r0 + i];
    const int64_t t = target_of(targets, r0 + i) - c0;  // outside [0, ng) when not in this tile
    const acc_t* g_row = g + i * ng;
    acc_t* x_row = x + i * nc;
    const bool has_target = t >= 0 && t < ng;
    const acc_t target_logit = has_target ? x_row[t] : acc_t(0);
    for (int64_t j = 0; j < ng; ++j) {  // one select per entry (vectorizable), the target restored after
      x_row[j] = g_row[j] > threshold ? neg_inf : x_row[j];
    }
    if (has_target) {
      x_row[t] = target_logit;
    }
  }
}

// A per-thread buffer for apply_guide's blocks (undefined when the guide is off).
template <typename acc_t>
at::Tensor guide_buffer(const GuideRule<acc_t>& guide, const Tiling& tiling) {
  return guide.active() ? at::empty({tiling.rows * tiling.cols}, guide.rows.options()) : at::Tensor();
}

// What turns a similarity into its logit: the logit parameters (w: 1/tau and the
// weights), and the per-entry rules that need each row's target and similarity: the
// hardness penalty (from the layout) and the false-negative margin (per-row thresholds,
// null: off).
template <typename acc_t>
struct EntryRules {
  EntryRules(const ColumnLayout& layout, const acc_t* params, const int64_t* targets, const acc_t* thresholds)
      : w(params),
        targets(targets),
        thresholds(thresholds),
        strength(acc_t(layout.hardness_strength)),
        mode(layout.penalized() ? layout.hardness_mode : int64_t(HARDNESS_NONE)) {}
  LogitParams<acc_t> w;
  const int64_t* targets;
  const acc_t* thresholds;
  acc_t strength;
  int64_t mode;  // HARDNESS_NONE when no entry is penalized
  bool active() const { return mode != HARDNESS_NONE || thresholds != nullptr; }
};

// x (nr x nc, rows r0.., columns c0..) receives the logits of the similarities s (x may
// be s itself): s * inv_tau, plus the hardness penalty strength * s on the entries its
// mode names (the logit's value only: the backward's d logit / d s stays inv_tau, so
// nothing else changes there), -inf where the margin drops the entry, then the layout's
// weights and masks. The target entry is never penalized nor dropped.
//
// Per row, one rule covers most columns (a vectorizable loop); the few entries whose
// rule differs (the target, and the row's own hard negatives when the mode tells them
// apart) are read before the row is written and set afterwards.
template <typename acc_t>
void to_logits(acc_t* x, const acc_t* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
               const ColumnLayout& layout, const GroupIds& groups, const EntryRules<acc_t>& rules) {
  const acc_t inv_tau = rules.w.inv_tau;
  if (!rules.active()) {
    const int64_t n = nr * nc;
    for (int64_t idx = 0; idx < n; ++idx) {
      x[idx] = s[idx] * inv_tau;
    }
  } else {
    constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    constexpr acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
    const int64_t mode = rules.mode;
    // The penalty of the columns that are neither the target nor an own hard negative,
    // and that of the own hard negatives.
    const acc_t common_penalty = (mode == HARDNESS_IN_BATCH || mode == HARDNESS_ALL) ? rules.strength : acc_t(0);
    const acc_t hard_penalty = (mode == HARDNESS_HARD || mode == HARDNESS_ALL) ? rules.strength : acc_t(0);
    const bool hard_differs = (mode == HARDNESS_IN_BATCH || mode == HARDNESS_HARD) && layout.n_hard > 0;
    struct Special {
      int64_t j;
      acc_t sim;
      bool target;
    };
    std::vector<Special> specials;
    specials.reserve(1 + (hard_differs ? layout.n_hard_blocks : 0));
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t row = r0 + i;
      const int64_t t = target_of(rules.targets, row);  // -1 lies in no tile
      // No margin: a threshold that drops nothing.
      const acc_t threshold = rules.thresholds != nullptr ? rules.thresholds[row] : pos_inf;
      const acc_t* s_row = s + i * nc;
      acc_t* x_row = x + i * nc;
      specials.clear();
      if (t >= c0 && t < c0 + nc) {
        specials.push_back({t - c0, s_row[t - c0], true});
      }
      if (hard_differs && row < layout.n_hard) {
        for (int64_t b = 0; b < layout.n_hard_blocks; ++b) {
          const int64_t col = layout.hard_start + b * layout.n_hard + row;
          if (col >= c0 && col < c0 + nc && col != t) {
            specials.push_back({col - c0, s_row[col - c0], false});
          }
        }
      }
      if (common_penalty != acc_t(0)) {
        for (int64_t j = 0; j < nc; ++j) {
          const acc_t sim = s_row[j];
          const acc_t logit = sim * inv_tau + common_penalty * sim;
          x_row[j] = sim > threshold ? neg_inf : logit;
        }
      } else {
        for (int64_t j = 0; j < nc; ++j) {
          const acc_t sim = s_row[j];
          const acc_t logit = sim * inv_tau;
          x_row[j] = sim > threshold ? neg_inf : logit;
        }
      }
      for (const Special& e : specials) {
        if (e.target) {
          x_row[e.j] = e.sim * inv_tau;
        } else {
          const acc_t logit = hard_penalty != acc_t(0) ? e.sim * inv_tau + hard_penalty * e.sim : e.sim * inv_tau;
          x_row[e.j] = e.sim > threshold ? neg_inf : logit;
        }
      }
    }
  }
  add_weights_and_masks(x, nr, nc, r0, c0, rules.w, layout, groups);
}

// The inverse norms of the rows of q and k (both null without normalization), and the
// coefficients of the normalization's projection term: 1 / |x|^2 where the norm exceeds
// eps, 0 where eps clamps it (F.normalize's gradient is then g / eps, no projection).
template <typename acc_t>
struct RowScales {
  const acc_t* q_inv = nullptr;
  const acc_t* k_inv = nullptr;
  const acc_t* q_proj = nullptr;
  const acc_t* k_proj = nullptr;
  bool enabled() const { return q_inv != nullptr; }
};

template <typename acc_t>
void compute_row_scales(const at::Tensor& x, double eps, acc_t* inv, acc_t* proj) {
  const int64_t n = x.size(0);
  const int64_t dim = x.size(1);
  const acc_t* data = x.data_ptr<acc_t>();
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // In double: a norm costs D flops, nothing next to the products.
      const double norm = std::sqrt(rows::sum_squares(data + i * dim, dim));
      const double scale = 1.0 / std::max(norm, eps);
      inv[i] = acc_t(scale);
      proj[i] = norm > eps ? acc_t(scale * scale) : acc_t(0);
    }
  });
}

// x (nr x nc) *= row_scale[i] * col_scale[j]: raw products to cosines, or G to the
// gradient of the raw products.
template <typename acc_t>
void scale_block(acc_t* x, int64_t nr, int64_t nc, const acc_t* row_scale, const acc_t* col_scale) {
  for (int64_t i = 0; i < nr; ++i) {
    const acc_t r = row_scale[i];
    acc_t* row = x + i * nc;
    for (int64_t j = 0; j < nc; ++j) {
      row[j] *= r * col_scale[j];
    }
  }
}

// rows[i] -= coef[i] * values[i] for `count` rows of `dim` values (the rank-1 projection
// term of the normalization's backward).
template <typename acc_t>
void subtract_scaled_rows(acc_t* rows, const acc_t* values, const acc_t* coef, int64_t count, int64_t dim) {
  for (int64_t i = 0; i < count; ++i) {
    const acc_t c = coef[i];
    acc_t* out = rows + i * dim;
    const acc_t* in = values + i * dim;
    for (int64_t d = 0; d < dim; ++d) {
      out[d] -= c * in[d];
    }
  }
}

// Which (row chunk, column tile) blocks hold no candidate at all, with groups. Per chunk
// and per tile, the smallest and largest group id of its rows / its grouped columns: a
// tile whose columns all carry groups (c0 + nc <= n_grad_cols) and whose interval misses
// the chunk's has logit -inf everywhere, so it adds nothing to the forward and G = 0 in
// the backward, and is skipped. (Its rows' targets never lie there: info_nce takes no
// labels with groups, and a row's own positive is in its own group.) With rows sorted by
// group, sequence after sequence as token_info_nce lays them out, a chunk meets only the
// tiles of its own few sequences, so the work is O(N G D) instead of O(N M D).
class GroupSkips {
 public:
  GroupSkips(const GroupIds& groups, const Tiling& tiling, int64_t n_rows, int64_t n_cols,
             int64_t n_grad_cols)
      : enabled_(groups.rows != nullptr) {
    if (!enabled_) {
      return;
    }
    constexpr int64_t big = std::numeric_limits<int64_t>::max();
    row_lo_.assign(tiling.n_chunks, big);
    row_hi_.assign(tiling.n_chunks, -big);
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t c = i / tiling.rows;
      row_lo_[c] = std::min(row_lo_[c], groups.rows[i]);
      row_hi_[c] = std::max(row_hi_[c], groups.rows[i]);
    }
    col_lo_.assign(tiling.n_tiles, big);
    col_hi_.assign(tiling.n_tiles, -big);
    grouped_tile_.assign(tiling.n_tiles, false);
    for (int64_t t = 0; t < tiling.n_tiles; ++t) {
      const int64_t c0 = t * tiling.cols;
      const int64_t c1 = std::min(c0 + tiling.cols, n_cols);
      grouped_tile_[t] = c1 <= n_grad_cols;
      for (int64_t j = c0; j < std::min(c1, n_grad_cols); ++j) {
        col_lo_[t] = std::min(col_lo_[t], groups.keys[j]);
        col_hi_[t] = std::max(col_hi_[t], groups.keys[j]);
      }
    }
  }

  bool skip(int64_t chunk, int64_t tile) const {
    return enabled_ && grouped_tile_[tile] &&
           (row_hi_[chunk] < col_lo_[tile] || col_hi_[tile] < row_lo_[chunk]);
  }

 private:
  bool enabled_;
  std::vector<int64_t> row_lo_, row_hi_, col_lo_, col_hi_;
  std::vector<bool> grouped_tile_;
};

// ATen's vectorized exp leaves its fast path when an argument's result would fall below
// the smallest normal number (about -87.3 in fp32, -708.4 in fp64): one such argument in
// a block, masked -inf columns included, made exp_ 5 to 30 times slower here (measured:
// 256 x 512 fp32, 78 us with arguments near -5, 380 us at -inf, 1-2.5 ms below -88). So
// arguments are clamped at `floor`, and results at or below `cutoff` = exp(floor + 1)
// (about 4e-38 in fp32) count as 0: against a row sum of at least 1 that changes
// nothing representable, and masked columns keep probability exactly 0.
template <typename acc_t>
struct ExpRange;
template <>
struct ExpRange<float> {
  static constexpr float floor = -87.0f;
};
template <>
struct ExpRange<double> {
  static constexpr double floor = -708.0;
};

template <typename acc_t>
acc_t exp_cutoff() {
  return std::exp(ExpRange<acc_t>::floor + acc_t(1));
}

// Hands out, per dk tile, turns to the row chunks in chunk order 0, 1, 2, ...: a chunk
// adds its block into a dk tile only after every lower chunk has. So dk is summed in the
// order a single thread would use, whatever the scheduling: the backward is
// deterministic (gradcheck checks this). All chunks walk the tiles in the same order,
// so chunks in flight together form a pipeline, the later one a block behind, and
// rarely wait. A worker that fails releases everyone (no deadlock on an exception).
// Chunks that skip a tile (GroupSkips) have no turn at it: the turn passes over them.
class TileTurns {
 public:
  TileTurns(int64_t n_tiles, int64_t n_chunks, const GroupSkips& skips)
      : next_chunk_(n_tiles, 0), n_chunks_(n_chunks), skips_(skips) {
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      next_chunk_[tile] = next_visitor(tile, 0);
    }
  }

  void wait_for(int64_t tile, int64_t chunk) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return next_chunk_[tile] == chunk || aborted_; });
    TORCH_CHECK(!aborted_, "fastcl: another worker failed");
  }

  // Whether `chunk` may add into `tile` now (a wait_for that would not block).
  bool ready(int64_t tile, int64_t chunk) {
    const std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!aborted_, "fastcl: another worker failed");
    return next_chunk_[tile] == chunk;
  }

  void done(int64_t tile) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      next_chunk_[tile] = next_visitor(tile, next_chunk_[tile] + 1);
    }
    changed_.notify_all();
  }

  void abort() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      aborted_ = true;
    }
    changed_.notify_all();
  }

 private:
  // The first chunk from `chunk` on that does not skip `tile`.
  int64_t next_visitor(int64_t tile, int64_t chunk) const {
    while (chunk < n_chunks_ && skips_.skip(chunk, tile)) {
      ++chunk;
    }
    return chunk;
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<int64_t> next_chunk_;
  const int64_t n_chunks_;
  const GroupSkips& skips_;
  bool aborted_ = false;
};

inline bool supported_input(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Checks shared by both functions; returns the targets as a contiguous tensor (or undefined).
inline at::Tensor check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& params, const c10::optional<at::Tensor>& targets,
                        const ColumnLayout& layout) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, fn, ": q and k must be 2-D, got shapes ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), fn, ": q and k must have the same embedding dim, got ",
              q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), fn, ": q and k must have one dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(supported_input(q.scalar_type()), fn,
              ": inputs must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && params.device().is_cpu(), fn,
              ": the native kernel takes CPU tensors");
  const at::ScalarType acc = accumulator_type(q.scalar_type());
  TORCH_CHECK(params.dim() == 1 && params.numel() == 3 && params.scalar_type() == acc, fn,
              ": params must be [1/tau, log hard weight, log gaussian weight] as a 1-D ", acc,
              " tensor of 3 elements, got ", params.scalar_type(), " of shape ", params.sizes());
  TORCH_CHECK(layout.n_cols == k.size(0), fn, ": layout has n_cols = ", layout.n_cols, " but k has ",
              k.size(0), " rows");
  TORCH_CHECK(layout.n_cols > 0, fn, ": need at least one candidate column");
  TORCH_CHECK(layout.n_grad_cols >= 0 && layout.n_grad_cols <= layout.n_cols, fn,
              ": n_grad_cols must lie in [0, n_cols], got ", layout.n_grad_cols);
  // An empty segment may start anywhere (the gathered loss places rank r's, empty
  // without hard negatives, past the columns).
  TORCH_CHECK(layout.n_hard_blocks >= 1, fn, ": n_hard_blocks must be >= 1, got ", layout.n_hard_blocks);
  // The last block's columns that some row owns must exist.
  const int64_t last_block = layout.hard_start + (layout.n_hard_blocks - 1) * layout.n_hard;
  TORCH_CHECK(layout.n_hard >= 0 && layout.hard_start >= 0 &&
                  (std::min(layout.n_hard, q.size(0)) == 0 ||
                   last_block + std::min(layout.n_hard, q.size(0)) <= layout.n_cols),
              fn, ": hard-negative columns [", layout.hard_start, ", ",
              layout.hard_start + layout.n_hard * layout.n_hard_blocks, ") fall outside the ", layout.n_cols,
              " columns");
  TORCH_CHECK(layout.hardness_mode >= HARDNESS_NONE && layout.hardness_mode <= HARDNESS_ALL, fn,
              ": hardness_mode must be 0, 1, 2 or 3, got ", layout.hardness_mode);
  TORCH_CHECK(std::isfinite(layout.hardness_strength) && layout.hardness_strength >= 0, fn,
              ": hardness_strength must be finite and >= 0, got ", layout.hardness_strength);
  TORCH_CHECK(layout.gauss_start >= 0 && layout.gauss_start <= layout.n_cols, fn,
              ": gauss_start must lie in [0, n_cols], got ", layout.gauss_start);
  TORCH_CHECK(layout.n_self >= 0 && layout.self_start >= 0 &&
                  (std::min(layout.n_self, q.size(0)) == 0 ||
                   layout.self_start + std::min(layout.n_self, q.size(0)) <= layout.n_cols),
              fn, ": self columns [", layout.self_start, ", ", layout.self_start + layout.n_self,
              ") fall outside the ", layout.n_cols, " columns");
  if (!targets.has_value()) {
    return at::Tensor();
  }
  const at::Tensor& t = *targets;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                  t.size(0) == q.size(0),
              fn, ": targets must be a 1-D CPU int64 tensor of length ", q.size(0), ", got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  at::Tensor contiguous = t.contiguous();
  const int64_t* values = contiguous.data_ptr<int64_t>();
  for (int64_t i = 0; i < contiguous.numel(); ++i) {
    TORCH_CHECK(values[i] >= -1 && values[i] < layout.n_cols, fn, ": target ", values[i],
                " of row ", i, " is outside [0, ", layout.n_cols, ") (or -1: no column)");
  }
  return contiguous;
}

// The margin's per-row thresholds as a contiguous accumulator-dtype tensor (undefined
// without the margin).
inline at::Tensor check_thresholds(const char* fn, const c10::optional<at::Tensor>& thresholds, int64_t n_rows,
                                   at::ScalarType acc) {
  if (!thresholds.has_value()) {
    return at::Tensor();
  }
  const at::Tensor& t = *thresholds;
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n_rows && at::isFloatingType(t.scalar_type()), fn,
              ": thresholds must be a 1-D floating CPU tensor of length ", n_rows, ", got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
  return t.detach().to(acc).contiguous();
}

// The guide's tensors (rows, cols, thresholds) as contiguous accumulator-dtype tensors
// (all undefined without the guide).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_guide(const char* fn, const Guide& guide,
                                                                  int64_t n_rows, const ColumnLayout& layout,
                                                                  at::ScalarType acc) {
  const bool any = guide.rows.has_value() || guide.cols.has_value() || guide.thresholds.has_value();
  if (!any) {
    return {at::Tensor(), at::Tensor(), at::Tensor()};
  }
  TORCH_CHECK(guide.rows.has_value() && guide.cols.has_value() && guide.thresholds.has_value(), fn,
              ": guide_rows, guide_cols and guide_thresholds go together");
  const at::Tensor& rows = *guide.rows;
  const at::Tensor& cols = *guide.cols;
  const at::Tensor& thr = *guide.thresholds;
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu() && thr.device().is_cpu(), fn,
              ": the guide's tensors must be CPU tensors");
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()) && at::isFloatingType(cols.scalar_type()) &&
                  at::isFloatingType(thr.scalar_type()),
              fn, ": the guide's tensors must be floating point");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == n_rows, fn, ": guide_rows must be ", n_rows,
              " x Dg (one row per query row), got shape ", rows.sizes());
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == layout.n_grad_cols && cols.size(1) == rows.size(1), fn,
              ": guide_cols must be ", layout.n_grad_cols, " x ", rows.size(1),
              " (one row per gradient column, the dim of guide_rows), got shape ", cols.sizes());
  TORCH_CHECK(thr.dim() == 1 && thr.size(0) == n_rows, fn, ": guide_thresholds must be 1-D of length ", n_rows,
              ", got shape ", thr.sizes());
  return {rows.detach().to(acc).contiguous(), cols.detach().to(acc).contiguous(), thr.detach().to(acc).contiguous()};
}

template <typename acc_t>
GuideRule<acc_t> guide_rule(const std::tuple<at::Tensor, at::Tensor, at::Tensor>& tensors) {
  GuideRule<acc_t> guide;
  if (std::get<2>(tensors).defined()) {
    guide.rows = std::get<0>(tensors);
    guide.cols = std::get<1>(tensors);
    guide.thresholds = std::get<2>(tensors).data_ptr<acc_t>();
  }
  return guide;
}

// The group ids as contiguous int64 tensors (both undefined without groups).
inline std::pair<at::Tensor, at::Tensor> check_groups(const char* fn, const Groups& groups, int64_t n_rows,
                                               const ColumnLayout& layout) {
  TORCH_CHECK(groups.rows.has_value() == groups.keys.has_value(), fn,
              ": row_groups and key_groups go together");
  if (!groups.rows.has_value()) {
    return {at::Tensor(), at::Tensor()};
  }
  const at::Tensor* parts[2] = {&*groups.rows, &*groups.keys};
  const int64_t lengths[2] = {n_rows, layout.n_grad_cols};
  const char* names[2] = {"row_groups", "key_groups"};
  at::Tensor ids[2];
  for (int p = 0; p < 2; ++p) {
    const at::Tensor& t = *parts[p];
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == lengths[p] &&
                    at::isIntegralType(t.scalar_type(), /*includeBool=*/false),
                fn, ": ", names[p], " must be a 1-D CPU integer tensor of length ", lengths[p],
                ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    ids[p] = t.to(at::kLong).contiguous();
  }
  return {ids[0], ids[1]};
}

// The inverse norms and projection coefficients of q's and k's rows, (q_inv, q_proj,
// k_inv, k_proj) in one accumulator-dtype tensor of 2 (N + M) values; undefined
// without normalization.
inline at::Tensor row_scale_storage(const char* fn, const at::Tensor& qa, const at::Tensor& ka,
                             c10::optional<double> normalize_eps) {
  if (!normalize_eps.has_value()) {
    return at::Tensor();
  }
  const double eps = *normalize_eps;
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, fn, ": normalize_eps must be finite and >= 0, got ", eps);
  const int64_t n = qa.size(0);
  const int64_t m = ka.size(0);
  at::Tensor storage = at::empty({2 * (n + m)}, qa.options());
  AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "row_scales", [&] {
    scalar_t* base = storage.data_ptr<scalar_t>();
    compute_row_scales<scalar_t>(qa, eps, base, base + n);
    compute_row_scales<scalar_t>(ka, eps, base + 2 * n, base + 2 * n + m);
  });
  return storage;
}

template <typename acc_t>
RowScales<acc_t> scale_pointers(const at::Tensor& storage, int64_t n, int64_t m) {
  RowScales<acc_t> scales;
  if (storage.defined()) {
    acc_t* base = storage.data_ptr<acc_t>();
    scales.q_inv = base;
    scales.q_proj = base + n;
    scales.k_inv = base + 2 * n;
    scales.k_proj = base + 2 * n + m;
  }
  return scales;
}

inline GroupIds group_pointers(const std::pair<at::Tensor, at::Tensor>& ids) {
  if (!ids.first.defined()) {
    return {nullptr, nullptr};
  }
  return {ids.first.data_ptr<int64_t>(), ids.second.data_ptr<int64_t>()};
}

// The arguments that every operator checks the same way, checked: the targets (undefined:
// the diagonal), the group ids, the margin's thresholds and the guide (undefined: off),
// the last two in the accumulator dtype `acc` of q.
struct CheckedRules {
  at::ScalarType acc;
  at::Tensor targets;
  std::pair<at::Tensor, at::Tensor> groups;
  at::Tensor thresholds;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> guide;

  const int64_t* target_pointer() const { return targets.defined() ? targets.data_ptr<int64_t>() : nullptr; }
  template <typename acc_t>
  const acc_t* threshold_pointer() const {
    return thresholds.defined() ? thresholds.data_ptr<acc_t>() : nullptr;
  }
};

inline CheckedRules check_rules(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& params,
                                const c10::optional<at::Tensor>& targets, const ColumnLayout& layout,
                                const Groups& groups, const c10::optional<at::Tensor>& thresholds,
                                const Guide& guide) {
  CheckedRules checked;
  checked.targets = check_inputs(fn, q, k, params, targets, layout);
  checked.groups = check_groups(fn, groups, q.size(0), layout);
  checked.acc = accumulator_type(q.scalar_type());
  checked.thresholds = check_thresholds(fn, thresholds, q.size(0), checked.acc);
  checked.guide = check_guide(fn, guide, q.size(0), layout, checked.acc);
  return checked;
}

}  // namespace detail
}  // namespace fastcl
