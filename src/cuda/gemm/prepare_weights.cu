// prepare_weights on the GPU: canonical w13 -> the GateUpInterleaved layout (experts.h).
//
// Per expert, destination rows come in groups of 2G: G gate rows, then the G matching up
// rows (g0, u0, g1, u1, ... with g_i = gate rows [i*G, (i+1)*G)). Each destination row is a
// gather of one source row (interleave_gate_up_rows, cuda/device/gate_up_rows.h); w13_bias
// goes through the same row map (its "row" is one fp32). w2, w2_bias and non-gated (Relu2) or Canonical-layout weights are
// plain device-to-device copies. Runs once at load time, asynchronously on `stream`.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/gate_up_rows.h"

namespace modmoe::cuda {
namespace {

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
    const bool up_first = src.order == GateUpOrder::UpGate;
    interleave_gate_up_rows(src.w13.data, dst.w13.data, E, I, G, up_first,
                            H * static_cast<int64_t>(dtype_bytes(src.w13.dtype)), stream);
    if (src.w13_bias.defined()) {
      MODMOE_CHECK(dst.w13_bias.defined() && dst.w13_bias.nbytes() == src.w13_bias.nbytes() &&
                       dst.w13_bias.is_contiguous() && src.w13_bias.is_contiguous(),
                   "cuda::prepare_weights: dst.w13_bias must be a contiguous tensor of shape ",
                   src.w13_bias.shape_string());
      interleave_gate_up_rows(src.w13_bias.data, dst.w13_bias.data, E, I, G, up_first,
                              static_cast<int64_t>(dtype_bytes(src.w13_bias.dtype)), stream);
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
