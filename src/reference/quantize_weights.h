// Host-side quantization of expert weights into the checkpoint layout of a quantized scheme
// (docs/fp8.md "Weights", docs/nvfp4.md "Weights"): what a DeepSeek-V3 / vLLM / ModelOpt
// checkpoint stores, made from float master weights. For the tests and the benchmarks, which
// build quantized weights from the same masters as their bf16 weights; never the hot path.
#pragma once

#include <vector>

#include "core/host_tensor.h"
#include "modmoe/quant.h"

namespace modmoe::reference {

// FP8, scale s = e4m3_scale_from_amax(amax) per 128x128 block (Fp8Block128) or per expert
// (Fp8PerTensor), q = quantize_e4m3(w, s) (docs/fp8.md). Host tensors:
//   w:     [E, R, C] bf16 or fp32, contiguous
//   q:     [E, R, C] e4m3
//   scale: Fp8Block128 [E, R/128, C/128] (R, C multiples of 128), Fp8PerTensor [E]; fp32
void quantize_fp8_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale);

// NVFP4, one expert at a time through the quantizer of docs/nvfp4.md with a dynamic global per
// expert. Host tensors:
//   w: [E, R, C] bf16 (C % 32 == 0); q: [E, R, C/2] E2M1x2; scale: [E, R, C/16] E4M3;
//   global: [E] fp32
void quantize_nvfp4_weights(const TensorView& w, const TensorView& q, const TensorView& scale,
                            const TensorView& global);

// Canonical bf16 weights (host) -> the same experts in `scheme` (Fp8PerTensor, Fp8Block128 or
// Nvfp4), canonical layout, in new host tensors appended to `keep`; biases are copied.
ExpertWeights quantize_expert_weights(const ExpertWeights& src, QuantScheme scheme,
                                      std::vector<HostTensor>& keep);

}  // namespace modmoe::reference
