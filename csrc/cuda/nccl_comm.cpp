// A native NCCL communicator for expert parallelism: its own ncclComm_t per group (created from a
// unique id that Python broadcasts over the torch.distributed group), and the FastMoE-style
// all-to-all of per-expert row blocks with grouped ncclSend/ncclRecv on the current CUDA stream.
// Nothing here touches ProcessGroupNCCL. Built only with FMOE_WITH_NCCL (fastmoe_megatron/_native.py
// defines it when it finds the NCCL wheel that torch depends on, and links that libnccl.so.2).
//
// Layouts (W ranks, E local experts per rank, global expert g = w * E + e):
// - local_count [W*E], laid out [dest rank w, local expert e]: rows this rank sends to g;
// - global_count [W*E], laid out [source rank j, local expert e]: rows this rank's expert e
//   receives from rank j;
// - the send buffer of global_scatter holds rows grouped by g (so by dest rank, then expert);
// - its result holds rows grouped by (local expert e, source rank j): each local expert's rows are
//   one contiguous block. global_gather is the exact inverse.
// Between two ranks the blocks travel as one ncclSend/ncclRecv per (expert, non-empty block), both
// sides issuing them in expert order, so NCCL pairs them up in order with equal sizes.
//
// Ops (schemas below; an int handle indexes a process-local registry of communicators):
//   nccl_unique_id() -> Tensor                       CPU uint8 [sizeof(ncclUniqueId)]
//   nccl_comm_create(Tensor id, int W, int rank) -> int   collective; on the current CUDA device
//   nccl_comm_destroy(int handle) -> ()              collective (like ncclCommDestroy)
//   nccl_exchange_counts(Tensor local_count, int handle) -> Tensor   int64 [W*E] on the GPU
//   nccl_global_scatter(Tensor buf, Tensor local_count, Tensor global_count, int out_rows, int h)
//   nccl_global_gather(Tensor buf, Tensor local_count, Tensor global_count, int out_rows, int h)
// out_rows must be at least the number of rows received (sum(global_count) for scatter,
// sum(local_count) for gather); rows after those are zero.
#ifdef FMOE_WITH_NCCL

#include "cuda_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <nccl.h>

#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace fmoe {
namespace cuda {
namespace {

#define FMOE_NCCL_CHECK(expr)                                                                   \
  do {                                                                                          \
    const ncclResult_t fmoe_nccl_result = (expr);                                               \
    TORCH_CHECK(fmoe_nccl_result == ncclSuccess, "NCCL error in ", #expr, ": ",                \
                ncclGetErrorString(fmoe_nccl_result), " (", ncclGetLastError(nullptr), ")");    \
  } while (0)

struct Comm {
  ncclComm_t comm = nullptr;
  c10::DeviceIndex device = -1;
  int world_size = 0;
  int rank = 0;
};

std::mutex registry_mutex;
std::vector<Comm> registry;  // a destroyed communicator leaves a null slot (handles stay valid)

Comm lookup(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()) &&
                  registry[handle].comm != nullptr,
              "fmoe NCCL: invalid or destroyed communicator handle ", handle);
  return registry[handle];
}

Tensor nccl_unique_id() {
  ncclUniqueId id;
  FMOE_NCCL_CHECK(ncclGetUniqueId(&id));
  auto t = at::empty({static_cast<int64_t>(sizeof(id))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(t.data_ptr<uint8_t>(), &id, sizeof(id));
  return t;
}

int64_t nccl_comm_create(const Tensor& unique_id, int64_t world_size, int64_t rank) {
  TORCH_CHECK(unique_id.device().is_cpu() && unique_id.scalar_type() == at::kByte &&
                  unique_id.numel() == static_cast<int64_t>(sizeof(ncclUniqueId)),
              "nccl_comm_create: unique_id must be a CPU uint8 tensor of ", sizeof(ncclUniqueId),
              " bytes (from nccl_unique_id)");
  TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size,
              "nccl_comm_create: need 0 <= rank < world_size, got rank ", rank, " of ", world_size);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.contiguous().data_ptr<uint8_t>(), sizeof(id));
  Comm c;
  c.device = c10::cuda::current_device();
  c.world_size = static_cast<int>(world_size);
  c.rank = static_cast<int>(rank);
  {
    c10::cuda::CUDAGuard guard(c.device);
    FMOE_NCCL_CHECK(ncclCommInitRank(&c.comm, c.world_size, id, c.rank));  // blocks: collective
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(c);
  return static_cast<int64_t>(registry.size()) - 1;
}

void nccl_comm_destroy(int64_t handle) {
  Comm c;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()),
                "nccl_comm_destroy: invalid communicator handle ", handle);
    c = registry[handle];
    registry[handle] = Comm();
  }
  if (c.comm == nullptr) return;  // already destroyed
  c10::cuda::CUDAGuard guard(c.device);
  FMOE_NCCL_CHECK(ncclCommDestroy(c.comm));
}

