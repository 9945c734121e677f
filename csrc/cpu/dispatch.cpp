// CPU kernels of the dispatch ops: count, positions, scatter, gather with the weighted combine,
// capacity. Contracts in csrc/fmoe_ops.h.
#include "../fmoe_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fmoe {

void check_index(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
}

int64_t checked_total(const Tensor& counts, int64_t limit, const char* op) {
  TORCH_CHECK(counts.device().is_cpu(), op, ": counts must be a CPU tensor");
  check_index(counts, "counts");
  auto c = counts.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < c.numel(); ++e) {
    TORCH_CHECK(p[e] >= 0, op, ": counts[", e, "] = ", p[e], " is negative");
    // Checked before adding, so that no sum of counts can wrap around past the limit.
    TORCH_CHECK(p[e] <= limit - total, op, ": counts sum to more than the ", limit,
                " rows that exist (at counts[", e, "] = ", p[e], ")");
    total += p[e];
  }
  return total;
}

namespace cpu {

namespace {
// Rows of a [rows, D] tensor are processed in chunks of about this many elements per task.
constexpr int64_t kGrainElems = 1 << 15;

int64_t row_grain(int64_t d) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, d)); }

// Lanes of the dot products in gather_weight_grad: independent partial sums that the compiler can
// keep in vector registers, added up in a fixed order at the end (deterministic).
constexpr int kLanes = 16;

// Rows are read in the order the index gives, which the hardware prefetcher cannot guess: ask for
// the row `kAhead` iterations ahead (its first cache lines; the prefetcher follows the rest).
constexpr int64_t kAhead = 8;

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  const int64_t n = std::min<int64_t>(bytes, 2048);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 3);
}

template <typename opmath_t, typename scalar_t>
opmath_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  opmath_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lane[j] += static_cast<opmath_t>(a[d + j]) * static_cast<opmath_t>(b[d + j]);
    }
  }
  for (int j = 0; d < n; ++d, ++j) lane[j] += static_cast<opmath_t>(a[d]) * static_cast<opmath_t>(b[d]);
  for (int width = kLanes / 2; width > 0; width /= 2) {  // pairwise: lane[j] += lane[j + width]
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  }
  return lane[0];
}
}  // namespace

Tensor expert_count(const Tensor& idx, int64_t num_expert) {
  check_index(idx, "idx");
  TORCH_CHECK(num_expert >= 0, "expert_count: num_expert must be >= 0");
  auto flat = idx.contiguous();
  const int64_t* p = flat.data_ptr<int64_t>();
  const int64_t n = flat.numel();
  auto counts = at::zeros({num_expert}, idx.options().device(at::kCPU));
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = p[i];
    if (e < 0) continue;
    TORCH_CHECK(e < num_expert, "expert_count: expert id ", e, " out of range [0, ", num_expert, ")");
    ++c[e];
  }
  return counts;
}

std::tuple<Tensor, Tensor> assign_pos(const Tensor& idx, const Tensor& counts) {
  check_index(idx, "idx");
  const int64_t n = idx.numel();
  checked_total(counts, n, "assign_pos");
  const int64_t num_expert = counts.numel();
  auto flat = idx.contiguous();
  const int64_t* p = flat.data_ptr<int64_t>();
  auto cc = counts.contiguous();
  const int64_t* c = cc.data_ptr<int64_t>();

  std::vector<int64_t> cursor(num_expert), end(num_expert);
  int64_t off = 0;
  for (int64_t e = 0; e < num_expert; ++e) {
    cursor[e] = off;
    off += c[e];
    end[e] = off;
  }
  auto pos = at::full({n}, -1, flat.options());
  auto inv = at::empty({n}, flat.options());
  int64_t* pp = pos.data_ptr<int64_t>();
  int64_t* ip = inv.data_ptr<int64_t>();
  // The counts must describe idx exactly, or rows would be lost or overwritten.
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = p[s];
    if (e < 0) {
      ip[s] = -1;
      continue;
    }
    TORCH_CHECK(e < num_expert, "assign_pos: expert id ", e, " out of range [0, ", num_expert, ")");
    TORCH_CHECK(cursor[e] < end[e], "assign_pos: counts[", e, "] = ", c[e],
                " is smaller than the number of slots routed to expert ", e);
    const int64_t r = cursor[e]++;
    pp[r] = s;
    ip[s] = r;
  }
  for (int64_t e = 0; e < num_expert; ++e) {
    TORCH_CHECK(cursor[e] == end[e], "assign_pos: counts[", e, "] = ", c[e],
                " is larger than the number of slots routed to expert ", e);
  }
  return {pos, inv};
}

