// fastmoe_megatron native ops: the one place where their contracts are written down.
//
// Every op is registered in the `fmoe` torch library (csrc/registration.cpp holds the schemas and
// the CPU kernels' registration; csrc/cuda/registration.cpp registers the CUDA kernels for the same
// schemas). Python wraps them in fastmoe_megatron/ops/, which also holds a pure-PyTorch fallback
// with the same contracts.
//
// Shapes: T tokens, K = top_k, S = T*K token slots (slot s = t*K + j), E experts, N buffer rows.
// Index tensors are int64. A negative expert id (the gates write -1) marks a dropped slot.
//
//   expert_count(idx[any], E)              -> counts[E]          slots per expert, -1 skipped
//   assign_pos(idx[S], counts[E])          -> (pos[S], inv[S])
//       pos: the slots grouped by expert, experts in ascending order and, inside an expert, slots in
//            ascending order (a stable counting sort: deterministic). pos[r] = slot placed at buffer
//            row r, for r < sum(counts); pos[r] = -1 for the rows after that.
//       inv: inv[s] = the buffer row of slot s, or -1 when the slot is dropped.
//   scatter_rows(x[T,D], pos[N], K, w?[S]) -> buf[N,D]
//       buf[r] = x[pos[r] / K] * (w ? w[pos[r]] : 1); a row with pos[r] < 0 is zero.
//   gather_rows(buf[N,D], inv[S], K, w?[S])-> y[T,D]        T = S / K
//       y[t] = sum_j (w ? w[t*K+j] : 1) * buf[inv[t*K+j]], skipping inv < 0; the sum runs over j in
//       order with fp32 accumulation (deterministic).
//       In both, w is taken in fp32 (fp64 for fp64 rows): a bf16/fp16 x or buf does not round it.
//   gather_weight_grad(gy[T,D], buf[N,D], inv[S], K) -> gw[S]
//       gw[s] = dot(gy[s / K], buf[inv[s]]), 0 where inv[s] < 0 (fp32 accumulation, in a fixed
//       order: deterministic; the CPU and CUDA kernels sum in different orders).
//   limit_by_capacity(gec[W*E], cap[E] (an integer dtype), E, W) -> new_gec[W*E]
//       gec is laid out [W, E]: gec[w*E + e] rows that worker w sends to local expert e. Each expert
//       grants its capacity to workers in rank order: new[w,e] = min(gec[w,e], cap[e] - granted so far).
//   prune_gate_by_capacity(idx[T,K], keep[E] (an integer dtype)) -> new_idx[T,K]
//       For each expert e keep the first keep[e] slots routed to e, in priority order: all first
//       choices (j = 0) by token, then all second choices, and so on; later slots become -1.
//   grouped_mm(x[N,I], w[E,O,I], counts[E] (CPU), bias?[E,O]) -> y[N,O]
//       rows are grouped by expert, counts[e] rows each, in expert order: y_e = x_e @ w[e]^T + bias[e].
//       Rows after sum(counts) are zero. The bias is taken in x's dtype.
//   grouped_mm_backward(gy[N,O], x[N,I], w[E,O,I], counts[E] (CPU), mask: bool[3],
//                       gw_out?[E,O,I])
//       -> (gx[N,I], gw[E,O,I], gb[E,O]): gradients of grouped_mm; an output whose mask entry is
//       false is not computed and comes back as an empty tensor (0 elements). With gw_out (a
//       contiguous tensor of w's shape, dtype and device) and mask[1], gw is written into gw_out
//       and the second output is empty: callers reuse one buffer for the weight gradient instead of
//       a fresh allocation every step (on the CPU, a fresh large allocation is fresh pages from
//       the kernel, whose first-touch faults cost as much as a large share of the product).
//   expert_mlp(x[N,D], counts[E] (CPU), w1[E,H,D], b1?[E,H], w2[E,D,H], b2?[E,D], activation)
//       -> (y[N,D], hidden[N,H])   CPU only
//       every expert's MLP on its rows: hidden_e = x_e @ w1[e]^T + b1[e] (before the activation),
//       y_e = act(hidden_e) @ w2[e]^T + b2[e]; activation is "gelu", "gelu_tanh", "relu" or
//       "silu" (torch's gelu(approximate='none' / 'tanh'), relu, silu). Rows after sum(counts)
//       are zero in both outputs.
//   expert_mlp_backward(gy[N,D], x[N,D], hidden[N,H], counts[E] (CPU), w1, w2, activation,
//                       mask: bool[5], gw1_out?[E,H,D], gw2_out?[E,D,H], gb1_out?[E,H],
//                       gb2_out?[E,D], accumulate=false)
//       -> (gx[N,D], gw1, gb1[E,H], gw2, gb2[E,D])   CPU only
//       gradients of expert_mlp from its saved hidden (the activation is recomputed); masks and
//       the *_out buffers as in grouped_mm_backward, per parameter. With accumulate, the
//       parameter gradients are added into their *_out buffers (each one that the mask asks for
//       must then be given), so that rows of the same experts held in several buffers (one per
//       expert-parallel source) can be processed call by call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace fmoe {

using at::Tensor;

