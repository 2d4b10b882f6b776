// CUDA backend of FP8 quantization (docs/fp8.md): the twins of src/reference/quant.h,
// called by src/api/quant.cpp after validation. Kept out of src/backend.h on purpose.
#pragma once

#include "modmoe/quant.h"

namespace modmoe::cuda {

// Per-tensor dynamic: memset + amax + quantize + scale kernels on `stream`; Block128: one
// kernel. No allocation, no host synchronisation, graph-capturable.
void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options,
                          Stream stream);
void dequantize_activations(const TensorView& q, QuantScheme scheme, const TensorView& scale,
                            const TensorView& out, Stream stream);
void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale, Stream stream);
void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options, Stream stream);

}  // namespace modmoe::cuda
