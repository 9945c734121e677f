// CPU grouped expert GEMM, forward and backward. Contracts in csrc/fmoe_ops.h.
//
// Every expert's block is a contiguous row range of x, so each product reads and writes its slices
// of the inputs and outputs in place: fp32/fp64 straight through the Fortran BLAS that torch links
// (MKL or OpenBLAS: no per-expert tensor views or dispatcher calls), other types through
// at::mm_out on views. No per-expert copies, no full-size temporaries for the weight gradient.
//
// Threads: with more than one thread the work is cut into one contiguous share per thread, of
// equal size, in one parallel region per op, and every product runs single-threaded inside its
// share (measured on 2 cores: as fast as MKL's own threading per product when the machine is
// idle, and 10x faster when other processes compete for the cores, since a threaded product per
// expert meets a barrier per expert):
// - forward and input gradient: the grouped row range [0, sum(counts)) is cut into equal row
//   ranges (an expert that straddles a cut is computed as two products, rows being independent);
// - weight and bias gradients: the (expert, output feature) pairs, each weighing the expert's row
//   count, are cut into equal weights (an expert's gradient straddling a cut is split by output
//   feature: each half is a product over all of its rows).
// Every output element is computed by one product over the same rows whatever the cut.
//
// Memory: in the backward pass a thread takes its experts in order and, for each, the input
// gradient and then the weight and bias gradients, which find the expert's output gradient in the
// cache. In the forward pass each expert's weight (used once per pass, so always cold) is read
// once in order before its product: the BLAS packs it faster from the cache than with its own
// strided reads from memory (about 10% of the forward product with 64 experts of 512 KiB; weights
// over 1 MiB are left alone).
#include "expert_gemm.h"

#include <ATen/Dispatch.h>

