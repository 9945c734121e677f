// CUDA kernels of the `fmoe` ops, registered for the schemas that csrc/registration.cpp defines
// (the CPU library is always loaded first). Contracts in csrc/fmoe_ops.h; kernels in dispatch.cu
// and grouped_gemm.cpp; the NCCL communicator registers its own ops in nccl_comm.cpp.
#include "cuda_ops.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(fmoe, CUDA, m) {
  m.impl("expert_count", &fmoe::cuda::expert_count);
  m.impl("assign_pos", &fmoe::cuda::assign_pos);
  m.impl("scatter_rows", &fmoe::cuda::scatter_rows);
  m.impl("gather_rows", &fmoe::cuda::gather_rows);
  m.impl("gather_weight_grad", &fmoe::cuda::gather_weight_grad);
  m.impl("limit_by_capacity", &fmoe::cuda::limit_by_capacity);
  m.impl("prune_gate_by_capacity", &fmoe::cuda::prune_gate_by_capacity);
  m.impl("grouped_mm", &fmoe::cuda::grouped_mm);
  m.impl("grouped_mm_backward", &fmoe::cuda::grouped_mm_backward);
}
