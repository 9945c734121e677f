// CUDA kernels of the dispatch ops: count, positions, scatter, gather with the weighted combine,
// capacity. Contracts in csrc/fmoe_ops.h; each kernel mirrors its CPU twin in csrc/cpu/dispatch.cpp
// (same formulas, same fp32 accumulation order where the CPU has one), and error reporting is as
// described in cuda_ops.h.
//
// Everything runs on the current CUDA stream of the inputs' device, with no host synchronization
// and no floating-point atomics: every float result is computed by one thread (or one warp with a
// fixed reduction tree), so two runs give the same bits. The only atomics are integer additions,
// whose result does not depend on their order.
//
// Stable counting sort (assign_pos, prune_gate_by_capacity). The S keys are cut into C chunks of
// `chunk` consecutive keys.
//   1. hist[e, c] = number of keys equal to e in chunk c          (integer atomics)
//   2. start = exclusive prefix sum of hist in (e, c) order        (at::cumsum, int64)
//      start[e, c] is then the sorted position of the first key e of chunk c.
//   3. one block per chunk walks its chunk in tiles of blockDim keys; in a tile each thread
//      counts the earlier keys equal to its own (shared memory), so its sorted position is
//      cursor[e, c] + that rank; then the last thread of each key in the tile advances
//      cursor[e, c] for the next tile. Deterministic and stable by construction.
// The chunk length grows with num_expert so that the E x C histogram stays O(S).
#include "cuda_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace fmoe {
namespace cuda {

namespace {

constexpr int kThreads = 256;     // threads per block (and keys per tile of the counting sort)
constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride loops above this many blocks

// The current stream of the current device (the callers set the device with a CUDAGuard); this
// is the same stream as at::cuda::getCurrentCUDAStream().
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, ceil_div(items, per_block)), kMaxGrid));
}

// Threads for a block that walks a row of D elements: a multiple of 32, at most kThreads.
int row_threads(int64_t D) {
  const int64_t t = std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(D, 32) * 32));
  return static_cast<int>(t);
}

// A small int64 tensor (counts, capacity, keep) on `device`, converted to int64. A pageable CPU
// tensor is copied without blocking the host (the driver stages pageable memory before the call
// returns, so the caller may change or free it right after). A pinned one would be read by the
// device later, racing a caller that refills it: it is copied synchronously.
Tensor long_on(const Tensor& t, const at::Device& device) {
  const bool pinned = t.is_cpu() && t.is_pinned();
  return t.to(device, at::kLong, /*non_blocking=*/!pinned).contiguous();
}

// Products in the CPU kernels are written `a * b` and then added; nvcc would fuse them into an
// fma (one rounding less). These keep the CPU's rounding, so fp32/fp64 results match it closely.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ------------------------------------------------------------------------------ keys
// A key source for the counting sort: key(i) for i in [0, n).
struct FlatKeys {
  const int64_t* p;
  __device__ int64_t operator()(int64_t i) const { return p[i]; }
};

// prune_gate_by_capacity's priority order over idx [T, K]: q = j * T + t reads idx[t, j].
struct TransposedKeys {
  const int64_t* p;
  int64_t T, K;
  __device__ int64_t operator()(int64_t q) const {
    const int64_t j = q / T;
    const int64_t t = q - j * T;
    return p[t * K + j];
  }
};

// ------------------------------------------------------------------------------ expert_count
// Per-block histogram in shared memory, then one integer atomic per (block, expert).
__global__ void expert_count_shared_kernel(const int64_t* __restrict__ idx, int64_t n, int64_t E,
                                           unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int local[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) local[e] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx[i];
    if (e < 0) continue;
    CUDA_KERNEL_ASSERT_MSG(e < E, "fmoe expert_count: expert id out of range [0, num_expert)");
    atomicAdd(&local[e], 1u);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    if (local[e] != 0) atomicAdd(&counts[e], static_cast<unsigned long long>(local[e]));
  }
}

