// Helpers shared by the CPU expert kernels (grouped_gemm.cpp, expert_mlp.cpp): expert blocks
// of grouped rows, row-major GEMMs through the BLAS that torch links, bias rows and bias-gradient
// column sums, and the split of a grouped product into one share per thread. Internal to the CPU
// library.
#pragma once

#include "../fmoe_ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

namespace fmoe {
namespace cpu {
namespace detail {

struct Blocks {
  std::vector<int64_t> start, rows;
  int64_t total = 0;
};

inline Blocks blocks_of(const Tensor& counts, int64_t limit, const char* op) {
  checked_total(counts, limit, op);
  auto cc = counts.contiguous();
  const int64_t* c = cc.data_ptr<int64_t>();
  Blocks b;
  b.start.resize(cc.numel());
  b.rows.resize(cc.numel());
  for (int64_t e = 0; e < cc.numel(); ++e) {
    b.start[e] = b.total;
    b.rows[e] = c[e];
    b.total += c[e];
  }
  return b;
}

// The Fortran BLAS that torch itself links (MKL or OpenBLAS): declared weak, so that a torch build
// without it still loads this library and takes the ATen path below.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL: the calling thread's own thread count (0 = the global one); returns the previous value.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // C API (mkl_service.h maps the lower-case name to it)
}

inline bool fits_int(std::initializer_list<int64_t> v) {
  for (int64_t x : v) {
    if (x > std::numeric_limits<int>::max()) return false;
  }
  return true;
}

// Column-major BLAS call when the BLAS is there (fp32/fp64); false otherwise.
template <typename scalar_t>
bool blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
               const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  if (!fits_int({m, n, k, lda, ldb, ldc})) return false;
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  const scalar_t one = 1;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&ca, &cb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
    return true;
  } else if constexpr (std::is_same<scalar_t, double>::value) {
    if (dgemm_ == nullptr) return false;
    dgemm_(&ca, &cb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
    return true;
  }
  return false;
}

// A row-major [rows, cols] matrix at p with row stride ld, as a tensor (no copy).
template <typename scalar_t>
Tensor view_of(const scalar_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// Row-major C[m, n] = op(A) op(B) + beta * C (beta 0 or 1), op(A) [m, k], op(B) [k, n], with row
// strides lda, ldb, ldc. fp32/fp64 go to the BLAS as the column-major C^T = op(B)^T op(A)^T (as
// at::mm does); other types (and a BLAS-less torch) through at::mm_out / at::addmm_out.
template <typename scalar_t>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a,
             int64_t lda, const scalar_t* b, int64_t ldb, bool accumulate, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, scalar_t(0));
    }
    return;
  }
  if (blas_gemm<scalar_t>(trans_b, trans_a, n, m, k, b, ldb, a, lda, scalar_t(accumulate ? 1 : 0),
                          c, ldc)) {
    return;
  }
  Tensor ta = trans_a ? view_of(a, k, m, lda).t() : view_of(a, m, k, lda);
  Tensor tb = trans_b ? view_of(b, n, k, ldb).t() : view_of(b, k, n, ldb);
  Tensor tc = view_of<scalar_t>(c, m, n, ldc);
  if (accumulate) {
    at::addmm_out(tc, tc, ta, tb);
  } else {
    at::mm_out(tc, ta, tb);
  }
}

// out[c] = sum over rows r of a[r * ld + c] (plus out[c] when accumulate), in opmath, rows in
// order.
template <typename scalar_t>
void column_sums(const scalar_t* a, int64_t rows, int64_t cols, int64_t ld, scalar_t* out,
                 bool accumulate = false) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<opmath_t> acc(cols, opmath_t(0));
  if (accumulate) {
    for (int64_t c = 0; c < cols; ++c) acc[c] = static_cast<opmath_t>(out[c]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = a + r * ld;
    for (int64_t c = 0; c < cols; ++c) acc[c] += static_cast<opmath_t>(row[c]);
  }
  for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<scalar_t>(acc[c]);
}

// Fills the m rows of the [m, n] matrix at dst with bias (as addmm: bias first, then the
// product added to it).
template <typename scalar_t>
void fill_bias(scalar_t* dst, const scalar_t* bias, int64_t m, int64_t n) {
  for (int64_t r = 0; r < m; ++r) std::copy(bias, bias + n, dst + r * n);
}

// Threads for a grouped product of `work` multiply-adds: one per ~2M of them, at most the pool.
inline int64_t threads_for(int64_t work) {
  if (at::in_parallel_region()) return 1;
  constexpr int64_t kWorkPerThread = 1 << 21;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kWorkPerThread));
}

// Runs fn(part, parts) for part in [0, parts), one part per thread. Inside the parts the BLAS must
// run on the calling thread only: torch turns MKL's dynamic threading off, so MKL would otherwise
// start a nested team of its full thread count in every part (4 threads on 2 cores).
template <typename F>
void for_each_part(int64_t parts, const F& fn) {
  if (parts <= 1) {
    fn(0, 1);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    const int previous = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t p = begin; p < end; ++p) fn(p, parts);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  });
}

// Calls fn(e, r0, r1) for the pieces of the grouped rows [lo, hi) that lie in expert e:
// rows [r0, r1) (absolute row indices, inside expert e's block).
template <typename F>
void for_rows(const Blocks& b, int64_t lo, int64_t hi, const F& fn) {
  const int64_t E = static_cast<int64_t>(b.rows.size());
  // The first expert whose block ends after lo.
  int64_t e = std::upper_bound(b.start.begin(), b.start.end(), lo) - b.start.begin() - 1;
  e = std::max<int64_t>(e, 0);
  for (; e < E && lo < hi; ++e) {
    const int64_t end = b.start[e] + b.rows[e];
    if (end <= lo) continue;
    const int64_t r1 = std::min(end, hi);
    fn(e, lo, r1);
    lo = r1;
  }
}


}  // namespace detail
}  // namespace cpu
}  // namespace fmoe
