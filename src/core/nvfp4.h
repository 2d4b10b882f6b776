// Bit-exact NVFP4 numerics shared by the CPU reference and the CUDA kernels (docs/nvfp4.md):
// the e2m1 element format, its packing, and the three steps of NVFP4 quantization (global
// scale from the tensor amax, e4m3 block scale from the block amax, one value). Header-only;
// compiles as plain C++ or under nvcc, on the host and the device. The e4m3 side (scale
// conversions, bit casts, the IEEE division) is src/core/fp8.h.
//
// e2m1 (OCP FP4 E2M1): s ee m, exponent bias 1, no inf, no NaN. The 16 codes:
//   0x0..0x7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6;  0x8..0xf = the same negated (0x8 is -0).
// Packed pairs (DType::E2M1x2): element 2i in the low nibble of byte i, 2i + 1 in the high one.
//
// NVFP4 value = e2m1 * e4m3 block scale (one per 16 consecutive values along K) * fp32 global
// scale (one per tensor, or per expert). Every scale here is a *dequantization* multiplier:
// the global scale is ModelOpt's `weight_scale_2` / `input_scale`, amax / (6 * 448); FlashInfer
// and TRT-LLM quantizers take its reciprocal (`global_sf` = 448 * 6 / amax).
#pragma once

#include <stdint.h>

#include "core/fp8.h"
#include "core/hd.h"

// NOTE: as in fp8.h, every function is `constexpr` (implicitly inline), so the definitions
// stay ODR-safe whichever header defined MODMOE_HD first; the CPU tests static_assert on them.
namespace modmoe::nvfp4 {

inline constexpr int kBlock = 16;             // values per e4m3 block scale
inline constexpr float kE2m1Max = 6.0f;       // largest e2m1 magnitude
inline constexpr uint8_t kE2m1MaxCode = 0x7;  // +6
// amax_tensor / kGlobalDivisor puts the largest block scale at 448 (the e4m3 max) when the
// block holding the amax maps it onto 6 (the e2m1 max). 6 * 448 = 2688, exact in fp32.
inline constexpr float kGlobalDivisor = 6.0f * fp8::kE4m3Max;

// e2m1 code (the low 4 bits of `code`) -> float, exact. Exponent field e = bits 1-2, mantissa
// m = bit 0: e = 0 is m * 0.5 (the subnormal 0.5 and zero), else 2^(e-1) * (1 + m/2).
MODMOE_HD constexpr float e2m1_to_float(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x8u) << 28;
  const uint32_t e = (code >> 1) & 3u, m = code & 1u;
  // e = 0: 0 or 0.5 (0x3f000000); else biased fp32 exponent e - 1 + 127.
  const uint32_t mag = e == 0 ? (m ? 0x3f000000u : 0u) : (((e + 126u) << 23) | (m << 22));
  return fp8::bits_to_float(sign | mag);
}

// float -> e2m1, round to nearest even on the e2m1 grid, saturating: |x| > 5 (5 is the
// midpoint of 4 and 6 and ties to the even 4) and +-inf give +-6. The sign is kept, also on
// values that round to zero (-0.1 -> 0x8). NaN -> +6 (0x7): the rule of the hardware
// conversion (cvt.rn.satfinite.e2m1x2.f32, sm_100a) and of CUDA's __nv_cvt_float_to_fp4, which
// test_nvfp4.cpp checks this emulation against. A quantized NaN is still visible: its block
// scale is NaN (see block_scale_e4m3).
MODMOE_HD constexpr uint8_t float_to_e2m1(float x) {
  const uint32_t u = fp8::float_to_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 28) & 0x8u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return kE2m1MaxCode;
  // |x| against the midpoints between neighbouring codes (as bits: for non-negative floats
  // the bit order is the value order). Ties go to the even code: 0.25 -> 0, 0.75 -> 1.0,
  // 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
  uint8_t code;
  if (a <= 0x3e800000u) {         // <= 0.25
    code = 0;
  } else if (a < 0x3f400000u) {   // < 0.75
    code = 1;
  } else if (a <= 0x3fa00000u) {  // <= 1.25
    code = 2;
  } else if (a < 0x3fe00000u) {   // < 1.75
    code = 3;
  } else if (a <= 0x40200000u) {  // <= 2.5
    code = 4;
  } else if (a < 0x40600000u) {   // < 3.5
    code = 5;
  } else if (a <= 0x40a00000u) {  // <= 5
    code = 6;
  } else {
    code = 7;
  }
  return static_cast<uint8_t>(code | sign);
}

