// CUDA kernels of the `fmoe` ops: declarations, and the small host-side validation helpers that
// the CUDA sources share. Contracts in csrc/fmoe_ops.h; the CPU kernels (csrc/cpu/) are the
// reference that these match.
//
// Differences from the CPU kernels, all about *when* an error is reported, never about results:
// - Checks that need only shapes, dtypes, devices, or a CPU-resident tensor (counts, capacity on
//   the host) are TORCH_CHECKs, raised before anything is launched, as on the CPU.
// - Checks that need to read GPU data (an expert id >= num_expert, counts that disagree with idx,
//   pos/inv out of range) are device-side asserts (CUDA_KERNEL_ASSERT_MSG), as in PyTorch's own
//   CUDA index ops: no host sync on the hot path, but a failure poisons the CUDA context and
//   surfaces at the next synchronizing call ("device-side assert triggered").
//
// The helpers below live in fmoe::cuda (inline): the CPU library's fmoe::check_index and
// fmoe::checked_total are not visible from this library (it is loaded RTLD_LOCAL), and defining
// them here again as strong symbols would duplicate them.
#pragma once

#include "../fmoe_ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

namespace fmoe {
namespace cuda {

inline void check_index(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
}

inline void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// `t` must be a CUDA tensor on `device`, or (when `allow_cpu`) a CPU tensor.
inline void check_same_device(const Tensor& t, const at::Device& device, const char* op,
                              const char* name, bool allow_cpu = false) {
  TORCH_CHECK(t.device() == device || (allow_cpu && t.device().is_cpu()), op, ": ", name,
              " is on ", t.device(), " but the op runs on ", device);
}

// Host copy of a CPU int64 counts tensor, each entry checked >= 0 and the sum checked <= limit
// (the same checks as fmoe::checked_total on the CPU).
inline std::vector<int64_t> host_counts(const Tensor& counts, int64_t limit, const char* op,
                                        int64_t* total_out = nullptr) {
  TORCH_CHECK(counts.device().is_cpu(), op, ": counts must be a CPU tensor");
  check_index(counts, "counts");
  auto c = counts.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + c.numel());
  int64_t total = 0;
  for (size_t e = 0; e < v.size(); ++e) {
    TORCH_CHECK(v[e] >= 0, op, ": counts[", e, "] = ", v[e], " is negative");
    // Checked before adding, so that no sum of counts can wrap around past the limit.
    TORCH_CHECK(v[e] <= limit - total, op, ": counts sum to more than the ", limit,
                " rows that exist (at counts[", e, "] = ", v[e], ")");
    total += v[e];
  }
  if (total_out != nullptr) *total_out = total;
  return v;
}

// ------------------------------------------------------------------ dispatch ops (dispatch.cu)
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

// ------------------------------------------------------------ grouped GEMM (grouped_gemm.cpp)
Tensor grouped_mm(const Tensor& x, const Tensor& w, const Tensor& counts,
                  const c10::optional<Tensor>& bias);
std::tuple<Tensor, Tensor, Tensor> grouped_mm_backward(const Tensor& grad_out, const Tensor& x,
                                                       const Tensor& w, const Tensor& counts,
                                                       std::array<bool, 3> mask,
                                                       const c10::optional<Tensor>& gw_out);

}  // namespace cuda
}  // namespace fmoe