// Too many experts for shared memory: integer atomics straight into the result.
__global__ void expert_count_global_kernel(const int64_t* __restrict__ idx, int64_t n, int64_t E,
                                           unsigned long long* __restrict__ counts) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx[i];
    if (e < 0) continue;
    CUDA_KERNEL_ASSERT_MSG(e < E, "fmoe expert_count: expert id out of range [0, num_expert)");
    atomicAdd(&counts[e], 1ull);
  }
}

// ------------------------------------------------------------------------------ counting sort
template <typename Keys>
__global__ void chunk_hist_kernel(Keys keys, int64_t n, int64_t E, int64_t chunk, int64_t C,
                                  unsigned long long* __restrict__ hist) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = keys(i);
    if (e < 0) continue;
    CUDA_KERNEL_ASSERT_MSG(e < E, "fmoe: expert id out of range [0, num_expert)");
    atomicAdd(&hist[e * C + i / chunk], 1ull);
  }
}

// base[e] = sorted position of the first key e; total[e] = number of keys e. When `counts` is
// given, asserts that it matches (assign_pos: the counts must describe idx exactly).
__global__ void expert_bounds_kernel(const int64_t* __restrict__ start,
                                     const int64_t* __restrict__ hist, int64_t E, int64_t C,
                                     int64_t* __restrict__ base, const int64_t* __restrict__ counts) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < E;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t first = start[e * C];
    const int64_t total = start[e * C + C - 1] + hist[e * C + C - 1] - first;
    base[e] = first;
    if (counts != nullptr) {
      CUDA_KERNEL_ASSERT_MSG(counts[e] == total,
                             "fmoe assign_pos: counts[e] differs from the number of slots routed to e");
    }
  }
}

// One block per chunk: row[i] = sorted position of key i (-1 for a negative key); when `pos` is
// given, also pos[row[i]] = i. `cursor` starts as the exclusive prefix sum and is advanced here.
template <typename Keys>
__global__ void chunk_rank_kernel(Keys keys, int64_t n, int64_t E, int64_t chunk, int64_t C,
                                  int64_t* __restrict__ cursor, int64_t* __restrict__ row,
                                  int64_t* __restrict__ pos) {
  __shared__ int64_t tile_keys[kThreads];
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const int64_t begin = c * chunk;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    for (int64_t tile = begin; tile < end; tile += kThreads) {  // same trip count in the block
      const int64_t i = tile + threadIdx.x;
      const int64_t e = i < end ? keys(i) : -1;
      tile_keys[threadIdx.x] = e;
      __syncthreads();
      int64_t rank = 0;   // earlier keys equal to e in this tile
      bool last = true;   // no later key equal to e in this tile
      if (e >= 0) {
        CUDA_KERNEL_ASSERT_MSG(e < E, "fmoe: expert id out of range [0, num_expert)");
        for (int t = 0; t < kThreads; ++t) {
          if (tile_keys[t] == e) {
            if (t < static_cast<int>(threadIdx.x)) ++rank;
            else if (t > static_cast<int>(threadIdx.x)) last = false;
          }
        }
        const int64_t r = cursor[e * C + c] + rank;
        row[i] = r;
        if (pos != nullptr) pos[r] = i;
      } else if (i < end) {
        row[i] = -1;
      }
      __syncthreads();  // every thread has read cursor[] and tile_keys[] for this tile
      if (e >= 0 && last) cursor[e * C + c] += rank + 1;
      __syncthreads();  // the advanced cursors are visible to the next tile
    }
  }
}

// The counting sort's plan: chunk length, chunk count, and the int64 buffers.
struct SortPlan {
  int64_t n = 0, E = 0, chunk = kThreads, C = 0;
  Tensor hist, start;  // [E * C] int64
};