// Packing: `first` (element 2i) in the low nibble, `second` (2i + 1) in the high nibble.
MODMOE_HD constexpr uint8_t pack_e2m1x2(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first & 0xfu) | ((second & 0xfu) << 4));
}
MODMOE_HD constexpr uint8_t e2m1x2_first(uint8_t byte) { return byte & 0xfu; }
MODMOE_HD constexpr uint8_t e2m1x2_second(uint8_t byte) { return byte >> 4; }

// ---- the three steps of NVFP4 quantization, identical in the reference and the kernels ----

// The global (per-tensor) dequantization scale: max(amax, 1e-10) / 2688, one IEEE division.
// An all-zero tensor gets 1e-10 / 2688 (finite, so every block scale is 0 and every code 0).
// NaN amax -> the canonical NaN; inf amax -> inf.
MODMOE_HD constexpr float global_scale_from_amax(float amax) {
  if (!(amax == amax)) return fp8::bits_to_float(fp8::kCanonicalNaNBits);
  return fp8::div_rn(amax > fp8::kMinAmax ? amax : fp8::kMinAmax, kGlobalDivisor);
}

// The e4m3 block scale of a block of 16 whose largest |value| is `block_amax`:
//   e4m3_satfinite((block_amax / 6) / global)      two IEEE divisions, in this order.
// A zero block gives 0x00 (scale 0). A scale past 448 (a static global too small for the
// data) saturates to 448; the values past 6 * 448 * global then saturate to +-6. A NaN in the
// block gives 0x7f (NaN), so the whole block decodes to NaN.
MODMOE_HD constexpr uint8_t block_scale_e4m3(float block_amax, float global) {
  return fp8::float_to_e4m3(fp8::div_rn(fp8::div_rn(block_amax, kE2m1Max), global), true);
}

// The divisor of a block's values: float(scale) * global, one fp32 multiply.
MODMOE_HD constexpr float block_divisor(uint8_t scale_code, float global) {
  return fp8::e4m3_to_float(scale_code) * global;
}

// One value: e2m1_rn_satfinite(x / divisor), one IEEE division. A zero divisor (a zero block,
// or a block scale that rounded to zero in e4m3) gives +0 for every value of the block.
MODMOE_HD constexpr uint8_t quantize_e2m1(float x, float divisor) {
  if (divisor == 0.0f) return 0;
  return float_to_e2m1(fp8::div_rn(x, divisor));
}

// e2m1 * e4m3, exact: the product of a 2-bit and a 4-bit significand has at most 6
// significant bits, and its magnitude lies in {0} U [2^-10, 2688], so it is exact in fp32 and
// in bf16. This is the weight the Hopper W4A16 kernel feeds its bf16 MMA, and what the
// Blackwell block-scaled MMA multiplies by; the global scale is applied after the K sum.
MODMOE_HD constexpr float block_value(uint8_t code, uint8_t scale_code) {
  return e2m1_to_float(code) * fp8::e4m3_to_float(scale_code);
}

// The dequantized value: (e2m1 * e4m3) * global; the first product is exact, the second is
// one fp32 rounding, so this is the correctly rounded product of the three exact values.
MODMOE_HD constexpr float dequantize(uint8_t code, uint8_t scale_code, float global) {
  return block_value(code, scale_code) * global;
}

// ---- the W4A16 kernel's decode (src/cuda/gemm/sm80_w4a16_grouped_gemm.cuh) ----

// Values j and j + 4 (j = 0..3) of a 32-bit word of packed pairs (nibble i = value i, value 2i
// in the low nibble of byte i) as two bf16 bit patterns, value j in the low half, each equal to
// e2m1 * 2^-126 exactly: the nibble's magnitude (e1 e0 m) at bf16 bits 8:6 (exponent field e,
// top mantissa bit m; e = 0 gives the bf16 subnormal m * 2^-127, e2m1's own 0.5 scaled) and
// its sign at bit 15. The two nibbles sit 16 bits apart, so one multiply by (1 << 6) + (1 << 12)
// (or by (1 << 2) + (1 << 8) for the odd nibbles) places magnitude and sign of both without
// carries, and one mask keeps them: 3 integer operations per pair.
MODMOE_HD constexpr uint32_t e2m1_pair_bf16_bits(uint32_t word, int j) {
  const uint32_t y = j >= 2 ? word >> 8 : word;
  return (j % 2 == 0 ? (y & 0x000F000Fu) * 0x1040u : (y & 0x00F000F0u) * 0x0104u) & 0x81C081C0u;
}

