// Device helpers of the NVFP4 weight decode shared by the W4A16 kernels: the mma.sync one
// (sm80_w4a16_grouped_gemm.cuh) and the wgmma one (sm90_wgmma_grouped_gemm.cuh). The formulas
// and why they are exact: docs/nvfp4.md and src/core/nvfp4.h (e2m1_pair_bf16_bits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "core/nvfp4.h"

namespace modmoe::cuda::gemm {

__device__ __forceinline__ uint2 lds_64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint4 lds_128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

// The value, kept in a register from here on: an empty volatile asm hides how it was computed,
// so the compiler cannot rematerialize it (recompute it from its inputs) inside the main loop,
// which it otherwise does with the per-thread shared-memory offsets and global pointers that
// the kernels below compute once.
__device__ __forceinline__ uint32_t pinned(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}
template <class T>
__device__ __forceinline__ const T* pinned(const T* p) {
  asm volatile("" : "+l"(p));
  return p;
}

// a * b on two bf16 lanes, one rounding (fma with -0: a * b + -0 = a * b, signed zeros kept).
// Subnormal inputs are honoured (PTX: no .ftz for bf16).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// a * (b.lo, b.lo) (kHalf = 0) or a * (b.hi, b.hi) (kHalf = 1) on two bf16 lanes, as
// bf16x2_mul; the broadcast is an operand swizzle of the multiply (no instruction of its own).
template <int kHalf>
__device__ __forceinline__ uint32_t bf16x2_mul_half(uint32_t a, uint32_t b) {
  uint32_t d;
  if constexpr (kHalf == 0) {
    asm("{\n .reg .b16 lo, hi;\n .reg .b32 bb;\n mov.b32 {lo, hi}, %2;\n mov.b32 bb, {lo, lo};\n"
        " fma.rn.bf16x2 %0, %1, bb, %3;\n}\n"
        : "=r"(d)
        : "r"(a), "r"(b), "r"(0x80008000u));
  } else {
    asm("{\n .reg .b16 lo, hi;\n .reg .b32 bb;\n mov.b32 {lo, hi}, %2;\n mov.b32 bb, {hi, hi};\n"
        " fma.rn.bf16x2 %0, %1, bb, %3;\n}\n"
        : "=r"(d)
        : "r"(a), "r"(b), "r"(0x80008000u));
  }
  return d;
}

// One 32-bit word of packed weights (8 values), times K = half kHalf of k (both lanes) ->
// p[j] = (value j, value j + 4) * scale * 2^-7 as bf16x2, j = 0..3 (nvfp4::e2m1_pair_bf16_bits).
template <int kHalf>
__device__ __forceinline__ void decode_word(uint32_t x, uint32_t k, uint32_t (&p)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = bf16x2_mul_half<kHalf>(nvfp4::e2m1_pair_bf16_bits(x, j), k);
}

// Two e4m3 block scales -> k = (K(s_lo), K(s_hi)) as bf16x2, K = bf16(float(s) * 2^119).
// Computed as bf16(float(s)) * bf16(2^119) in bf16: bf16(float(s)) is exact (e4m3 has 4
// significant bits and exponents in [-9, 8]) and so is the product (448 * 2^119 < 2^128), so
// the bits are those of bf16(float(s) * 2^119); NaN (0x7f) stays NaN, so its block decodes to
// NaN as in the oracle. `pair` holds s_lo in bits 7:0 and s_hi in bits 15:8.
__device__ __forceinline__ uint32_t scale_factors_pair(uint32_t pair) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair & 0xFFFFu), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
  constexpr uint32_t kBias2 = 0x7B007B00u;  // (2^119, 2^119) = nvfp4::kDecodeScaleBias in bf16
  static_assert(nvfp4::kDecodeScaleBias == 0x1p119f, "kBias2 is 2^119");
  return bf16x2_mul(*reinterpret_cast<const uint32_t*>(&b), kBias2);
}

__device__ __forceinline__ uint32_t scale_factors(uint8_t s_lo, uint8_t s_hi) {
  return scale_factors_pair(static_cast<uint32_t>(s_lo) | (static_cast<uint32_t>(s_hi) << 8));
}

__device__ __forceinline__ uint32_t lds_32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// The wgmma kernel's A fragment registers of one row and one k16 step (natural K order, see
// nvfp4::e2m1_byte_pairs_spread): x and y are the words of the row's packed bytes [8s, 8s + 4)
// and [8s + 4, 8s + 8) (step s), sel = q | (q + 4) << 4 picks byte q of each, k the scale
// factors of block s of rows r8 (low lane) and r8 + 8 (high lane) from scale_factors_pair,
// kHalf the lane of this row. r_k (values 16s + 2q, + 1: a0 or a1) and r_k8 (values
// 16s + 2q + 8, + 9: a2 or a3), each e2m1 * scale * 2^-7 exactly.
template <int kHalf>
__device__ __forceinline__ void decode_natural_pairs(uint32_t x, uint32_t y, uint32_t sel,
                                                     uint32_t k, uint32_t& r_k,
                                                     uint32_t& r_k8) {
  const uint32_t w = nvfp4::e2m1_byte_pairs_spread(__byte_perm(x, y, sel));
  r_k = bf16x2_mul_half<kHalf>(nvfp4::e2m1_pair_bf16_bits(w, 0), k);
  r_k8 = bf16x2_mul_half<kHalf>(nvfp4::e2m1_pair_bf16_bits(w, 2), k);
}

}  // namespace modmoe::cuda::gemm