// Steps 1 and 2 of the sort (see the top of the file) for n keys in [-1, E).
template <typename Keys>
SortPlan plan_sort(Keys keys, int64_t n, int64_t E, const at::TensorOptions& long_opts) {
  SortPlan p;
  p.n = n;
  p.E = E;
  // Longer chunks when there are many experts, so that E * C stays about 4 n (+ 1M) entries.
  while (p.chunk < 64 * kThreads && E * ceil_div(n, p.chunk) > 4 * n + (int64_t(1) << 20)) {
    p.chunk *= 2;
  }
  p.C = std::max<int64_t>(1, ceil_div(n, p.chunk));
  p.hist = at::zeros({E * p.C}, long_opts);
  if (n > 0) {
    chunk_hist_kernel<<<grid_for(n, kThreads), kThreads, 0, current_stream()>>>(
        keys, n, E, p.chunk, p.C, reinterpret_cast<unsigned long long*>(p.hist.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  p.start = at::cumsum(p.hist, 0);  // inclusive, int64: integer sums are exact
  p.start.sub_(p.hist);             // exclusive
  return p;
}

template <typename Keys>
void run_ranks(Keys keys, SortPlan& p, int64_t* row, int64_t* pos) {
  if (p.n == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.C, kMaxGrid));
  chunk_rank_kernel<<<grid, kThreads, 0, current_stream()>>>(
      keys, p.n, p.E, p.chunk, p.C, p.start.data_ptr<int64_t>(), row, pos);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Expert base positions (and the counts check when `counts` is given); before run_ranks, which
// advances p.start.
Tensor expert_base(const SortPlan& p, const Tensor& counts) {
  auto base = at::empty({p.E}, p.start.options());
  if (p.E > 0) {
    expert_bounds_kernel<<<grid_for(p.E, kThreads), kThreads, 0, current_stream()>>>(
        p.start.data_ptr<int64_t>(), p.hist.data_ptr<int64_t>(), p.E, p.C,
        base.data_ptr<int64_t>(), counts.defined() ? counts.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return base;
}

// ------------------------------------------------------------------------------ row kernels
template <typename scalar_t>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ pos,
                                    const at::opmath_type<scalar_t>* __restrict__ w,
                                    scalar_t* __restrict__ out,
                                    int64_t N, int64_t D, int64_t S, int64_t K) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    scalar_t* dst = out + r * D;
    const int64_t s = pos[r];  // the same for the whole block
    if (s < 0) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = scalar_t(0);
      continue;
    }
    CUDA_KERNEL_ASSERT_MSG(s < S, "fmoe scatter_rows: pos out of range for T*top_k slots");
    const scalar_t* src = x + (s / K) * D;
    if (w == nullptr) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
    } else {
      const opmath_t ws = w[s];
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        dst[d] = static_cast<scalar_t>(mul_rn(ws, static_cast<opmath_t>(src[d])));
      }
    }
  }
}

// y[t, d] = sum_j w[t*K+j] * buf[inv[t*K+j], d], in j order, fp32 (opmath) accumulation.
template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ buf, const int64_t* __restrict__ inv,
                                   const at::opmath_type<scalar_t>* __restrict__ w,
                                   scalar_t* __restrict__ out,
                                   int64_t N, int64_t D, int64_t T, int64_t K) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = inv[t * K + j];
      CUDA_KERNEL_ASSERT_MSG(r < N, "fmoe gather_rows: inv out of range for the buffer's rows");
    }
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      opmath_t acc = opmath_t(0);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t s = t * K + j;
        const int64_t r = inv[s];
        if (r < 0) continue;
        const opmath_t ws = w != nullptr ? w[s] : opmath_t(1);
        acc = add_rn(acc, mul_rn(ws, static_cast<opmath_t>(buf[r * D + d])));
      }
      out[t * D + d] = static_cast<scalar_t>(acc);
    }
  }
}

