// prepare_weights on the GPU: canonical w13 -> the GateUpInterleaved layout (experts.h).
//
// Per expert, destination rows come in groups of 2G: G gate rows, then the G matching up
// rows (g0, u0, g1, u1, ... with g_i = gate rows [i*G, (i+1)*G)). Each destination row is a
// gather of one source row, copied in 16-byte units; w13_bias goes through the same row map
// (its "row" is one fp32). w2, w2_bias and non-gated (Relu2) or Canonical-layout weights are
// plain device-to-device copies. Runs once at load time, asynchronously on `stream`.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend.h"
#include "cuda/device/cuda_check.h"

namespace modmoe::cuda {
namespace {

constexpr int kThreads = 256;

struct GatherArgs {
  const void* src;       // [E_local, 2I, row_units] Unit, canonical order
  void* dst;             // [E_local, 2I, row_units] Unit, interleaved
  int64_t num_units;     // E_local * 2I * row_units
  int64_t row_units;     // Units per row
  int64_t intermediate;  // I
  int64_t group_rows;    // G
  bool up_first;         // canonical order is UpGate
};

// The canonical row (within one expert) that interleaved row r holds.
__device__ __forceinline__ int64_t canonical_row(int64_t r, const GatherArgs& a) {
  const int64_t group = r / (2 * a.group_rows), within = r % (2 * a.group_rows);
  const bool is_gate = within < a.group_rows;
  const int64_t i = group * a.group_rows + (is_gate ? within : within - a.group_rows);
  return is_gate != a.up_first ? i : a.intermediate + i;
}

template <class Unit>
__global__ void gather_rows_kernel(const GatherArgs a) {
  const int64_t rows_per_expert = 2 * a.intermediate;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < a.num_units;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = u % a.row_units, row = u / a.row_units;
    const int64_t expert = row / rows_per_expert, r = row % rows_per_expert;
    const int64_t src_row = expert * rows_per_expert + canonical_row(r, a);
    static_cast<Unit*>(a.dst)[u] = static_cast<const Unit*>(a.src)[src_row * a.row_units + col];
  }
}

void gather_rows(GatherArgs a, int64_t row_bytes, cudaStream_t stream) {
  const bool vec16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(a.src) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a.dst) % 16 == 0;
  const int64_t unit_bytes = vec16 ? 16 : (row_bytes % 4 == 0 ? 4 : 2);
  a.row_units = row_bytes / unit_bytes;
  a.num_units *= a.row_units;
  if (a.num_units == 0) return;
  const int64_t blocks_needed = (a.num_units + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < 65536 ? blocks_needed : 65536);
  if (unit_bytes == 16) {
    gather_rows_kernel<uint4><<<blocks, kThreads, 0, stream>>>(a);
  } else if (unit_bytes == 4) {
    gather_rows_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    gather_rows_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(a);
  }
  MODMOE_LAUNCH_CHECK(stream);
}

void copy(const TensorView& dst, const TensorView& src, const char* name, cudaStream_t stream) {
  if (!src.defined()) return;
  MODMOE_CHECK(
      dst.defined() && dst.nbytes() == src.nbytes() && dst.is_contiguous() && src.is_contiguous(),
      "cuda::prepare_weights: dst.", name, " must be a contiguous tensor of shape ",
      src.shape_string(), ", got ", dst.shape_string());
  if (src.nbytes() == 0) return;
  MODMOE_CUDA_CHECK(
      cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice, stream));
}

}  // namespace

void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options, Stream stream) {
  if (src.scheme != QuantScheme::None) {
    MODMOE_NOT_SUPPORTED("cuda::prepare_weights for scheme ", quant_scheme_name(src.scheme));
  }
  MODMOE_CHECK(src.layout == WeightLayout::Canonical,
               "cuda::prepare_weights: src must be in the Canonical layout");
  const int64_t E = src.w13.size(0), rows = src.w13.size(1), H = src.w13.size(2);
  const int64_t I = src.w2.size(2);
  const bool gated = rows == 2 * I;
  const bool interleave = gated && options.layout == WeightLayout::GateUpInterleaved;
  const int64_t G = options.interleave_rows;
  if (interleave) {
    MODMOE_CHECK(G >= 1 && I % G == 0, "cuda::prepare_weights: interleave_rows = ", G,
                 ": expected a divisor of intermediate = ", I);
    MODMOE_CHECK(dst.w13.defined() && dst.w13.nbytes() == src.w13.nbytes() &&
                     dst.w13.is_contiguous() && src.w13.is_contiguous() &&
                     dst.w13.data != src.w13.data,
                 "cuda::prepare_weights: dst.w13 must be a contiguous tensor of shape ",
                 src.w13.shape_string(), ", distinct from src.w13");
    GatherArgs a{src.w13.data, dst.w13.data, E * rows, 0, I, G, src.order == GateUpOrder::UpGate};
    gather_rows(a, H * static_cast<int64_t>(dtype_bytes(src.w13.dtype)), stream);
    if (src.w13_bias.defined()) {
      MODMOE_CHECK(dst.w13_bias.defined() && dst.w13_bias.nbytes() == src.w13_bias.nbytes() &&
                       dst.w13_bias.is_contiguous() && src.w13_bias.is_contiguous(),
                   "cuda::prepare_weights: dst.w13_bias must be a contiguous tensor of shape ",
                   src.w13_bias.shape_string());
      GatherArgs b{src.w13_bias.data, dst.w13_bias.data, E * rows, 0, I, G, a.up_first};
      gather_rows(b, static_cast<int64_t>(dtype_bytes(src.w13_bias.dtype)), stream);
    }
  } else {
    copy(dst.w13, src.w13, "w13", stream);
    copy(dst.w13_bias, src.w13_bias, "w13_bias", stream);
  }
  copy(dst.w2, src.w2, "w2", stream);
  copy(dst.w2_bias, src.w2_bias, "w2_bias", stream);

  dst.scheme = src.scheme;
  dst.order = src.order;
  dst.layout = interleave ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  dst.interleave_rows = interleave ? static_cast<int>(G) : 0;
}

}  // namespace modmoe::cuda
