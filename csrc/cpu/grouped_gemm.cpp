// CPU grouped expert GEMM, forward and backward. Contracts in csrc/fmoe_ops.h.
//
// Every expert's block is a contiguous row range of x, so each product writes straight into its
// slice of the output (no per-expert copies, no full-size temporaries for the weight gradient).
// Many small experts are spread over the threads one expert per task; large experts let the BLAS
// use the threads itself.
#include "../fmoe_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace fmoe {
namespace cpu {

namespace {

struct Blocks {
  std::vector<int64_t> start, rows;
  int64_t total = 0;
};

Blocks blocks_of(const Tensor& counts, int64_t limit, const char* op) {
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

// Runs fn(e) for every expert: in parallel over experts when the blocks are small (each product
// then runs on one thread), else one expert after the other with a threaded BLAS.
template <typename F>
void for_each_expert(const Blocks& b, int64_t row_cost, const F& fn) {
  const int64_t E = static_cast<int64_t>(b.rows.size());
  const int64_t avg_work = E > 0 ? b.total * row_cost / E : 0;
  constexpr int64_t kSmallBlockWork = 1 << 21;  // multiply-adds below which threads split experts
  if (E > 1 && avg_work < kSmallBlockWork && at::get_num_threads() > 1) {
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) fn(e);
    });
  } else {
    for (int64_t e = 0; e < E; ++e) fn(e);
  }
}

void check_gemm_args(const Tensor& x, const Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, in_feat], got ", x.sizes());
  TORCH_CHECK(w.dim() == 3, op, ": weight must be [num_expert, out_feat, in_feat], got ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(2), op, ": x has ", x.size(1), " features but the weight expects ",
              w.size(2));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x is ", x.scalar_type(), " but weight is ",
              w.scalar_type());
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
  for_each_expert(b, O * I, [&](int64_t e) {
    if (b.rows[e] == 0) return;
    auto dst = out.narrow(0, b.start[e], b.rows[e]);
    auto src = xc.narrow(0, b.start[e], b.rows[e]);
    if (bc.defined()) {
      at::addmm_out(dst, bc.select(0, e).unsqueeze(0), src, wc.select(0, e).t());
    } else {
      at::mm_out(dst, src, wc.select(0, e).t());
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> grouped_mm_backward(const Tensor& grad_out, const Tensor& x,
                                                       const Tensor& w, const Tensor& counts,
                                                       std::array<bool, 3> mask) {
  check_gemm_args(x, w, "grouped_mm_backward");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == w.size(1),
              "grouped_mm_backward: grad_out must be [N, out_feat]");
  const Blocks b = blocks_of(counts, x.size(0), "grouped_mm_backward");
  auto gc = grad_out.to(x.scalar_type()).contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t E = w.size(0), O = w.size(1), I = w.size(2);
  // An output that the mask leaves out is returned empty (0 elements) and not computed.
  Tensor gx, gw, gb;
  if (mask[0]) {
    gx = at::empty_like(xc);
    if (b.total < x.size(0)) gx.narrow(0, b.total, x.size(0) - b.total).zero_();
  }
  if (mask[1]) gw = at::empty_like(wc);
  if (mask[2]) gb = at::empty({E, O}, wc.options());
  for_each_expert(b, O * I * (int64_t(mask[0]) + int64_t(mask[1])), [&](int64_t e) {
    if (b.rows[e] == 0) {
      if (gw.defined()) gw.select(0, e).zero_();
      if (gb.defined()) gb.select(0, e).zero_();
      return;
    }
    auto g = gc.narrow(0, b.start[e], b.rows[e]);
    if (gx.defined()) {
      auto dst = gx.narrow(0, b.start[e], b.rows[e]);
      at::mm_out(dst, g, wc.select(0, e));
    }
    if (gw.defined()) {
      auto dst = gw.select(0, e);
      at::mm_out(dst, g.t(), xc.narrow(0, b.start[e], b.rows[e]));
    }
    if (gb.defined()) {
      auto dst = gb.select(0, e);
      at::sum_out(dst, g, {0});
    }
  });
  auto none = at::empty({0}, x.options());
  return {gx.defined() ? gx : none, gw.defined() ? gw : none, gb.defined() ? gb : none};
}

}  // namespace cpu
}  // namespace fmoe