// Host copy of a [W*E] int64 count tensor (a CUDA one is copied, which synchronizes), each entry
// checked >= 0.
std::vector<int64_t> counts_of(const Tensor& t, int64_t numel, const char* op, const char* name) {
  check_index(t, name);
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have world_size * num_expert = ", numel,
              " elements, got ", t.numel());
  const Tensor host = t.device().is_cpu() ? t : t.to(at::kCPU);
  return host_counts(host, std::numeric_limits<int64_t>::max(), op);
}

Tensor nccl_exchange_counts(const Tensor& local_count, int64_t handle) {
  const Comm c = lookup(handle);
  check_index(local_count, "local_count");
  TORCH_CHECK(local_count.is_cuda() && local_count.device().index() == c.device,
              "nccl_exchange_counts: local_count must be on cuda:", static_cast<int>(c.device),
              " (the communicator's device), got ", local_count.device());
  TORCH_CHECK(local_count.numel() % c.world_size == 0,
              "nccl_exchange_counts: local_count must have world_size * num_expert elements");
  c10::cuda::CUDAGuard guard(c.device);
  auto send = local_count.contiguous();
  auto recv = at::empty_like(send);
  const size_t E = static_cast<size_t>(send.numel() / c.world_size);
  if (E == 0) return recv;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.device).stream();
  const int64_t* sp = send.data_ptr<int64_t>();
  int64_t* rp = recv.data_ptr<int64_t>();
  // The group is always closed, even when an enqueue fails; the first error is reported.
  FMOE_NCCL_CHECK(ncclGroupStart());
  ncclResult_t queued = ncclSuccess;
  for (int p = 0; p < c.world_size && queued == ncclSuccess; ++p) {
    queued = ncclSend(sp + p * E, E, ncclInt64, p, c.comm, stream);
    if (queued == ncclSuccess) queued = ncclRecv(rp + p * E, E, ncclInt64, p, c.comm, stream);
  }
  const ncclResult_t ended = ncclGroupEnd();
  FMOE_NCCL_CHECK(queued);
  FMOE_NCCL_CHECK(ended);
  return recv;
}

