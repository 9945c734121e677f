// The `fmoe` torch library: op schemas and their CPU kernels. The CUDA kernels register for the
// same schemas from csrc/cuda/registration.cpp; fake (meta) kernels and autograd formulas are
// registered from Python (fastmoe_megatron/ops/native.py). Contracts in csrc/fmoe_ops.h.
#include "fmoe_ops.h"

#include <torch/library.h>

TORCH_LIBRARY(fmoe, m) {
  m.def("expert_count(Tensor idx, int num_expert) -> Tensor");
  m.def("assign_pos(Tensor idx, Tensor counts) -> (Tensor, Tensor)");
  m.def("scatter_rows(Tensor x, Tensor pos, int top_k, Tensor? weight=None) -> Tensor");
  m.def("gather_rows(Tensor buf, Tensor inv, int top_k, Tensor? weight=None) -> Tensor");
  m.def("gather_weight_grad(Tensor grad_out, Tensor buf, Tensor inv, int top_k) -> Tensor");
  m.def("limit_by_capacity(Tensor expert_count, Tensor capacity, int num_expert, int world_size) -> Tensor");
  m.def("prune_gate_by_capacity(Tensor idx, Tensor keep) -> Tensor");
  m.def("grouped_mm(Tensor x, Tensor weight, Tensor counts, Tensor? bias=None) -> Tensor");
  m.def("grouped_mm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor counts, bool[3] mask, Tensor(a!)? grad_weight_out=None) -> (Tensor, Tensor, Tensor)");
  m.def("expert_mlp(Tensor x, Tensor counts, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation) -> (Tensor, Tensor)");
  m.def("expert_mlp_backward(Tensor grad_out, Tensor x, Tensor hidden, Tensor counts, Tensor w1, Tensor w2, str activation, bool[5] mask, Tensor(a!)? grad_w1_out=None, Tensor(b!)? grad_w2_out=None, Tensor(c!)? grad_b1_out=None, Tensor(d!)? grad_b2_out=None, bool accumulate=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fmoe, CPU, m) {
  m.impl("expert_count", &fmoe::cpu::expert_count);
  m.impl("assign_pos", &fmoe::cpu::assign_pos);
  m.impl("scatter_rows", &fmoe::cpu::scatter_rows);
  m.impl("gather_rows", &fmoe::cpu::gather_rows);
  m.impl("gather_weight_grad", &fmoe::cpu::gather_weight_grad);
  m.impl("limit_by_capacity", &fmoe::cpu::limit_by_capacity);
  m.impl("prune_gate_by_capacity", &fmoe::cpu::prune_gate_by_capacity);
  m.impl("grouped_mm", &fmoe::cpu::grouped_mm);
  m.impl("grouped_mm_backward", &fmoe::cpu::grouped_mm_backward);
  m.impl("expert_mlp", &fmoe::cpu::expert_mlp);
  m.impl("expert_mlp_backward", &fmoe::cpu::expert_mlp_backward);
}