Tensor scatter_rows(const Tensor& x, const Tensor& pos, int64_t top_k,
                    const c10::optional<Tensor>& weight) {
  TORCH_CHECK(x.dim() == 2, "scatter_rows: x must be [T, D]");
  TORCH_CHECK(top_k >= 1, "scatter_rows: top_k must be >= 1");
  check_index(pos, "pos");
  auto xc = x.contiguous();
  auto pc = pos.contiguous();
  const int64_t T = xc.size(0), D = xc.size(1), N = pc.numel();
  const int64_t S = T * top_k;
  Tensor wc;
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == S, "scatter_rows: weight must have T*top_k elements");
    wc = weight->to(at::toOpMathType(x.scalar_type())).contiguous();  // not rounded to x's type
  }
  auto out = at::empty({N, D}, xc.options());
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(pp[r] < S, "scatter_rows: pos[", r, "] = ", pp[r], " out of range for ", S, " slots");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_rows", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const opmath_t* wp = wc.defined() ? wc.data_ptr<opmath_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (r + kAhead < end && pp[r + kAhead] >= 0) {
          prefetch_row(xp + (pp[r + kAhead] / top_k) * D, D * sizeof(scalar_t));
        }
        scalar_t* dst = op + r * D;
        const int64_t s = pp[r];
        if (s < 0) {
          std::fill(dst, dst + D, scalar_t(0));
          continue;
        }
        const scalar_t* src = xp + (s / top_k) * D;
        if (wp == nullptr) {
          std::copy(src, src + D, dst);
        } else {
          const opmath_t w = wp[s];
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(w * static_cast<opmath_t>(src[d]));
        }
      }
    });
  });
  return out;
}

Tensor gather_rows(const Tensor& buf, const Tensor& inv, int64_t top_k,
                   const c10::optional<Tensor>& weight) {
  TORCH_CHECK(buf.dim() == 2, "gather_rows: buf must be [N, D]");
  TORCH_CHECK(top_k >= 1, "gather_rows: top_k must be >= 1");
  check_index(inv, "inv");
  TORCH_CHECK(inv.numel() % top_k == 0, "gather_rows: inv must have T*top_k elements");
  auto bc = buf.contiguous();
  auto ic = inv.contiguous();
  const int64_t N = bc.size(0), D = bc.size(1), S = ic.numel(), T = S / top_k;
  Tensor wc;
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == S, "gather_rows: weight must have T*top_k elements");
    wc = weight->to(at::toOpMathType(buf.scalar_type())).contiguous();  // not rounded to buf's
  }
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(ip[s] < N, "gather_rows: inv[", s, "] = ", ip[s], " out of range for ", N, " rows");
  }
  auto out = at::empty({T, D}, bc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "gather_rows", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    const opmath_t* wp = wc.defined() ? wc.data_ptr<opmath_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr bool kInPlace = std::is_same<opmath_t, scalar_t>::value;  // fp32, fp64
    at::parallel_for(0, T, row_grain(D * top_k), [&](int64_t begin, int64_t end) {
      // fp32/fp64 accumulate in the output row itself; narrower types in an opmath row.
      std::vector<opmath_t> tmp(kInPlace ? 0 : D);
      for (int64_t t = begin; t < end; ++t) {
        if (t + kAhead < end) {
          for (int64_t j = 0; j < top_k; ++j) {
            const int64_t r = ip[(t + kAhead) * top_k + j];
            if (r >= 0) prefetch_row(bp + r * D, D * sizeof(scalar_t));
          }
        }
        scalar_t* dst = op + t * D;
        opmath_t* acc = kInPlace ? reinterpret_cast<opmath_t*>(dst) : tmp.data();
        std::fill(acc, acc + D, opmath_t(0));
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t s = t * top_k + j;
          const int64_t r = ip[s];
          if (r < 0) continue;
          const scalar_t* src = bp + r * D;
          const opmath_t w = wp ? wp[s] : opmath_t(1);
          if (wp == nullptr) {
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<opmath_t>(src[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<opmath_t>(src[d]);
          }
        }
        if (!kInPlace) {
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
        }
      }
    });
  });
  return out;
}