// gw[s] = dot(gy[s / K], buf[inv[s]]): one warp per slot, lanes take d = lane, lane + 32, ...,
// then a fixed shuffle tree: deterministic (the summation order differs from the CPU's 16 lanes).
template <typename scalar_t>
__global__ void gather_weight_grad_kernel(const scalar_t* __restrict__ gy,
                                          const scalar_t* __restrict__ buf,
                                          const int64_t* __restrict__ inv,
                                          scalar_t* __restrict__ out, int64_t N, int64_t D,
                                          int64_t S, int64_t K) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t warp = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  for (int64_t s = warp; s < S; s += int64_t(gridDim.x) * kWarps) {  // uniform in the warp
    const int64_t r = inv[s];
    CUDA_KERNEL_ASSERT_MSG(r < N, "fmoe gather_weight_grad: inv out of range");
    if (r < 0) {
      if (lane == 0) out[s] = scalar_t(0);
      continue;
    }
    const scalar_t* a = gy + (s / K) * D;
    const scalar_t* b = buf + r * D;
    opmath_t acc = opmath_t(0);
    for (int64_t d = lane; d < D; d += 32) {
      acc = add_rn(acc, mul_rn(static_cast<opmath_t>(a[d]), static_cast<opmath_t>(b[d])));
    }
    for (int off = 16; off > 0; off >>= 1) acc = add_rn(acc, __shfl_down_sync(0xffffffffu, acc, off));
    if (lane == 0) out[s] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------ capacity
__global__ void limit_by_capacity_kernel(const int64_t* __restrict__ gec,
                                         const int64_t* __restrict__ cap, int64_t* __restrict__ out,
                                         int64_t E, int64_t W) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < E;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t left = cap[e] > 0 ? cap[e] : 0;
    for (int64_t w = 0; w < W; ++w) {
      const int64_t want = gec[w * E + e];
      const int64_t take = left < want ? left : want;
      out[w * E + e] = take;
      left -= take;
    }
  }
}

// out[t, j] = e if the priority-order rank of slot q = j * T + t inside expert e is < keep[e].
__global__ void prune_kernel(TransposedKeys keys, const int64_t* __restrict__ row,
                             const int64_t* __restrict__ base, const int64_t* __restrict__ keep,
                             int64_t* __restrict__ out, int64_t n, int64_t E) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = q / keys.T;
    const int64_t t = q - j * keys.T;
    const int64_t e = keys.p[t * keys.K + j];
    int64_t result = -1;
    if (e >= 0 && e < E && row[q] - base[e] < keep[e]) result = e;
    out[t * keys.K + j] = result;
  }
}

}  // namespace

// ================================================================================ host side

