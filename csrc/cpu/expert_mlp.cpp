// CPU fused expert MLP (fc1 -> activation -> fc2 of every expert), forward and backward.
// Contracts in csrc/fmoe_ops.h.
//
// Why fused: as three ops (grouped GEMM, activation, grouped GEMM) the hidden activations of all
// rows, [N, d_hidden], make a round trip through memory between every two steps: the activation
// reads the fc1 output and writes its result, its backward reads two such tensors and writes a
// third, and autograd keeps both the fc1 output and the activation for the backward pass. Here
// the work goes expert by expert: one expert's rows go through fc1, the activation and fc2 while
// its hidden rows are still in the core's cache (64 experts of 128 rows by 512 features: 256 KiB).
// Only the fc1 output (before the activation) is kept for the backward pass, which recomputes the
// activation from it, in the cache, where its weight gradient needs it.
//
// Threads: the grouped rows [0, sum(counts)) are cut into one equal range per thread, as in
// grouped_gemm.cpp; each thread runs its experts' whole chains single-threaded. An expert whose
// rows straddle a cut gets its weight and bias gradients from each side: the share that holds the
// expert's first row writes them, every later share computes its own part into a scratch buffer,
// and these are added in, in share order, after the parallel region (so the result depends on the
// thread count only by rounding).
//
// Unlike grouped_gemm.cpp's forward pass, this one does not read each expert's weight into the
// cache ahead of its product: measured 6-13% slower here (64 experts of 512 KiB), the expert's
// hidden rows needing that cache.
#include "expert_gemm.h"

#include <ATen/Dispatch.h>

#include <array>
#include <string>