// Validation shared by the CPU and CUDA kernels.
void check_index(const Tensor& t, const char* name);
int64_t checked_total(const Tensor& counts, int64_t limit, const char* op);
// A capacity or keep tensor: any integer dtype (a float one would be truncated silently).
inline void check_integral(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must have an integer dtype, got ", t.scalar_type());
}
// grouped_mm's x [N, in_feat] and weight [E, out_feat, in_feat]: shapes and dtype (inline, as
// GroupedMMGrads below; the CUDA kernels add their device checks).
inline void check_gemm_args(const Tensor& x, const Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, in_feat], got ", x.sizes());
  TORCH_CHECK(w.dim() == 3, op, ": weight must be [num_expert, out_feat, in_feat], got ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(2), op, ": x has ", x.size(1), " features but the weight expects ",
              w.size(2));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x is ", x.scalar_type(), " but weight is ",
              w.scalar_type());
}
// grouped_mm_backward's outputs, as the CPU and CUDA kernels allocate and return them (inline:
// the CUDA library, loaded RTLD_LOCAL, cannot call into the CPU library). An output that the mask
// leaves out stays undefined and is returned empty (0 elements). The input gradient's rows past
// `total` (rows routed nowhere) are zero. The weight gradient goes into grad_weight_out when one
// is given (the weight's shape, dtype and device, contiguous), and is then returned empty too;
// the same for the bias gradient and gb_out (expert_mlp_backward's buffers, named in its errors).
struct GroupedMMGrads {
  Tensor gx, gw, gb;
  bool into_out = false, gb_into_out = false;  // gw / gb are the caller's buffers

  GroupedMMGrads(const Tensor& x, const Tensor& w, int64_t total, std::array<bool, 3> mask,
                 const c10::optional<Tensor>& gw_out, const char* op,
                 const c10::optional<Tensor>& gb_out = c10::nullopt,
                 const char* gw_name = "grad_weight_out", const char* gb_name = "grad_bias_out") {
    if (mask[0]) {
      gx = at::empty_like(x);
      if (total < x.size(0)) gx.narrow(0, total, x.size(0) - total).zero_();
    }
    into_out = mask[1] && gw_out.has_value();
    if (into_out) {
      gw = checked_out(*gw_out, w.sizes(), w, gw_name, op);
    } else if (mask[1]) {
      gw = at::empty_like(w);
    }
    gb_into_out = mask[2] && gb_out.has_value();
    if (gb_into_out) {
      gb = checked_out(*gb_out, w.sizes().slice(0, 2), w, gb_name, op);
    } else if (mask[2]) {
      gb = at::empty({w.size(0), w.size(1)}, w.options());
    }
  }

  // Each slot left out gets its own empty tensor: the op's schema says that its outputs do not
  // alias one another (torch.library.opcheck and torch.compile check it).
  std::tuple<Tensor, Tensor, Tensor> result(const Tensor& x) const {
    auto none = [&] { return at::empty({0}, x.options()); };
    return {gx.defined() ? gx : none(), gw.defined() && !into_out ? gw : none(),
            gb.defined() && !gb_into_out ? gb : none()};
  }

 private:
  static const Tensor& checked_out(const Tensor& out, at::IntArrayRef sizes, const Tensor& w,
                                   const char* name, const char* op) {
    TORCH_CHECK(out.sizes() == sizes, op, ": ", name, " has shape ", out.sizes(), " but needs ",
                sizes);
    TORCH_CHECK(out.scalar_type() == w.scalar_type(), op, ": ", name, " is ", out.scalar_type(),
                " but the weight is ", w.scalar_type());
    TORCH_CHECK(out.device() == w.device(), op, ": ", name, " is on ", out.device(),
                " but the weight is on ", w.device());
    TORCH_CHECK(out.is_contiguous(), op, ": ", name, " must be contiguous");
    return out;
  }
};

namespace cpu {
Tensor expert_count(const Tensor& idx, int64_t num_expert);
std::tuple<Tensor, Tensor> assign_pos(const Tensor& idx, const Tensor& counts);
Tensor scatter_rows(const Tensor& x, const Tensor& pos, int64_t top_k,
                    const c10::optional<Tensor>& weight);
Tensor gather_rows(const Tensor& buf, const Tensor& inv, int64_t top_k,
                   const c10::optional<Tensor>& weight);
Tensor gather_weight_grad(const Tensor& grad_out, const Tensor& buf, const Tensor& inv,
                          int64_t top_k);
Tensor limit_by_capacity(const Tensor& gec, const Tensor& capacity, int64_t num_expert,
                         int64_t world_size);
Tensor prune_gate_by_capacity(const Tensor& idx, const Tensor& keep);
Tensor grouped_mm(const Tensor& x, const Tensor& w, const Tensor& counts,
                  const c10::optional<Tensor>& bias);
std::tuple<Tensor, Tensor, Tensor> grouped_mm_backward(const Tensor& grad_out, const Tensor& x,
                                                       const Tensor& w, const Tensor& counts,
                                                       std::array<bool, 3> mask,
                                                       const c10::optional<Tensor>& gw_out);
std::tuple<Tensor, Tensor> expert_mlp(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                      const c10::optional<Tensor>& b1, const Tensor& w2,
                                      const c10::optional<Tensor>& b2, c10::string_view activation);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> expert_mlp_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& hidden, const Tensor& counts,
    const Tensor& w1, const Tensor& w2, c10::string_view activation, std::array<bool, 5> mask,
    const c10::optional<Tensor>& gw1_out, const c10::optional<Tensor>& gw2_out,
    const c10::optional<Tensor>& gb1_out, const c10::optional<Tensor>& gb2_out, bool accumulate);
}  // namespace cpu

}  // namespace fmoe
