// CPU reference of FP8 quantization (docs/fp8.md): activation quantization, dequantization,
// FP8 weight preparation and the FP8 experts oracle. The public entry points in
// src/api/quant.cpp validate every argument first; these functions assume valid input.
// Kept out of src/backend.h: the CUDA side declares its twins in src/cuda/quant/quant.h.
#pragma once

#include <cstdint>

#include "modmoe/quant.h"

namespace modmoe::reference {

// See modmoe::quantize_activations / dequantize_activations.
void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options);
void dequantize_activations(const TensorView& q, QuantScheme scheme, const TensorView& scale,
                            const TensorView& out);
// See modmoe::quantize_weights.
void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale);

// prepare_weights for src.scheme = Fp8PerTensor / Fp8Block128 (dst's descriptor is set by
// the API): w13 rows (and w13_bias) interleaved in groups of G, Fp8Block128 scale rows moved
// as whole 128-row blocks, the rest copied.
void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options);

// The FP8 experts stage, the oracle the FP8 grouped GEMMs are tested against (docs/fp8.md,
// "Experts"). Same arguments as modmoe::experts, with hidden e4m3 + hidden_scale and FP8
// weights (Canonical or prepared); validates them with api::check_fp8_experts first.
void experts_fp8(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                 const ExpertsOptions& options, const ExpertsOutputs& out);

namespace detail {

// One 1x128 group: s = e4m3_scale_from_amax(amax), q[i] = quantize_e4m3(x[i], s).
//   x: [128] bf16 bits; q: [128] e4m3 (written); returns s.
float quantize_group_128(const uint16_t* x, uint8_t* q);

}  // namespace detail
}  // namespace modmoe::reference
