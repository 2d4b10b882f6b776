// prepare_weights for FP8 weights on the GPU (docs/fp8.md, "Weights"): the twin of
// reference::prepare_weights_fp8. w13 rows (1 byte per element) and w13_bias go through the
// GateUpInterleaved row map with groups of G rows; Fp8Block128's w13_scale block rows go through
// the same map with G = 1 in units of 128-row blocks (gate block j, then up block j). The rest
// is copied. Runs once at load time, asynchronously on `stream`.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/fp8.h"
#include "cuda/device/gate_up_rows.h"
#include "cuda/quant/quant.h"

namespace modmoe::cuda {

void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options, Stream stream) {
  const int64_t E = src.w13.size(0), rows = src.w13.size(1), H = src.w13.size(2);
  const int64_t I = src.w2.size(2);
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;
  copy_device(dst.w2, src.w2, stream);
  copy_device(dst.w2_bias, src.w2_bias, stream);
  copy_device(dst.w2_scale, src.w2_scale, stream);
  if (!interleave) {
    copy_device(dst.w13, src.w13, stream);
    copy_device(dst.w13_bias, src.w13_bias, stream);
    copy_device(dst.w13_scale, src.w13_scale, stream);
    return;
  }
  const int64_t G = options.interleave_rows;
  const bool up_first = src.order == GateUpOrder::UpGate;
  interleave_gate_up_rows(src.w13.data, dst.w13.data, E, I, G, up_first, H, stream);
  if (src.w13_bias.defined()) {
    interleave_gate_up_rows(src.w13_bias.data, dst.w13_bias.data, E, I, G, up_first, 4, stream);
  }
  if (src.scheme == QuantScheme::Fp8Block128) {
    interleave_gate_up_rows(src.w13_scale.data, dst.w13_scale.data, E, I / fp8::kBlock, 1,
                            up_first, H / fp8::kBlock * 4, stream);
  } else {
    copy_device(dst.w13_scale, src.w13_scale, stream);
  }
}

}  // namespace modmoe::cuda
