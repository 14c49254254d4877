// The per-row loops of the softmax and of the gradient rows (row_loops.cpp), for fp32
// and fp64. Compiled once per instruction set (AVX-512, AVX2, baseline) and picked when
// the library loads: the extension's own flags target the baseline x86-64 (SSE2), where
// the reductions (row maxima, row sums) ran one element per add latency.
#pragma once

#include <cstdint>

namespace fastcl {
namespace rows {

// x[j] = x[j] * a * c[j] (c null: x[j] * a)
void scale(float* x, int64_t n, float a, const float* c);
void scale(double* x, int64_t n, double a, const double* c);

// max_j x[j] (-inf for n = 0; NaN entries are passed over, they reach the sums)
float max(const float* x, int64_t n);
double max(const double* x, int64_t n);

// x[j] = max(x[j] - shift, floor), a NaN stays NaN
void shift_floor(float* x, int64_t n, float shift, float floor);
void shift_floor(double* x, int64_t n, double shift, double floor);

// e = (x[j] <= cutoff ? 0 : x[j]); returns sum_j e; x[j] = e * c[j] (c null: e)
float cut_sum_scale(float* x, int64_t n, float cutoff, const float* c);
double cut_sum_scale(double* x, int64_t n, double cutoff, const double* c);

// sum_j a[j] b[j]
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

// sum_j x[j]^2, accumulated in double
double sum_squares(const float* x, int64_t n);
double sum_squares(const double* x, int64_t n);

// out[j] = f * in[j]
void scaled_copy(float* out, const float* in, int64_t n, float f);
void scaled_copy(double* out, const double* in, int64_t n, double f);

// g[j] = s * (g[j] - p * x[j])
void scale_minus(float* g, const float* x, int64_t n, float s, float p);
void scale_minus(double* g, const double* x, int64_t n, double s, double p);

}  // namespace rows
}  // namespace fastcl
