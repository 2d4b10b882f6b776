// prepare_weights for FP8 weights on the GPU (docs/fp8.md, "Weights"): the twin of
// reference::prepare_weights_fp8. w13 rows (1 byte per element) and w13_bias go through the
// GateUpInterleaved row map with groups of G rows; Fp8Block128's w13_scale block rows go through
// the same map with G = 1 in units of 128-row blocks (gate block j, then up block j). The rest
// is copied. Runs once at load time, asynchronously on `stream`.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/fp8.h"
#include "cuda/device/cuda_check.h"
#include "cuda/quant/quant.h"

namespace modmoe::cuda {
namespace {

constexpr int kThreads = 256;

struct GatherArgs {
  const void* src;     // [E_local, 2 * half, row_units] Unit, canonical order
  void* dst;           // [E_local, 2 * half, row_units] Unit, interleaved
  int64_t num_units;   // E_local * 2 * half * row_units
  int64_t row_units;   // Units per row
  int64_t half;        // rows of one half (I, or I/128 for block scales)
  int64_t group_rows;  // G
  bool up_first;       // canonical order is UpGate
};

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
    static_cast<Unit*>(a.dst)[u] = static_cast<const Unit*>(a.src)[src_row * a.row_units + col];
  }
}

// Rows of `row_bytes` (a multiple of 4), copied in the widest unit that row size and both
// pointers allow.
void gather(const void* src, void* dst, int64_t num_experts, int64_t half, int64_t group_rows,
            bool up_first, int64_t row_bytes, cudaStream_t stream) {
  const auto aligned = [&](int b) {
    return row_bytes % b == 0 && reinterpret_cast<uintptr_t>(src) % b == 0 &&
           reinterpret_cast<uintptr_t>(dst) % b == 0;
  };
  const int unit = aligned(16) ? 16 : (aligned(8) ? 8 : 4);
  MODMOE_CHECK(aligned(unit), "cuda::prepare_weights_fp8: rows of ", row_bytes,
               " bytes: expected a multiple of 4 bytes on 4-byte aligned pointers");
  GatherArgs a{src, dst, 0, row_bytes / unit, half, group_rows, up_first};
  a.num_units = num_experts * 2 * half * a.row_units;
  if (a.num_units == 0) return;
  const int64_t blocks_needed = (a.num_units + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < 65536 ? blocks_needed : 65536);
  if (unit == 16) {
    gather_kernel<uint4><<<blocks, kThreads, 0, stream>>>(a);
  } else if (unit == 8) {
    gather_kernel<uint2><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    gather_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(a);
  }
  MODMOE_LAUNCH_CHECK(stream);
}

void copy(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  if (!src.defined() || src.nbytes() == 0) return;
  MODMOE_CUDA_CHECK(
      cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice, stream));
}

}  // namespace

void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options, Stream stream) {
  const int64_t E = src.w13.size(0), rows = src.w13.size(1), H = src.w13.size(2);
  const int64_t I = src.w2.size(2);
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;
  copy(dst.w2, src.w2, stream);
  copy(dst.w2_bias, src.w2_bias, stream);
  copy(dst.w2_scale, src.w2_scale, stream);
  if (!interleave) {
    copy(dst.w13, src.w13, stream);
    copy(dst.w13_bias, src.w13_bias, stream);
    copy(dst.w13_scale, src.w13_scale, stream);
    return;
  }
  const int64_t G = options.interleave_rows;
  const bool up_first = src.order == GateUpOrder::UpGate;
  gather(src.w13.data, dst.w13.data, E, I, G, up_first, H, stream);
  if (src.w13_bias.defined()) {
    gather(src.w13_bias.data, dst.w13_bias.data, E, I, G, up_first, 4, stream);
  }
  if (src.scheme == QuantScheme::Fp8Block128) {
    gather(src.w13_scale.data, dst.w13_scale.data, E, I / fp8::kBlock, 1, up_first,
           H / fp8::kBlock * 4, stream);
  } else {
    copy(dst.w13_scale, src.w13_scale, stream);
  }
}

}  // namespace modmoe::cuda