namespace fmoe {
namespace cpu {

namespace {

using namespace detail;

enum class Act { kGelu, kGeluTanh, kRelu, kSilu };

Act parse_activation(c10::string_view name, const char* op) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK(false, op, ": activation '", std::string(name),
              "' is not supported; allowed values: gelu, gelu_tanh, relu, silu");
  return Act::kGelu;
}

// out = act(in); the tensors are [rows, H] views (ATen's vectorised kernels; inside a parallel
// region they run on the calling thread).
void act_forward(Act act, const Tensor& in, Tensor out) {
  switch (act) {
    case Act::kGelu: at::gelu_out(out, in, "none"); break;
    case Act::kGeluTanh: at::gelu_out(out, in, "tanh"); break;
    case Act::kRelu: at::clamp_min_out(out, in, 0); break;
    case Act::kSilu: at::silu_out(out, in); break;
  }
}

// grad_in = grad * act'(in), elementwise; grad_in may be grad itself.
void act_backward(Act act, const Tensor& grad, const Tensor& in, Tensor grad_in) {
  switch (act) {
    case Act::kGelu: at::gelu_backward_out(grad_in, grad, in, "none"); break;
    case Act::kGeluTanh: at::gelu_backward_out(grad_in, grad, in, "tanh"); break;
    case Act::kRelu: at::threshold_backward_out(grad_in, grad, in, 0); break;
    case Act::kSilu: at::silu_backward_out(grad_in, grad, in); break;
  }
}

struct Piece {
  int64_t e, r0, r1;  // expert e's rows [r0, r1) (absolute)
};

// A thread's pieces of the grouped rows, and the most rows of any of them.
std::vector<Piece> pieces_of(const Blocks& b, int64_t p, int64_t np, int64_t* most) {
  std::vector<Piece> pieces;
  *most = 0;
  for_rows(b, b.total * p / np, b.total * (p + 1) / np, [&](int64_t e, int64_t r0, int64_t r1) {
    pieces.push_back({e, r0, r1});
    *most = std::max(*most, r1 - r0);
  });
  return pieces;
}

template <typename scalar_t>
void forward_kernel(const Blocks& b, Act act, const Tensor& x, const Tensor& w1, const Tensor& b1,
                    const Tensor& w2, const Tensor& b2, const Tensor& hidden, const Tensor& y) {
  const int64_t D = x.size(1), H = w1.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* w1p = w1.data_ptr<scalar_t>();
  const scalar_t* w2p = w2.data_ptr<scalar_t>();
  const scalar_t* b1p = b1.defined() ? b1.data_ptr<scalar_t>() : nullptr;
  const scalar_t* b2p = b2.defined() ? b2.data_ptr<scalar_t>() : nullptr;
  scalar_t* hp = hidden.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t parts = threads_for(2 * b.total * H * D);
  for_each_part(parts, [&](int64_t p, int64_t np) {
    int64_t most = 0;
    const std::vector<Piece> pieces = pieces_of(b, p, np, &most);
    if (pieces.empty()) return;
    const Tensor scratch = at::empty({most, H}, x.options());  // the activated rows of a piece
    for (const Piece& pc : pieces) {
      const int64_t e = pc.e, r0 = pc.r0, m = pc.r1 - pc.r0;
      scalar_t* he = hp + r0 * H;
      if (b1p != nullptr) fill_bias(he, b1p + e * H, m, H);
      gemm_rm<scalar_t>(false, true, m, H, D, xp + r0 * D, D, w1p + e * H * D, D, b1p != nullptr,
                        he, H);
      Tensor a = scratch.narrow(0, 0, m);
      act_forward(act, view_of<scalar_t>(he, m, H, H), a);
      scalar_t* ye = yp + r0 * D;
      if (b2p != nullptr) fill_bias(ye, b2p + e * D, m, D);
      gemm_rm<scalar_t>(false, true, m, D, H, a.data_ptr<scalar_t>(), H, w2p + e * D * H, H,
                        b2p != nullptr, ye, D);
    }
  });
}

// The parameter gradients of one expert whose rows straddle a thread cut, as computed by a share
// that does not hold the expert's first row; added in after the parallel region.
struct Partial {
  int64_t e = -1;
  Tensor gw1, gb1, gw2, gb2;
};

template <typename scalar_t>
void backward_kernel(const Blocks& b, Act act, const Tensor& gy, const Tensor& x,
                     const Tensor& hidden, const Tensor& w1, const Tensor& w2, const Tensor& gx,
                     const Tensor& gw1, const Tensor& gb1, const Tensor& gw2, const Tensor& gb2,
                     bool accumulate) {
  const int64_t E = static_cast<int64_t>(b.rows.size());
  const int64_t D = x.size(1), H = w1.size(1);
  // Experts without rows: zero parameter gradients (nothing to add when accumulating).
  for (int64_t e = 0; e < E; ++e) {
    if (b.rows[e] != 0 || accumulate) continue;
    for (const Tensor* t : {&gw1, &gb1, &gw2, &gb2}) {
      if (t->defined()) t->select(0, e).zero_();
    }
  }
  const bool need_dh = gx.defined() || gw1.defined() || gb1.defined();
  const scalar_t* gyp = gy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* hp = hidden.data_ptr<scalar_t>();
  const scalar_t* w1p = w1.data_ptr<scalar_t>();
  const scalar_t* w2p = w2.data_ptr<scalar_t>();
  scalar_t* gxp = gx.defined() ? gx.data_ptr<scalar_t>() : nullptr;
  const int64_t products = int64_t(gx.defined()) + int64_t(gw1.defined()) + int64_t(gw2.defined()) +
                           int64_t(need_dh);
  const int64_t parts = threads_for(std::max<int64_t>(products, 1) * b.total * H * D);
  std::vector<Partial> partials(parts);
  for_each_part(parts, [&](int64_t p, int64_t np) {
    int64_t most = 0;
    const std::vector<Piece> pieces = pieces_of(b, p, np, &most);
    if (pieces.empty()) return;
    const Tensor dh = need_dh ? at::empty({most, H}, x.options()) : Tensor();
    const Tensor act_rows = gw2.defined() ? at::empty({most, H}, x.options()) : Tensor();
    Partial& part = partials[p];
    for (const Piece& pc : pieces) {
      const int64_t e = pc.e, r0 = pc.r0, m = pc.r1 - pc.r0;
      // Where this piece's parameter gradients go: the expert's own (added to it when
      // accumulating), or this share's partial (always written, then added).
      auto dest = [&](const Tensor& full, Tensor& partial) -> scalar_t* {
        if (!full.defined()) return nullptr;
        if (r0 == b.start[e]) return full.select(0, e).data_ptr<scalar_t>();
        partial = at::empty(full.sizes().slice(1), full.options());
        part.e = e;
        return partial.data_ptr<scalar_t>();
      };
      scalar_t* gw1d = dest(gw1, part.gw1);
      scalar_t* gb1d = dest(gb1, part.gb1);
      scalar_t* gw2d = dest(gw2, part.gw2);
      scalar_t* gb2d = dest(gb2, part.gb2);
      const scalar_t* gye = gyp + r0 * D;
      const Tensor he = view_of<scalar_t>(hp + r0 * H, m, H, H);
      // Whether this piece adds into its destinations (the expert's own gradient) or writes them.
      const bool add = accumulate && r0 == b.start[e];
      if (gw2d != nullptr) {  // gw2_e = gy_e^T act(h_e), the activation recomputed in the cache
        Tensor a = act_rows.narrow(0, 0, m);
        act_forward(act, he, a);
        gemm_rm<scalar_t>(true, false, D, H, m, gye, D, a.data_ptr<scalar_t>(), H, add, gw2d, H);
      }
      if (gb2d != nullptr) column_sums(gye, m, D, D, gb2d, add);
      if (!need_dh) continue;
      Tensor d = dh.narrow(0, 0, m);
      scalar_t* dp = d.data_ptr<scalar_t>();
      gemm_rm<scalar_t>(false, false, m, H, D, gye, D, w2p + e * D * H, H, false, dp, H);
      act_backward(act, d, he, d);  // d: gradient of the fc1 output
      if (gb1d != nullptr) column_sums(dp, m, H, H, gb1d, add);
      if (gxp != nullptr) {
        gemm_rm<scalar_t>(false, false, m, D, H, dp, H, w1p + e * H * D, D, false, gxp + r0 * D, D);
      }
      if (gw1d != nullptr) {
        gemm_rm<scalar_t>(true, false, H, D, m, dp, H, xp + r0 * D, D, add, gw1d, D);
      }
    }
  });
  for (const Partial& part : partials) {
    if (part.e < 0) continue;
    if (part.gw1.defined()) gw1.select(0, part.e).add_(part.gw1);
    if (part.gb1.defined()) gb1.select(0, part.e).add_(part.gb1);
    if (part.gw2.defined()) gw2.select(0, part.e).add_(part.gw2);
    if (part.gb2.defined()) gb2.select(0, part.e).add_(part.gb2);
  }
}

void check_mlp_args(const Tensor& x, const Tensor& counts, const Tensor& w1, const Tensor& w2,
                    const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, d_model], got ", x.sizes());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, op,
              ": weights must be [num_expert, d_hidden, d_model] and [num_expert, d_model, "
              "d_hidden], got ", w1.sizes(), " and ", w2.sizes());
  const int64_t E = w1.size(0), H = w1.size(1), D = w1.size(2);
  TORCH_CHECK(x.size(1) == D, op, ": x has ", x.size(1), " features but fc1 expects ", D);
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == D && w2.size(2) == H, op, ": fc2 weight must be [",
              E, ", ", D, ", ", H, "], got ", w2.sizes());
  TORCH_CHECK(counts.numel() == E, op, ": counts has ", counts.numel(), " experts but the weights ",
              E);
  TORCH_CHECK(x.scalar_type() == w1.scalar_type() && x.scalar_type() == w2.scalar_type(), op,
              ": x, fc1 and fc2 weights must have one dtype, got ", x.scalar_type(), ", ",
              w1.scalar_type(), ", ", w2.scalar_type());
}