Tensor expert_count(const Tensor& idx, int64_t num_expert) {
  check_index(idx, "idx");
  check_cuda(idx, "expert_count", "idx");
  TORCH_CHECK(num_expert >= 0, "expert_count: num_expert must be >= 0");
  c10::cuda::CUDAGuard guard(idx.device());
  auto flat = idx.contiguous();
  const int64_t n = flat.numel();
  auto counts = at::zeros({num_expert}, flat.options());
  if (n == 0 || num_expert == 0) {
    if (n > 0) {  // every id must then be -1: the global kernel asserts it
      expert_count_global_kernel<<<grid_for(n, kThreads), kThreads, 0, current_stream()>>>(
          flat.data_ptr<int64_t>(), n, 0, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return counts;
  }
  auto* c = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  constexpr int64_t kSharedExperts = 8192;  // 32 KiB of uint32 counters per block
  if (num_expert <= kSharedExperts && n < (int64_t(1) << 32)) {
    const unsigned grid = std::min<unsigned>(grid_for(n, kThreads), 1024u);
    expert_count_shared_kernel<<<grid, kThreads, num_expert * sizeof(unsigned int), current_stream()>>>(
        flat.data_ptr<int64_t>(), n, num_expert, c);
  } else {
    expert_count_global_kernel<<<grid_for(n, kThreads), kThreads, 0, current_stream()>>>(
        flat.data_ptr<int64_t>(), n, num_expert, c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

std::tuple<Tensor, Tensor> assign_pos(const Tensor& idx, const Tensor& counts) {
  check_index(idx, "idx");
  check_index(counts, "counts");
  check_cuda(idx, "assign_pos", "idx");
  check_same_device(counts, idx.device(), "assign_pos", "counts", /*allow_cpu=*/true);
  const int64_t n = idx.numel();
  // Host-side checks when the counts are on the host (as on the CPU); counts on the GPU are
  // checked against idx on the device.
  if (counts.device().is_cpu()) host_counts(counts, n, "assign_pos");
  c10::cuda::CUDAGuard guard(idx.device());
  auto flat = idx.contiguous().view({-1});
  const int64_t E = counts.numel();
  auto pos = at::full({n}, -1, flat.options());
  auto inv = at::empty({n}, flat.options());
  if (n == 0) {
    // No slot for the device-side check to run on: check GPU counts on the host (one copy, on
    // this empty path only), so that counts that are not all zero fail as on the CPU.
    if (!counts.device().is_cpu()) host_counts(counts.cpu(), n, "assign_pos");
    return {pos, inv};
  }
  FlatKeys keys{flat.data_ptr<int64_t>()};
  SortPlan plan = plan_sort(keys, n, E, flat.options());
  expert_base(plan, long_on(counts, idx.device()));  // asserts counts == the histogram of idx
  run_ranks(keys, plan, inv.data_ptr<int64_t>(), pos.data_ptr<int64_t>());
  return {pos, inv};
}

Tensor scatter_rows(const Tensor& x, const Tensor& pos, int64_t top_k,
                    const c10::optional<Tensor>& weight) {
  TORCH_CHECK(x.dim() == 2, "scatter_rows: x must be [T, D]");
  TORCH_CHECK(top_k >= 1, "scatter_rows: top_k must be >= 1");
  check_index(pos, "pos");
  check_cuda(x, "scatter_rows", "x");
  check_same_device(pos, x.device(), "scatter_rows", "pos");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto pc = pos.contiguous();
  const int64_t T = xc.size(0), D = xc.size(1), N = pc.numel();
  const int64_t S = T * top_k;
  Tensor wc;
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == S, "scatter_rows: weight must have T*top_k elements");
    check_same_device(*weight, x.device(), "scatter_rows", "weight");
    wc = weight->to(at::toOpMathType(x.scalar_type())).contiguous();  // not rounded to x's type
  }
  auto out = at::empty({N, D}, xc.options());
  if (N == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fmoe_scatter_rows", [&] {
    scatter_rows_kernel<scalar_t><<<grid_for(N, 1), row_threads(D), 0, current_stream()>>>(
        xc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(),
        wc.defined() ? wc.data_ptr<at::opmath_type<scalar_t>>() : nullptr,
        out.data_ptr<scalar_t>(), N, D, S, top_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor gather_rows(const Tensor& buf, const Tensor& inv, int64_t top_k,
                   const c10::optional<Tensor>& weight) {
  TORCH_CHECK(buf.dim() == 2, "gather_rows: buf must be [N, D]");
  TORCH_CHECK(top_k >= 1, "gather_rows: top_k must be >= 1");
  check_index(inv, "inv");
  TORCH_CHECK(inv.numel() % top_k == 0, "gather_rows: inv must have T*top_k elements");
  check_cuda(buf, "gather_rows", "buf");
  check_same_device(inv, buf.device(), "gather_rows", "inv");
  c10::cuda::CUDAGuard guard(buf.device());
  auto bc = buf.contiguous();
  auto ic = inv.contiguous();
  const int64_t N = bc.size(0), D = bc.size(1), S = ic.numel(), T = S / top_k;
  Tensor wc;
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == S, "gather_rows: weight must have T*top_k elements");
    check_same_device(*weight, buf.device(), "gather_rows", "weight");
    wc = weight->to(at::toOpMathType(buf.scalar_type())).contiguous();  // not rounded to buf's
  }
  auto out = at::empty({T, D}, bc.options());
  if (T == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "fmoe_gather_rows", [&] {
    gather_rows_kernel<scalar_t><<<grid_for(T, 1), row_threads(D), 0, current_stream()>>>(
        bc.data_ptr<scalar_t>(), ic.data_ptr<int64_t>(),
        wc.defined() ? wc.data_ptr<at::opmath_type<scalar_t>>() : nullptr,
        out.data_ptr<scalar_t>(), N, D, T, top_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor gather_weight_grad(const Tensor& grad_out, const Tensor& buf, const Tensor& inv,
                          int64_t top_k) {
  TORCH_CHECK(grad_out.dim() == 2 && buf.dim() == 2, "gather_weight_grad: expects 2-d tensors");
  TORCH_CHECK(grad_out.size(1) == buf.size(1), "gather_weight_grad: width mismatch");
  check_index(inv, "inv");
  check_cuda(grad_out, "gather_weight_grad", "grad_out");
  check_same_device(buf, grad_out.device(), "gather_weight_grad", "buf");
  check_same_device(inv, grad_out.device(), "gather_weight_grad", "inv");
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto gc = grad_out.contiguous();
  auto bc = buf.to(grad_out.scalar_type()).contiguous();
  auto ic = inv.contiguous();
  const int64_t N = bc.size(0), D = bc.size(1), S = ic.numel();
  TORCH_CHECK(S == gc.size(0) * top_k, "gather_weight_grad: inv must have T*top_k elements");
  auto out = at::empty({S}, gc.options());
  if (S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "fmoe_gather_weight_grad", [&] {
    gather_weight_grad_kernel<scalar_t><<<grid_for(S, kThreads / 32), kThreads, 0, current_stream()>>>(
        gc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), ic.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), N, D, S, top_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor limit_by_capacity(const Tensor& gec, const Tensor& capacity, int64_t num_expert,
                         int64_t world_size) {
  check_index(gec, "expert_count");
  check_cuda(gec, "limit_by_capacity", "expert_count");
  check_same_device(capacity, gec.device(), "limit_by_capacity", "capacity", /*allow_cpu=*/true);
  TORCH_CHECK(num_expert >= 0 && world_size >= 0,
              "limit_by_capacity: num_expert and world_size must be >= 0");
  TORCH_CHECK(gec.numel() == num_expert * world_size,
              "limit_by_capacity: expert_count must have num_expert * world_size elements");
  TORCH_CHECK(capacity.numel() == num_expert, "limit_by_capacity: capacity must have num_expert elements");
  check_integral(capacity, "limit_by_capacity", "capacity");
  c10::cuda::CUDAGuard guard(gec.device());
  auto gc = gec.contiguous();
  auto cap = long_on(capacity, gec.device());
  auto out = at::empty_like(gc);
  if (num_expert == 0 || world_size == 0) return out;
  limit_by_capacity_kernel<<<grid_for(num_expert, kThreads), kThreads, 0, current_stream()>>>(
      gc.data_ptr<int64_t>(), cap.data_ptr<int64_t>(), out.data_ptr<int64_t>(), num_expert, world_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor prune_gate_by_capacity(const Tensor& idx, const Tensor& keep) {
  check_index(idx, "idx");
  TORCH_CHECK(idx.dim() == 2, "prune_gate_by_capacity: idx must be [T, top_k]");
  check_integral(keep, "prune_gate_by_capacity", "keep");
  check_cuda(idx, "prune_gate_by_capacity", "idx");
  check_same_device(keep, idx.device(), "prune_gate_by_capacity", "keep", /*allow_cpu=*/true);
  c10::cuda::CUDAGuard guard(idx.device());
  auto ic = idx.contiguous();
  auto kc = long_on(keep, idx.device());
  const int64_t T = ic.size(0), K = ic.size(1), E = kc.numel(), n = T * K;
  auto out = at::empty_like(ic);
  if (n == 0) return out;
  TransposedKeys keys{ic.data_ptr<int64_t>(), T, K};
  SortPlan plan = plan_sort(keys, n, E, ic.options());
  auto base = expert_base(plan, Tensor());
  auto row = at::empty({n}, ic.options());
  run_ranks(keys, plan, row.data_ptr<int64_t>(), nullptr);
  prune_kernel<<<grid_for(n, kThreads), kThreads, 0, current_stream()>>>(
      keys, row.data_ptr<int64_t>(), base.data_ptr<int64_t>(), kc.data_ptr<int64_t>(),
      out.data_ptr<int64_t>(), n, E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace fmoe
