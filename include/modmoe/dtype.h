// Data types and quantization schemes. No CUDA needed to include this header.
#pragma once

#include <cstddef>
#include <cstdint>

namespace modmoe {

enum class DType : uint8_t {
  F32,
  F64,
  BF16,
  F16,
  I32,
  I64,
  U8,
  E4M3,    // float8 e4m3fn, one byte
  E2M1x2,  // two float4 e2m1 values packed in one byte, low nibble first; shapes count bytes
  UE8M0,   // unsigned power-of-two scale, one byte (MX formats)
};

// Bytes of one element as stored. E2M1x2 is one byte holding two values.
size_t dtype_bytes(DType dtype);
const char* dtype_name(DType dtype);

// One field picks the precision of the whole pipeline (docs/contract.md, "Quantized parity").
enum class QuantScheme : uint8_t {
  None,          // bf16 activations, bf16 weights
  Fp8PerTensor,  // e4m3 + one fp32 scale; weights e4m3 + per-expert fp32 scales
  Fp8Block128,   // e4m3 + fp32 per 1x128; weights e4m3 + fp32 per 128x128 (DeepSeek)
  Nvfp4,         // e2m1 packed + e4m3 scale per 16 + fp32 global scale
  Mxfp8,         // e4m3 + ue8m0 scale per 32
};

const char* quant_scheme_name(QuantScheme scheme);

// Rounds a float to bf16 (round to nearest even, NaN kept quiet) and back. Host helpers used
// by the reference and the tests; the device code has its own intrinsics.
uint16_t float_to_bf16_bits(float x);
float bf16_bits_to_float(uint16_t bits);
inline float round_to_bf16(float x) { return bf16_bits_to_float(float_to_bf16_bits(x)); }

}  // namespace modmoe