Tensor gather_weight_grad(const Tensor& grad_out, const Tensor& buf, const Tensor& inv,
                          int64_t top_k) {
  TORCH_CHECK(grad_out.dim() == 2 && buf.dim() == 2, "gather_weight_grad: expects 2-d tensors");
  TORCH_CHECK(grad_out.size(1) == buf.size(1), "gather_weight_grad: width mismatch");
  check_index(inv, "inv");
  auto gc = grad_out.contiguous();
  auto bc = buf.to(grad_out.scalar_type()).contiguous();
  auto ic = inv.contiguous();
  const int64_t N = bc.size(0), D = bc.size(1), S = ic.numel();
  TORCH_CHECK(S == gc.size(0) * top_k, "gather_weight_grad: inv must have T*top_k elements");
  auto out = at::empty({S}, gc.options());
  const int64_t* ip = ic.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "gather_weight_grad", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        if (s + kAhead < end && ip[s + kAhead] >= 0 && ip[s + kAhead] < N) {
          prefetch_row(bp + ip[s + kAhead] * D, D * sizeof(scalar_t));
        }
        const int64_t r = ip[s];
        TORCH_CHECK(r < N, "gather_weight_grad: inv out of range");
        if (r < 0) {
          op[s] = scalar_t(0);
          continue;
        }
        op[s] = static_cast<scalar_t>(dot<opmath_t>(gp + (s / top_k) * D, bp + r * D, D));
      }
    });
  });
  return out;
}

Tensor limit_by_capacity(const Tensor& gec, const Tensor& capacity, int64_t num_expert,
                         int64_t world_size) {
  check_index(gec, "expert_count");
  TORCH_CHECK(gec.numel() == num_expert * world_size,
              "limit_by_capacity: expert_count must have num_expert * world_size elements");
  TORCH_CHECK(capacity.numel() == num_expert, "limit_by_capacity: capacity must have num_expert elements");
  check_integral(capacity, "limit_by_capacity", "capacity");
  auto gc = gec.contiguous();
  auto cap = capacity.to(at::kLong).contiguous();
  auto out = at::empty_like(gc);
  const int64_t* g = gc.data_ptr<int64_t>();
  const int64_t* cp = cap.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_expert; ++e) {
    int64_t left = std::max<int64_t>(0, cp[e]);
    for (int64_t w = 0; w < world_size; ++w) {
      const int64_t take = std::min(left, g[w * num_expert + e]);
      o[w * num_expert + e] = take;
      left -= take;
    }
  }
  return out;
}

Tensor prune_gate_by_capacity(const Tensor& idx, const Tensor& keep) {
  check_index(idx, "idx");
  TORCH_CHECK(idx.dim() == 2, "prune_gate_by_capacity: idx must be [T, top_k]");
  check_integral(keep, "prune_gate_by_capacity", "keep");
  auto ic = idx.contiguous();
  auto kc = keep.to(at::kLong).contiguous();
  const int64_t T = ic.size(0), K = ic.size(1), E = kc.numel();
  auto out = at::empty_like(ic);
  const int64_t* ip = ic.data_ptr<int64_t>();
  const int64_t* kp = kc.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  std::vector<int64_t> used(E, 0);
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = t * K + j;
      const int64_t e = ip[s];
      if (e < 0) {
        op[s] = -1;
        continue;
      }
      TORCH_CHECK(e < E, "prune_gate_by_capacity: expert id ", e, " out of range [0, ", E, ")");
      op[s] = used[e] < kp[e] ? (++used[e], e) : -1;
    }
  }
  return out;
}

}  // namespace cpu
}  // namespace fmoe