Tensor bias_arg(const c10::optional<Tensor>& bias, int64_t E, int64_t n, const Tensor& x,
                const char* op, const char* name) {
  if (!bias.has_value()) return Tensor();
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == n, op, ": ", name,
              " must be [", E, ", ", n, "], got ", bias->sizes());
  return bias->to(x.scalar_type()).contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor> expert_mlp(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                      const c10::optional<Tensor>& b1, const Tensor& w2,
                                      const c10::optional<Tensor>& b2,
                                      c10::string_view activation) {
  const char* op = "expert_mlp";
  check_mlp_args(x, counts, w1, w2, op);
  const Act act = parse_activation(activation, op);
  const Blocks b = blocks_of(counts, x.size(0), op);
  const int64_t E = w1.size(0), H = w1.size(1), D = w1.size(2), N = x.size(0);
  const Tensor xc = x.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const Tensor b1c = bias_arg(b1, E, H, x, op, "fc1 bias");
  const Tensor b2c = bias_arg(b2, E, D, x, op, "fc2 bias");
  Tensor hidden = at::empty({N, H}, x.options());
  Tensor y = at::empty({N, D}, x.options());
  if (b.total < N) {  // rows routed nowhere
    hidden.narrow(0, b.total, N - b.total).zero_();
    y.narrow(0, b.total, N - b.total).zero_();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_mlp", [&] {
    forward_kernel<scalar_t>(b, act, xc, w1c, b1c, w2c, b2c, hidden, y);
  });
  return {y, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> expert_mlp_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& hidden, const Tensor& counts,
    const Tensor& w1, const Tensor& w2, c10::string_view activation, std::array<bool, 5> mask,
    const c10::optional<Tensor>& gw1_out, const c10::optional<Tensor>& gw2_out,
    const c10::optional<Tensor>& gb1_out, const c10::optional<Tensor>& gb2_out, bool accumulate) {
  const char* op = "expert_mlp_backward";
  check_mlp_args(x, counts, w1, w2, op);
  const Act act = parse_activation(activation, op);
  const int64_t N = x.size(0), H = w1.size(1), D = w1.size(2);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == D, op,
              ": grad_out must be [", N, ", ", D, "], got ", grad_out.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == N && hidden.size(1) == H, op,
              ": hidden must be [", N, ", ", H, "], got ", hidden.sizes());
  const Blocks b = blocks_of(counts, N, op);
  const Tensor gy = grad_out.to(x.scalar_type()).contiguous();
  const Tensor xc = x.contiguous(), hc = hidden.to(x.scalar_type()).contiguous();
  const Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  // (gx, gw1, gb1) as grouped_mm_backward of fc1 would return them, (gw2, gb2) as that of fc2.
  if (accumulate) {
    const std::array<const c10::optional<Tensor>*, 4> outs{&gw1_out, &gb1_out, &gw2_out, &gb2_out};
    const char* names[] = {"grad_w1_out", "grad_b1_out", "grad_w2_out", "grad_b2_out"};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(!mask[i + 1] || outs[i]->has_value(), op, ": accumulate=True adds into the "
                  "gradient buffers, but ", names[i], " is missing");
    }
  }
  const GroupedMMGrads fc1(xc, w1c, b.total, {mask[0], mask[1], mask[2]}, gw1_out, op, gb1_out,
                           "grad_w1_out", "grad_b1_out");
  const GroupedMMGrads fc2(hc, w2c, b.total, {false, mask[3], mask[4]}, gw2_out, op, gb2_out,
                           "grad_w2_out", "grad_b2_out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_mlp_backward",
                                  [&] {
    backward_kernel<scalar_t>(b, act, gy, xc, hc, w1c, w2c, fc1.gx, fc1.gw, fc1.gb, fc2.gw, fc2.gb,
                              accumulate);
  });
  auto [gx, gw1, gb1] = fc1.result(x);
  auto [unused, gw2, gb2] = fc2.result(x);
  (void)unused;
  return {gx, gw1, gb1, gw2, gb2};
}

}  // namespace cpu
}  // namespace fmoe
