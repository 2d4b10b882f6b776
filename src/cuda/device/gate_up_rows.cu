// interleave_gate_up_rows and copy_device (gate_up_rows.h).
#include "cuda/device/gate_up_rows.h"

#include "cuda/device/cuda_check.h"

namespace modmoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

struct GatherArgs {
  const uint8_t* src;  // [E_local, 2 * half, row_units] Unit, canonical order
  uint8_t* dst;        // [E_local, 2 * half, row_units] Unit, interleaved
  int64_t num_units;   // E_local * 2 * half * row_units
  int64_t row_units;   // Units per row
  int64_t half;        // rows of one half
  int64_t group_rows;  // G
  bool up_first;       // canonical order is UpGate
};

// Destination unit u: interleaved row r = (group, gate or up, i within G) of its expert, read
// from canonical row i (gate) or half + i (up), swapped with up_first.
template <class Unit>
__global__ void gather_kernel(const GatherArgs a) {
  const int64_t rows = 2 * a.half;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < a.num_units;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = u % a.row_units, row = u / a.row_units;
    const int64_t expert = row / rows, r = row % rows;
    const int64_t within = r % (2 * a.group_rows);
    const bool is_gate = within < a.group_rows;
    const int64_t i =
        r / (2 * a.group_rows) * a.group_rows + (is_gate ? within : within - a.group_rows);
    const int64_t src_row = expert * rows + (is_gate != a.up_first ? i : a.half + i);
    reinterpret_cast<Unit*>(a.dst)[u] =
        reinterpret_cast<const Unit*>(a.src)[src_row * a.row_units + col];
  }
}

}  // namespace

void interleave_gate_up_rows(const void* src, void* dst, int64_t num_experts, int64_t half,
                             int64_t group_rows, bool up_first, int64_t row_bytes,
                             cudaStream_t stream) {
  const auto aligned = [&](int b) {
    return row_bytes % b == 0 && reinterpret_cast<uintptr_t>(src) % b == 0 &&
           reinterpret_cast<uintptr_t>(dst) % b == 0;
  };
  const int unit = aligned(16) ? 16 : aligned(8) ? 8 : aligned(4) ? 4 : aligned(2) ? 2 : 1;
  GatherArgs a{static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), 0, row_bytes / unit,
               half, group_rows, up_first};
  a.num_units = num_experts * 2 * half * a.row_units;
  if (a.num_units == 0) return;
  const int64_t needed = (a.num_units + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
  switch (unit) {
    case 16: gather_kernel<uint4><<<blocks, kThreads, 0, stream>>>(a); break;
    case 8: gather_kernel<uint2><<<blocks, kThreads, 0, stream>>>(a); break;
    case 4: gather_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(a); break;
    case 2: gather_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(a); break;
    default: gather_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(a); break;
  }
  MODMOE_LAUNCH_CHECK(stream);
}

void copy_device(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  if (!src.defined() || src.nbytes() == 0) return;
  MODMOE_CUDA_CHECK(
      cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice, stream));
}

}  // namespace modmoe::cuda
