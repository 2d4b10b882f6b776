// Bit-exact float8 conversions shared by the CPU reference and the CUDA kernels
// (docs/fp8.md): e4m3fn (PyTorch's float8_e4m3fn, the OCP "E4M3"), the ue8m0 power-of-two
// scales of the MX formats, and the two steps of FP8 quantization (scale from amax, quantize
// one value). Header-only; compiles as plain C++ or under nvcc, on the host and the device.
//
// e4m3fn: s eeee mmm, bias 7, no infinity; 0x7f / 0xff are NaN; largest finite 448 (0x7e),
// smallest normal 2^-6 (0x08), smallest subnormal 2^-9 (0x01).
#pragma once

#include <stdint.h>

#include "core/hd.h"

#ifndef __CUDA_ARCH__
#include <bit>
#endif
#ifdef __CUDACC__
#include <cuda_fp8.h>
#endif

// NOTE: every function is also `constexpr` (implicitly inline): core/activation_math.h defines
// MODMOE_HD without `inline`, and whichever header comes first wins; constexpr keeps these
// definitions ODR-safe under either. On the host they evaluate at compile time (the CPU tests
// static_assert on them); on the device the bit casts are intrinsics.
namespace modmoe::fp8 {

inline constexpr float kE4m3Max = 448.0f;      // largest finite e4m3fn
inline constexpr uint8_t kE4m3MaxCode = 0x7e;  // +448
inline constexpr uint8_t kE4m3NaN = 0x7f;      // the NaN the saturating conversion returns
inline constexpr int kBlock = 128;             // elements per scale block (1x128, 128x128)
// Floor of the amax a dynamic scale is computed from: an all-zero group gets a tiny positive
// scale instead of 0 (0 / 0 would be NaN). 1e-10 is vLLM's per_token_group_quant_fp8 eps.
inline constexpr float kMinAmax = 1e-10f;
inline constexpr uint32_t kCanonicalNaNBits = 0x7fc00000u;  // the NaN scale of a NaN input

MODMOE_HD constexpr uint32_t float_to_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  return std::bit_cast<uint32_t>(x);
#endif
}

MODMOE_HD constexpr float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

// float -> e4m3fn, round to nearest even on the e4m3 grid (subnormals included); -0 and the
// sign of a value that rounds to 0 are kept.
//   saturate = true:  |x| beyond 448 (and +-inf) -> +-448; NaN -> 0x7f. Equal bit for bit to
//                     __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) (PTX
//                     cvt.rn.satfinite.e4m3x2.f32); tests/gpu/test_gpu_quant_convert.cu checks
//                     all 2^32 inputs.
//   saturate = false: PyTorch's x.to(torch.float8_e4m3fn): a value that rounds past 448
//                     (|x| > 464, +-inf) and NaN -> 0x7f | sign (NaN, sign kept).
MODMOE_HD constexpr uint8_t float_to_e4m3(float x, bool saturate) {
  const uint32_t u = float_to_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  const uint8_t overflow = saturate ? static_cast<uint8_t>(kE4m3MaxCode | sign)
                                    : static_cast<uint8_t>(kE4m3NaN | sign);
  if (a > 0x7f800000u) return saturate ? kE4m3NaN : static_cast<uint8_t>(kE4m3NaN | sign);
  const int e = static_cast<int>(a >> 23) - 127;  // unbiased; -127 for 0 and float subnormals
  if (e > 8) return overflow;                     // |x| >= 512, or inf
  if (e < -10) return sign;                       // |x| < 2^-10 = half the smallest subnormal
  // The e4m3 quantum at this exponent is 2^(max(e, -6) - 3): n = |x| / quantum, rounded to
  // nearest even, from the 24-bit significand shifted right by s in [20, 24].
  const int e_clamped = e < -6 ? -6 : e;
  const int s = 20 + (e_clamped - e);
  const uint32_t sig = (a & 0x7fffffu) | 0x800000u;
  uint32_t n = sig >> s;
  const uint32_t rem = sig & ((1u << s) - 1u);
  const uint32_t half = 1u << (s - 1);
  if (rem > half || (rem == half && (n & 1u))) ++n;
  // Normal: code = (biased exponent << 3) + mantissa = ((e + 6) << 3) + n with n in [8, 16]
  // (n = 16 carries into the exponent by itself); subnormal (e < -6): code = n in [0, 8].
  const uint32_t code = (static_cast<uint32_t>(e_clamped + 6) << 3) + n;
  if (code > kE4m3MaxCode) return overflow;
  return static_cast<uint8_t>(code | sign);
}

// e4m3fn -> float, exact for every finite code; 0x7f / 0xff -> a quiet NaN with the sign.
MODMOE_HD constexpr float e4m3_to_float(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t mag = code & 0x7fu;
  if (mag == 0x7fu) return bits_to_float(sign | kCanonicalNaNBits);
  const uint32_t exp = mag >> 3, man = mag & 7u;
  if (exp == 0) {  // subnormal or zero: man * 2^-9
    const float v = static_cast<float>(man) * 0.001953125f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 120u) << 23) | (man << 20));  // 120 = 127 - 7
}

// ue8m0 (MX scale): code c is 2^(c - 127), c = 255 is NaN; no sign, no zero.
MODMOE_HD constexpr float ue8m0_to_float(uint8_t code) {
  if (code == 0xffu) return bits_to_float(kCanonicalNaNBits);
  if (code == 0) return bits_to_float(0x00400000u);  // 2^-127, a float subnormal
  return bits_to_float(static_cast<uint32_t>(code) << 23);
}

// |x| -> ue8m0. round_up: the smallest power of two >= |x| (a scale that never lets
// |x| / scale grow past the element format's max); else the largest power of two <= |x|
// (the OCP MX spec's floor(log2)). Clamped to [2^-127, 2^127]; NaN and inf -> 0xff.
MODMOE_HD constexpr uint8_t float_to_ue8m0(float x, bool round_up) {
  const uint32_t a = float_to_bits(x) & 0x7fffffffu;
  if (a >= 0x7f800000u) return 0xffu;
  uint32_t code;
  if (a < 0x00800000u) {  // zero or float subnormal: 2^-127 (0x00400000) or 2^-126
    code = (round_up && a > 0x00400000u) ? 1u : 0u;
  } else {
    code = (a >> 23) + ((round_up && (a & 0x7fffffu) != 0) ? 1u : 0u);
  }
  return static_cast<uint8_t>(code > 254u ? 254u : code);
}

// ---- the two steps of FP8 quantization, identical in the reference and the kernels ----

// IEEE single division, round to nearest even, on both sides (no --use_fast_math reaches it).
MODMOE_HD constexpr float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The dequantization scale of a group (or tensor) whose largest |value| is `amax`:
// max(amax, kMinAmax) / 448, one IEEE division. NaN amax -> the canonical NaN (so the host and
// the device agree on its bits); inf amax -> inf.
MODMOE_HD constexpr float e4m3_scale_from_amax(float amax) {
  if (!(amax == amax)) return bits_to_float(kCanonicalNaNBits);
  return div_rn(amax > kMinAmax ? amax : kMinAmax, kE4m3Max);
}

// One quantized value: e4m3_satfinite(x / scale), the division in IEEE fp32. The device path
// is the hardware conversion; the host path its emulation (equal for every input, see
// float_to_e4m3).
MODMOE_HD constexpr uint8_t quantize_e4m3(float x, float scale) {
#ifdef __CUDA_ARCH__
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
#else
  return float_to_e4m3(x / scale, true);
#endif
}

}  // namespace modmoe::fp8
