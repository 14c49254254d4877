// The per-row loops of row_loops.h. On x86-64 with GCC or Clang each function is
// compiled three times (x86-64-v4: AVX-512; v3: AVX2 and FMA; the baseline) and an
// ifunc resolver picks one when the library loads. `omp simd` lets the reductions run
// in vector lanes (their summation order is fixed by the vector width, so results are
// the same run to run on one machine).

#include "row_loops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define FASTCL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCL_CLONES
#endif

namespace fastcl {
namespace rows {
namespace {

template <typename T>
inline void scale_impl(T* __restrict x, int64_t n, T a, const T* __restrict c) {
  if (c != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      x[j] = x[j] * a * c[j];
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      x[j] *= a;
    }
  }
}

template <typename T>
inline T max_impl(const T* __restrict x, int64_t n) {
  T m = -__builtin_inf();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
  }
  return m;
}

template <typename T>
inline void shift_floor_impl(T* __restrict x, int64_t n, T shift, T floor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j] - shift;
    x[j] = v < floor ? floor : v;  // NaN < floor is false: a NaN stays NaN
  }
}

template <typename T>
inline T cut_sum_scale_impl(T* __restrict x, int64_t n, T cutoff, const T* __restrict c) {
  T sum = 0;
  if (c != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T e = x[j] <= cutoff ? T(0) : x[j];
      sum += e;
      x[j] = e * c[j];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T e = x[j] <= cutoff ? T(0) : x[j];
      sum += e;
      x[j] = e;
    }
  }
  return sum;
}

template <typename T>
inline T dot_impl(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sum += a[j] * b[j];
  }
  return sum;
}

template <typename T>
inline double sum_squares_impl(const T* __restrict x, int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sum += double(x[j]) * double(x[j]);
  }
  return sum;
}

template <typename T>
inline void scaled_copy_impl(T* __restrict out, const T* __restrict in, int64_t n, T f) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = f * in[j];
  }
}

template <typename T>
inline void scale_minus_impl(T* __restrict g, const T* __restrict x, int64_t n, T s, T p) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    g[j] = s * (g[j] - p * x[j]);
  }
}

}  // namespace

FASTCL_CLONES void scale(float* x, int64_t n, float a, const float* c) { scale_impl(x, n, a, c); }
FASTCL_CLONES void scale(double* x, int64_t n, double a, const double* c) { scale_impl(x, n, a, c); }
FASTCL_CLONES float max(const float* x, int64_t n) { return max_impl(x, n); }
FASTCL_CLONES double max(const double* x, int64_t n) { return max_impl(x, n); }
FASTCL_CLONES void shift_floor(float* x, int64_t n, float shift, float floor) { shift_floor_impl(x, n, shift, floor); }
FASTCL_CLONES void shift_floor(double* x, int64_t n, double shift, double floor) {
  shift_floor_impl(x, n, shift, floor);
}
FASTCL_CLONES float cut_sum_scale(float* x, int64_t n, float cutoff, const float* c) {
  return cut_sum_scale_impl(x, n, cutoff, c);
}
FASTCL_CLONES double cut_sum_scale(double* x, int64_t n, double cutoff, const double* c) {
  return cut_sum_scale_impl(x, n, cutoff, c);
}
FASTCL_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
FASTCL_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }
FASTCL_CLONES double sum_squares(const float* x, int64_t n) { return sum_squares_impl(x, n); }
FASTCL_CLONES double sum_squares(const double* x, int64_t n) { return sum_squares_impl(x, n); }
FASTCL_CLONES void scaled_copy(float* out, const float* in, int64_t n, float f) { scaled_copy_impl(out, in, n, f); }
FASTCL_CLONES void scaled_copy(double* out, const double* in, int64_t n, double f) {
  scaled_copy_impl(out, in, n, f);
}
FASTCL_CLONES void scale_minus(float* g, const float* x, int64_t n, float s, float p) {
  scale_minus_impl(g, x, n, s, p);
}
FASTCL_CLONES void scale_minus(double* g, const double* x, int64_t n, double s, double p) {
  scale_minus_impl(g, x, n, s, p);
}

}  // namespace rows
}  // namespace fastcl