// The kernel multiplies e2m1_pair_bf16_bits by bf16(float(scale) * 2^119) in bf16: the
// product is block_value(code, scale) * 2^-7, exact (w' has at most 6 significant bits in
// [2^-10, 2688]; 448 * 2^119 < the bf16 maximum). The epilogue multiplies the accumulator by
// kDecodeUnscale * global (exact: a power of two), which gives dot(x, w') * global bitwise.
inline constexpr float kDecodeScaleBias = 0x1p119f;
inline constexpr float kDecodeUnscale = 128.0f;

// ---- the wgmma W4A16 kernel's decode (src/cuda/gemm/sm90_wgmma_grouped_gemm.cuh) ----

// wgmma reads its B operand (the tokens) from shared memory in natural K order, so the A
// (weight) fragment must be in natural K order too: register a0 of lane (g, q) at k16 step s is
// values 16s + 2q and 16s + 2q + 1 of a row, i.e. the two nibbles of packed byte 8s + q (a2:
// byte 8s + q + 4). Given `pair` with such a byte x in bits 7:0 and a second one y in bits 15:8
// (bits 31:16 are ignored), this returns a word whose nibbles 0 / 4 are x's low / high nibble and
// nibbles 2 / 6 are y's: e2m1_pair_bf16_bits(word, 0) then decodes x to the bf16 pair
// (value 2i, value 2i + 1) and e2m1_pair_bf16_bits(word, 2) decodes y. Bits 12-15, 20-23 and
// 28-31 of the result are not read by those two calls (they hold other nibbles). 2 operations.
MODMOE_HD constexpr uint32_t e2m1_byte_pairs_spread(uint32_t pair) {
  return (pair & 0xFFFFu) | (pair << 12);
}

// Byte q (0..3) of x in bits 7:0 and byte q of y in bits 15:8: what the kernel's
// __byte_perm(x, y, q | (q + 4) << 4) gives in its low 16 bits (the host spelling, for tests).
MODMOE_HD constexpr uint32_t select_byte_pair(uint32_t x, uint32_t y, int q) {
  return ((x >> (8 * q)) & 0xFFu) | (((y >> (8 * q)) & 0xFFu) << 8);
}

// ---- the Blackwell block-scaled layout of the block scales (docs/nvfp4.md, "Blackwell plan") ----

// The 128x4 tiled layout that tcgen05.mma's block scaling reads through tcgen05.cp, and that
// vLLM's ModelOpt path (`weight_scale_interleaved`) and FlashInfer's CUTLASS NVFP4 GEMMs take:
// rows padded to a multiple of 128 and scale columns (K / 16) to a multiple of 4, with zero
// scales; one 512-byte tile per 128 rows x 4 scale columns, the tiles of one row band in K
// order; inside a tile row r and column c at (r % 32) * 16 + (r / 32) * 4 + c.
inline constexpr int kScaleTileRows = 128;
inline constexpr int kScaleTileCols = 4;
inline constexpr int kScaleTileBytes = kScaleTileRows * kScaleTileCols;

MODMOE_HD constexpr int64_t scale_tile_padded_rows(int64_t rows) {
  return (rows + kScaleTileRows - 1) / kScaleTileRows * kScaleTileRows;
}
MODMOE_HD constexpr int64_t scale_tile_padded_cols(int64_t cols) {
  return (cols + kScaleTileCols - 1) / kScaleTileCols * kScaleTileCols;
}
// Byte offset of the scale of (row, col) in a matrix of `cols` scale columns (K / 16).
MODMOE_HD constexpr int64_t scale_tile_offset(int64_t row, int64_t col, int64_t cols) {
  const int64_t k_tiles = scale_tile_padded_cols(cols) / kScaleTileCols;
  const int64_t tile = (row / kScaleTileRows) * k_tiles + col / kScaleTileCols;
  return tile * kScaleTileBytes + (row % 32) * 16 + ((row % kScaleTileRows) / 32) * 4 +
         col % kScaleTileCols;
}

}  // namespace modmoe::nvfp4
