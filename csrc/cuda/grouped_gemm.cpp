// CUDA grouped expert GEMM, forward and backward. Contracts in csrc/fmoe_ops.h; one cuBLAS product
// per non-empty expert through at::mm_out / at::addmm_out, each writing straight into its slice of
// the output (an expert's block is a contiguous row range): no per-expert copies, no full-size
// temporaries.
//
// The experts' products are independent, so they go round robin to a few side streams (the same
// ones on every call, per device): small products (many experts, few rows each) then run side by
// side on the GPU instead of queuing one behind the other on one stream. The side streams first
// wait for the current stream (the inputs are ready), and the current stream then waits for all
// of them (the outputs are ready). Every tensor the products touch was allocated on the current
// stream and is freed after the op has queued that wait, so the caching allocator can only hand
// its memory to work that runs after the products: no record_stream is needed.
//
// The block sizes (counts) are needed on the host to slice. They are normally a CPU tensor; a CUDA
// counts tensor is copied to the host once per call, the op's only host synchronization.
#include "cuda_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fmoe {
namespace cuda {

namespace {

struct Blocks {
  std::vector<int64_t> start, rows;
  int64_t total = 0;
};

Blocks blocks_of(const Tensor& counts, int64_t limit, const char* op) {
  Blocks b;
  // The one host sync of the op, and only when the counts live on the GPU.
  const Tensor host = counts.device().is_cpu() ? counts : counts.to(at::kCPU);
  b.rows = host_counts(host, limit, op, &b.total);
  b.start.resize(b.rows.size());
  int64_t off = 0;
  for (size_t e = 0; e < b.rows.size(); ++e) {
    b.start[e] = off;
    off += b.rows[e];
  }
  return b;
}

constexpr int64_t kMaxStreams = 4;

// The side streams of a device: created once, for this op alone, and kept for the process' life.
// Not torch's stream pool: taking new pool streams on every call left a cuBLAS workspace on each
// of the pool's 32 (torch keeps one per handle and stream, never freed), and fixed pool streams
// could be the very ones ProcessGroupNCCL runs its collectives on, queueing the products behind
// them.
const std::vector<c10::cuda::CUDAStream>& side_streams(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<c10::DeviceIndex, std::vector<c10::cuda::CUDAStream>> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end()) {
    c10::cuda::CUDAGuard on_device(device);
    std::vector<c10::cuda::CUDAStream> mine;
    mine.reserve(kMaxStreams);
    for (int64_t s = 0; s < kMaxStreams; ++s) {
      cudaStream_t raw = nullptr;
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
      mine.push_back(c10::cuda::getStreamFromExternal(raw, device));
    }
    it = streams.emplace(device, std::move(mine)).first;
  }
  return it->second;  // never erased: the reference stays valid
}

// Calls fn(e) for every expert with rows, spread over side streams as described at the top.
template <typename F>
void for_each_expert(const Blocks& b, const at::Device& device, const F& fn) {
  const int64_t E = static_cast<int64_t>(b.rows.size());
  int64_t busy = 0;
  for (int64_t e = 0; e < E; ++e) busy += b.rows[e] > 0;
  const int64_t n_streams = std::min<int64_t>(kMaxStreams, busy);
  if (n_streams <= 1) {
    for (int64_t e = 0; e < E; ++e) {
      if (b.rows[e] > 0) fn(e);
    }
    return;
  }
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  at::cuda::CUDAEvent inputs_ready;
  inputs_ready.record(current);
  const std::vector<c10::cuda::CUDAStream> streams(
      side_streams(device.index()).begin(), side_streams(device.index()).begin() + n_streams);
  for (const auto& s : streams) inputs_ready.block(s);
  int64_t next = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (b.rows[e] == 0) continue;
    c10::cuda::CUDAStreamGuard on(streams[next++ % n_streams]);
    fn(e);
  }
  for (auto& s : streams) {
    at::cuda::CUDAEvent done;
    done.record(s);
    done.block(current);
  }
}

void check_cuda_gemm_args(const Tensor& x, const Tensor& w, const char* op) {
  check_gemm_args(x, w, op);
  check_cuda(x, op, "x");
  check_same_device(w, x.device(), op, "weight");
}

}  // namespace

Tensor grouped_mm(const Tensor& x, const Tensor& w, const Tensor& counts,
                  const c10::optional<Tensor>& bias) {
  check_cuda_gemm_args(x, w, "grouped_mm");
  TORCH_CHECK(counts.numel() == w.size(0), "grouped_mm: counts has ", counts.numel(),
              " experts but weight has ", w.size(0));
  c10::cuda::CUDAGuard guard(x.device());
  const Blocks b = blocks_of(counts, x.size(0), "grouped_mm");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t E = w.size(0), O = w.size(1);
  auto out = at::empty({x.size(0), O}, x.options());
  if (b.total < x.size(0)) out.narrow(0, b.total, x.size(0) - b.total).zero_();
  Tensor bc;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == O,
                "grouped_mm: bias must be [num_expert, out_feat]");
    check_same_device(*bias, x.device(), "grouped_mm", "bias");
    bc = bias->to(x.scalar_type()).contiguous();
  }
  for_each_expert(b, x.device(), [&](int64_t e) {
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
                                                       std::array<bool, 3> mask,
                                                       const c10::optional<Tensor>& gw_out) {
  check_cuda_gemm_args(x, w, "grouped_mm_backward");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == w.size(1),
              "grouped_mm_backward: grad_out must be [N, out_feat]");
  TORCH_CHECK(counts.numel() == w.size(0), "grouped_mm_backward: counts has ", counts.numel(),
              " experts but weight has ", w.size(0));
  check_same_device(grad_out, x.device(), "grouped_mm_backward", "grad_out");
  c10::cuda::CUDAGuard guard(x.device());
  const Blocks b = blocks_of(counts, x.size(0), "grouped_mm_backward");
  auto gc = grad_out.to(x.scalar_type()).contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t E = w.size(0);
  // An output that the mask leaves out is returned empty (0 elements) and not computed.
  const GroupedMMGrads grads(xc, wc, b.total, mask, gw_out, "grouped_mm_backward");
  const Tensor &gx = grads.gx, &gw = grads.gw, &gb = grads.gb;
  for (int64_t e = 0; e < E; ++e) {  // experts without rows: zero gradients
    if (b.rows[e] != 0) continue;
    if (gw.defined()) gw.select(0, e).zero_();
    if (gb.defined()) gb.select(0, e).zero_();
  }
  for_each_expert(b, x.device(), [&](int64_t e) {
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
  return grads.result(x);
}

}  // namespace cuda
}  // namespace fmoe