namespace fmoe {
namespace cpu {

namespace {

using namespace detail;

// Reads `bytes` of memory once, in order, so that a product that follows finds it in the cache:
// the BLAS packs an expert's weight (cold: every expert's weight is used once per pass) faster
// from the cache than with its own strided reads from memory.
volatile float g_sink = 0.f;

void warm(const void* p, int64_t bytes) {
  const float* f = static_cast<const float*>(p);
  const int64_t n = bytes / static_cast<int64_t>(sizeof(float));
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += f[i + j];
  }
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  g_sink = s;
}

// Weight-gradient shares: (expert, output feature) pairs in order, pair (e, o) weighing rows[e].
// Calls fn(e, o0, o1) for the pieces of the weight range [lo, hi).
template <typename F>
void for_features(const Blocks& b, int64_t O, int64_t lo, int64_t hi, const F& fn) {
  const int64_t E = static_cast<int64_t>(b.rows.size());
  int64_t base = 0;  // weight before expert e
  for (int64_t e = 0; e < E && base < hi; ++e) {
    const int64_t n = b.rows[e];
    const int64_t wt = n * O;
    if (n > 0 && base + wt > lo) {
      // Features o with base + n*o in [lo, hi): o in [ceil((lo-base)/n), ceil((hi-base)/n)).
      const int64_t o0 = lo <= base ? 0 : (lo - base + n - 1) / n;
      const int64_t o1 = std::min(O, (hi - base + n - 1) / n);
      if (o1 > o0) fn(e, o0, o1);
    }
    base += wt;
  }
}

template <typename scalar_t>
void forward_kernel(const Blocks& b, const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                    scalar_t* out, int64_t O, int64_t I) {
  // Warm only a weight that fits in a core's L2 with room to spare (larger ones would be evicted
  // before the product gets to them).
  constexpr int64_t kWarmBytes = int64_t(1) << 20;
  const int64_t weight_bytes = O * I * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t parts = threads_for(b.total * O * I);
  for_each_part(parts, [&](int64_t p, int64_t np) {
    const int64_t lo = b.total * p / np, hi = b.total * (p + 1) / np;
    for_rows(b, lo, hi, [&](int64_t e, int64_t r0, int64_t r1) {
      const scalar_t* we = w + e * O * I;
      scalar_t* dst = out + r0 * O;
      // As addmm: the bias first, then the product added to it.
      if (bias != nullptr) fill_bias(dst, bias + e * O, r1 - r0, O);
      if (weight_bytes <= kWarmBytes) warm(we, weight_bytes);
      gemm_rm<scalar_t>(false, true, r1 - r0, O, I, x + r0 * I, I, we, I, bias != nullptr, dst, O);
    });
  });
}

// Backward: one region; in each thread's share, expert by expert, the input gradient of the
// expert's rows and then its weight and bias gradients, so that the second product finds g_e
// (just read by the first) in the cache.
template <typename scalar_t>
void backward_kernel(const Blocks& b, const scalar_t* g, const scalar_t* x, const scalar_t* w,
                     scalar_t* gx, scalar_t* gw, scalar_t* gb, int64_t O, int64_t I) {
  const int64_t E = static_cast<int64_t>(b.rows.size());
  const bool params = gw != nullptr || gb != nullptr;
  if (params) {  // experts without rows: zero gradients
    for (int64_t e = 0; e < E; ++e) {
      if (b.rows[e] != 0) continue;
      if (gw != nullptr) std::fill(gw + e * O * I, gw + (e + 1) * O * I, scalar_t(0));
      if (gb != nullptr) std::fill(gb + e * O, gb + (e + 1) * O, scalar_t(0));
    }
  }
  const int64_t products = int64_t(gx != nullptr) + int64_t(gw != nullptr);
  const int64_t parts = threads_for(std::max<int64_t>(products, 1) * b.total * O * I);
  const int64_t total_weight = b.total * O;
  for_each_part(parts, [&](int64_t p, int64_t np) {
    struct Piece {
      int64_t e, a, z;  // expert, and rows [a, z) (input gradient) or features [a, z) (params)
      bool input;
    };
    std::vector<Piece> pieces;
    if (gx != nullptr) {
      for_rows(b, b.total * p / np, b.total * (p + 1) / np,
               [&](int64_t e, int64_t r0, int64_t r1) { pieces.push_back({e, r0, r1, true}); });
    }
    if (params) {
      for_features(b, O, total_weight * p / np, total_weight * (p + 1) / np,
                   [&](int64_t e, int64_t o0, int64_t o1) { pieces.push_back({e, o0, o1, false}); });
    }
    // Expert by expert; for one expert the input gradient first.
    std::stable_sort(pieces.begin(), pieces.end(),
                     [](const Piece& l, const Piece& r) { return l.e < r.e; });
    for (const Piece& pc : pieces) {
      const int64_t e = pc.e;
      if (pc.input) {
        gemm_rm<scalar_t>(false, false, pc.z - pc.a, I, O, g + pc.a * O, O, w + e * O * I, I,
                          false, gx + pc.a * I, I);
        continue;
      }
      const int64_t r0 = b.start[e], n = b.rows[e], o0 = pc.a, o1 = pc.z;
      const scalar_t* ge = g + r0 * O + o0;  // rows of g_e, columns [o0, o1)
      if (gw != nullptr) {  // gw_e[o0:o1] = g_e[:, o0:o1]^T x_e
        gemm_rm<scalar_t>(true, false, o1 - o0, I, n, ge, O, x + r0 * I, I, false,
                          gw + e * O * I + o0 * I, I);
      }
      if (gb != nullptr) column_sums(ge, n, o1 - o0, O, gb + e * O + o0);
    }
  });
}

}  // namespace

Tensor grouped_mm(const Tensor& x, const Tensor& w, const Tensor& counts,
                  const c10::optional<Tensor>& bias) {
  check_gemm_args(x, w, "grouped_mm");
  TORCH_CHECK(counts.numel() == w.size(0), "grouped_mm: counts has ", counts.numel(),
              " experts but weight has ", w.size(0));
  const Blocks b = blocks_of(counts, x.size(0), "grouped_mm");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t O = w.size(1), I = w.size(2);
  auto out = at::empty({x.size(0), O}, x.options());
  if (b.total < x.size(0)) out.narrow(0, b.total, x.size(0) - b.total).zero_();
  Tensor bc;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == w.size(0) && bias->size(1) == O,
                "grouped_mm: bias must be [num_expert, out_feat]");
    bc = bias->to(x.scalar_type()).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_mm", [&] {
    forward_kernel<scalar_t>(b, xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                             bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
                             out.data_ptr<scalar_t>(), O, I);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> grouped_mm_backward(const Tensor& grad_out, const Tensor& x,
                                                       const Tensor& w, const Tensor& counts,
                                                       std::array<bool, 3> mask,
                                                       const c10::optional<Tensor>& gw_out) {
  check_gemm_args(x, w, "grouped_mm_backward");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == w.size(1),
              "grouped_mm_backward: grad_out must be [N, out_feat]");
  TORCH_CHECK(counts.numel() == w.size(0), "grouped_mm_backward: counts has ", counts.numel(),
              " experts but weight has ", w.size(0));
  const Blocks b = blocks_of(counts, x.size(0), "grouped_mm_backward");
  auto gc = grad_out.to(x.scalar_type()).contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t O = w.size(1), I = w.size(2);
  // An output that the mask leaves out is returned empty (0 elements) and not computed.
  const GroupedMMGrads grads(xc, wc, b.total, mask, gw_out, "grouped_mm_backward");
  const Tensor &gx = grads.gx, &gw = grads.gw, &gb = grads.gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_mm_backward", [&] {
    backward_kernel<scalar_t>(b, gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                              wc.data_ptr<scalar_t>(), gx.defined() ? gx.data_ptr<scalar_t>() : nullptr,
                              gw.defined() ? gw.data_ptr<scalar_t>() : nullptr,
                              gb.defined() ? gb.data_ptr<scalar_t>() : nullptr, O, I);
  });
  return grads.result(x);
}

}  // namespace cpu

}  // namespace fmoe