// Moves row blocks between the two layouts. `scatter`: send from the g-ordered buf (local_count
// blocks), receive into the (e, j)-ordered result (global_count blocks). Otherwise the reverse.
Tensor exchange_rows(const Tensor& buf, const Tensor& local_count, const Tensor& global_count,
                     int64_t out_rows, int64_t handle, bool scatter) {
  const char* op = scatter ? "nccl_global_scatter" : "nccl_global_gather";
  const Comm c = lookup(handle);
  TORCH_CHECK(buf.is_cuda() && buf.device().index() == c.device, op, ": buf must be on cuda:",
              static_cast<int>(c.device), " (the communicator's device), got ", buf.device());
  TORCH_CHECK(buf.dim() >= 1, op, ": buf must have a row dimension");
  TORCH_CHECK(local_count.numel() == global_count.numel() && local_count.numel() % c.world_size == 0,
              op, ": local_count and global_count must both have world_size * num_expert elements");
  const int W = c.world_size;
  const int64_t E = local_count.numel() / W;
  const std::vector<int64_t> lc = counts_of(local_count, W * E, op, "local_count");
  const std::vector<int64_t> gc = counts_of(global_count, W * E, op, "global_count");

  // g-ordered layout: block g = j * E + e starts at the prefix sum of lc in g order.
  std::vector<int64_t> g_start(W * E);
  int64_t g_total = 0;
  for (int64_t g = 0; g < W * E; ++g) {
    g_start[g] = g_total;
    g_total += lc[g];
  }
  // (e, j)-ordered layout: block (e, j) of gc[j * E + e] rows, e major.
  std::vector<int64_t> ej_start(W * E);
  int64_t ej_total = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < W; ++j) {
      ej_start[j * E + e] = ej_total;
      ej_total += gc[j * E + e];
    }
  }
  const int64_t in_rows = scatter ? g_total : ej_total;
  const int64_t recv_rows = scatter ? ej_total : g_total;
  TORCH_CHECK(buf.size(0) >= in_rows, op, ": buf has ", buf.size(0), " rows but the counts send ",
              in_rows);
  TORCH_CHECK(out_rows >= recv_rows, op, ": out_rows = ", out_rows, " but ", recv_rows,
              " rows are received");

  c10::cuda::CUDAGuard guard(c.device);
  auto src = buf.contiguous();
  std::vector<int64_t> out_shape = src.sizes().vec();
  out_shape[0] = out_rows;
  auto out = at::empty(out_shape, src.options());
  if (out_rows > recv_rows) out.narrow(0, recv_rows, out_rows - recv_rows).zero_();
  int64_t row_elems = 1;
  for (int64_t d = 1; d < src.dim(); ++d) row_elems *= src.size(d);
  const size_t row_bytes = static_cast<size_t>(row_elems) * src.element_size();
  if (row_bytes == 0 || W * E == 0) return out;

  const char* sp = static_cast<const char*>(src.data_ptr());
  char* rp = static_cast<char*>(out.data_ptr());
  const std::vector<int64_t>& send_count = scatter ? lc : gc;
  const std::vector<int64_t>& send_start = scatter ? g_start : ej_start;
  const std::vector<int64_t>& recv_count = scatter ? gc : lc;
  const std::vector<int64_t>& recv_start = scatter ? ej_start : g_start;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.device).stream();
  // The group is always closed, even when an enqueue fails; the first error is reported.
  FMOE_NCCL_CHECK(ncclGroupStart());
  ncclResult_t queued = ncclSuccess;
  for (int64_t e = 0; e < E && queued == ncclSuccess; ++e) {
    for (int j = 0; j < W && queued == ncclSuccess; ++j) {
      const int64_t g = j * E + e;  // the block exchanged with rank j for (its or my) expert e
      if (send_count[g] > 0) {
        queued = ncclSend(sp + send_start[g] * row_bytes, send_count[g] * row_bytes, ncclUint8, j,
                          c.comm, stream);
      }
      if (queued == ncclSuccess && recv_count[g] > 0) {
        queued = ncclRecv(rp + recv_start[g] * row_bytes, recv_count[g] * row_bytes, ncclUint8, j,
                          c.comm, stream);
      }
    }
  }
  const ncclResult_t ended = ncclGroupEnd();
  FMOE_NCCL_CHECK(queued);
  FMOE_NCCL_CHECK(ended);
  return out;
}

Tensor nccl_global_scatter(const Tensor& buf, const Tensor& local_count, const Tensor& global_count,
                           int64_t out_rows, int64_t handle) {
  return exchange_rows(buf, local_count, global_count, out_rows, handle, /*scatter=*/true);
}

Tensor nccl_global_gather(const Tensor& buf, const Tensor& local_count, const Tensor& global_count,
                          int64_t out_rows, int64_t handle) {
  return exchange_rows(buf, local_count, global_count, out_rows, handle, /*scatter=*/false);
}

}  // namespace
}  // namespace cuda
}  // namespace fmoe

TORCH_LIBRARY_FRAGMENT(fmoe, m) {
  // No tensor arguments: catch-all kernels.
  m.def("nccl_unique_id() -> Tensor", &fmoe::cuda::nccl_unique_id);
  m.def("nccl_comm_destroy(int handle) -> ()", &fmoe::cuda::nccl_comm_destroy);
  m.def("nccl_comm_create(Tensor unique_id, int world_size, int rank) -> int");
  m.def("nccl_exchange_counts(Tensor local_count, int handle) -> Tensor");
  m.def("nccl_global_scatter(Tensor buf, Tensor local_count, Tensor global_count, int out_rows, int handle) -> Tensor");
  m.def("nccl_global_gather(Tensor buf, Tensor local_count, Tensor global_count, int out_rows, int handle) -> Tensor");
}

TORCH_LIBRARY_IMPL(fmoe, CPU, m) {
  m.impl("nccl_comm_create", &fmoe::cuda::nccl_comm_create);
}

TORCH_LIBRARY_IMPL(fmoe, CUDA, m) {
  m.impl("nccl_exchange_counts", &fmoe::cuda::nccl_exchange_counts);
  m.impl("nccl_global_scatter", &fmoe::cuda::nccl_global_scatter);
  m.impl("nccl_global_gather", &fmoe::cuda::nccl_global_gather);
}

#endif  // FMOE_WITH_NCCL
