// CPU reference of NVFP4 (docs/nvfp4.md): quantization, dequantization, weight preparation and
// the W4A16 experts oracle. The public entry points (src/api/nvfp4.cpp) validate every argument
// first; these functions assume valid input. Every formula goes through src/core/nvfp4.h.
#pragma once

#include <cstdint>

#include "modmoe/quant.h"

namespace modmoe::reference {

// See modmoe::quantize_nvfp4 / dequantize_nvfp4.
void quantize_nvfp4(const TensorView& x, const TensorView& q, const TensorView& scale,
                    const TensorView& global_scale, const Nvfp4QuantizeOptions& options);
void dequantize_nvfp4(const TensorView& q, const TensorView& scale,
                      const TensorView& global_scale, const TensorView& out);

// prepare_weights for src.scheme = Nvfp4 (dst's descriptor is set by the API): the packed w13
// rows, their scale rows and w13_bias interleaved in groups of G; the rest copied.
void prepare_weights_nvfp4(const ExpertWeights& src, ExpertWeights& dst,
                           const PrepareWeightsOptions& options);

// The NVFP4-weight, bf16-activation (W4A16) experts stage: the oracle the Hopper decode
// kernel and the Blackwell block-scaled kernel are tested against (docs/nvfp4.md, "Experts").
// Same arguments as modmoe::experts, with NVFP4 weights (Canonical or prepared) and bf16
// hidden; validates them with api::check_nvfp4_experts first. Per weight row n of expert e:
//   acc = sum_k x[k] * (e2m1[n][k] * block_scale[n][k/16])    fp32, the bf16 stage's dot
//   out = acc * global[e]                                      one fp32 multiply
// then bias, LoRA, activation, bf16 rounding and finalize exactly as the bf16 stage.
void experts_nvfp4(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                   const ExpertsOptions& options, const ExpertsOutputs& out);

// The block scales of one matrix, linear (`[rows, cols]` e4m3, row stride `ld` bytes), in the
// Blackwell 128x4 tiled layout (nvfp4::scale_tile_offset): `tiled` holds
// scale_tile_padded_rows(rows) * scale_tile_padded_cols(cols) bytes, the padding zero.
void tile_block_scales_128x4(const uint8_t* linear, int64_t rows, int64_t cols, int64_t ld,
                             uint8_t* tiled);

namespace detail {

// One block of 16 bf16 values with a known global scale: returns the e4m3 block scale and
// writes the 8 packed bytes.
//   x: [16] bf16 bits; q: [8] E2M1x2 (written)
uint8_t quantize_block_16(const uint16_t* x, float global, uint8_t* q);

}  // namespace detail
}  // namespace modmoe::reference
