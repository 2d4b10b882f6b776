// FP8 activation quantization and dequantization on the GPU (docs/fp8.md, "Activations").
// Same formulas as the CPU reference, through src/core/fp8.h; the e4m3 conversion is the
// hardware one (cvt.rn.satfinite.e4m3x2.f32), which fp8::float_to_e4m3 emulates bit for bit.
//
// Fp8Block128: one kernel. 16 lanes own one 1x128 group (8 bf16 = one 16-byte load each),
//   reduce |x| with shuffles, compute the group's scale, quantize and store 8 bytes each.
// Fp8PerTensor, dynamic: four operations on the stream, no host synchronisation:
//   memset(scale, 0) -> amax (atomicMax of the bits into scale[0]) -> quantize (every block
//   turns scale[0]'s amax into the scale itself) -> one thread writes the scale over the amax.
//   NOTE: atomicMax on the bits of non-negative floats is an exact, order-independent max
//   (the float order is the integer order; NaN, above inf, wins), so the result is the same
//   on every run: the contract's "no atomics" rule is about order-dependent sums.
// Fp8PerTensor, static: the quantize kernel alone, reading the caller's scale[0].
// A dynamic per-tensor scale may be written once per row ([T]: the all-to-all payload form):
//   the last kernel copies it into every entry.
// Weights (quantize_weights): Fp8Block128, one CTA per 128x128 block (amax, then quantize from
//   registers); Fp8PerTensor, the per-tensor activation path once per expert.
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/fp8.h"
#include "cuda/device/cuda_check.h"
#include "cuda/quant/quant.h"

namespace modmoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                                // bf16 per 16-byte load
constexpr int kLanesPerGroup = fp8::kBlock / kVec;     // 16
// Grid-stride loops: 4096 blocks of 256 threads keep every SM busy on the largest inputs.
constexpr unsigned kMaxBlocks = 4096;

// Largest |x| of 8 bf16 (in a uint4, element 2i in the low half of word i), as sign-cleared
// bits: for non-negative values the integer order is the float order, NaN above inf.
__device__ __forceinline__ uint32_t abs_max_bits(const uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m = max(m, w[i] & 0x7fffu);
    m = max(m, (w[i] >> 16) & 0x7fffu);
  }
  return m;
}

// 8 bf16 -> 8 e4m3: e4m3_satfinite(x / s), element order kept (byte i = element i).
__device__ __forceinline__ uint2 quantize8(const uint4 v, float s) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t pairs[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float lo = __uint_as_float(w[i] << 16);
    const float hi = __uint_as_float(w[i] & 0xffff0000u);
    // .x -> the low byte
    pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(lo, s), __fdiv_rn(hi, s)),
                                        __NV_SATFINITE, __NV_E4M3);
  }
  return make_uint2(pairs[0] | (pairs[1] << 16), pairs[2] | (pairs[3] << 16));
}

unsigned blocks_for(int64_t threads_needed) {
  const int64_t b = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

// ---- Fp8Block128 ----

struct BlockArgs {
  const uint4* x;      // [num_groups * 16] 16-byte vectors of bf16 ([rows, H] bf16)
  uint2* q;            // [num_groups * 16] 8-byte vectors of e4m3 ([rows, H] e4m3)
  float* scale;        // [num_groups] fp32 ([rows, H/128])
  int64_t num_groups;  // rows * H / 128
  // Optional: only the first *valid_rows rows (a count on the device), groups_per_row = H/128.
  const int64_t* valid_rows;
  int64_t groups_per_row;
};

__global__ void __launch_bounds__(kThreads) quantize_block128_kernel(const BlockArgs a) {
  const int lane = threadIdx.x % kLanesPerGroup;
  const int half = (threadIdx.x / kLanesPerGroup) % 2;  // which group of the warp's pair
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t num_warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int64_t num_groups =
      a.valid_rows != nullptr ? min(a.num_groups, *a.valid_rows * a.groups_per_row) : a.num_groups;
  // The loop bound is the same for the whole warp, so every shuffle has all 32 lanes.
  for (int64_t base = warp * 2; base < num_groups; base += num_warps * 2) {
    const int64_t g = base + half;
    const bool valid = g < num_groups;
    const uint4 v = valid ? __ldg(a.x + g * kLanesPerGroup + lane) : make_uint4(0, 0, 0, 0);
    uint32_t m = abs_max_bits(v);
#pragma unroll
    for (int off = kLanesPerGroup / 2; off >= 1; off /= 2) {
      m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    }
    const float s = fp8::e4m3_scale_from_amax(__uint_as_float(m << 16));
    if (valid) {
      a.q[g * kLanesPerGroup + lane] = quantize8(v, s);
      if (lane == 0) a.scale[g] = s;
    }
  }
}

// ---- Fp8PerTensor ----

struct TensorArgs {
  const uint4* x;     // [num_vec] 16-byte vectors of bf16
  uint2* q;           // [num_vec] 8-byte vectors of e4m3
  float* scale;       // [1]: the scale (static), or the amax bits (dynamic, until finalized)
  int64_t num_vec;    // numel / 8
  bool from_amax;     // scale[0] holds amax bits: s = e4m3_scale_from_amax(amax)
};

__global__ void __launch_bounds__(kThreads) amax_kernel(const TensorArgs a) {
  __shared__ uint32_t warp_max[kThreads / 32];
  uint32_t m = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.num_vec;
       i += int64_t(gridDim.x) * blockDim.x) {
    m = max(m, abs_max_bits(__ldg(a.x + i)));
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < kThreads / 32 ? warp_max[threadIdx.x] : 0u;
    m = __reduce_max_sync(0xffffffffu, m);
    // bf16 bits << 16 are the fp32 bits of the same value.
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned int*>(a.scale), m << 16);
  }
}

__global__ void __launch_bounds__(kThreads) quantize_tensor_kernel(const TensorArgs a) {
  const float stored = *a.scale;
  const float s = a.from_amax ? fp8::e4m3_scale_from_amax(stored) : stored;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.num_vec;
       i += int64_t(gridDim.x) * blockDim.x) {
    a.q[i] = quantize8(__ldg(a.x + i), s);
  }
}

// One block: scale[0] holds the amax; every entry of scale[0, count) gets the scale ([1], or
// one copy per row). Every thread reads the amax before any thread writes.
__global__ void finalize_scale_kernel(float* scale, int64_t count) {
  const float s = fp8::e4m3_scale_from_amax(*scale);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) scale[i] = s;
}

// ---- dequantize ----

struct DequantArgs {
  const uint2* q;          // [num_vec] 8 e4m3 each
  const float* scale;      // [numel / 128], [rows] or [1]
  void* out;               // [numel] fp32 or bf16
  int64_t num_vec;
  int64_t vec_per_scale;   // 16 (1x128 groups), H/8 (one per row) or num_vec (one scale)
  bool bf16;               // out is bf16
};

// The host's float_to_bf16_bits (round to nearest even, NaN kept quiet with its payload), so
// that even NaN outputs match the reference bit for bit.
__device__ __forceinline__ uint32_t bf16_bits(float x) {
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return (u >> 16) | 0x0040u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

__global__ void __launch_bounds__(kThreads) dequantize_kernel(const DequantArgs a) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.num_vec;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint2 v = __ldg(a.q + i);
    const float s = a.scale[i / a.vec_per_scale];
    float f[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t word = j < 4 ? v.x : v.y;
      f[j] = __fmul_rn(fp8::e4m3_to_float(static_cast<uint8_t>(word >> (8 * (j % 4)))), s);
    }
    if (a.bf16) {
      uint4 o;
      o.x = bf16_bits(f[0]) | (bf16_bits(f[1]) << 16);
      o.y = bf16_bits(f[2]) | (bf16_bits(f[3]) << 16);
      o.z = bf16_bits(f[4]) | (bf16_bits(f[5]) << 16);
      o.w = bf16_bits(f[6]) | (bf16_bits(f[7]) << 16);
      static_cast<uint4*>(a.out)[i] = o;
    } else {
      float4* o = static_cast<float4*>(a.out) + 2 * i;
      o[0] = make_float4(f[0], f[1], f[2], f[3]);
      o[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
  }
}

// ---- weights, Fp8Block128: one CTA per 128x128 block ----

struct WeightBlockArgs {
  const uint4* w;     // [E, R, C] bf16, as 16-byte vectors
  uint2* q;           // [E, R, C] e4m3, as 8-byte vectors
  float* scale;       // [E, R/128, C/128] fp32, one per CTA
  int64_t row_vec;    // C / 8: vectors per row
  int64_t blocks_c;   // C / 128
};

// CTA b = (e * R/128 + rb) * C/128 + cb. Thread t owns row t / 2 of the block and 64 of its
// columns, (t % 2) * 64 + [0, 64): 8 vectors, loaded once, kept in registers for the quantize.
__global__ void __launch_bounds__(kThreads) quantize_weight_block128_kernel(const WeightBlockArgs a) {
  constexpr int kVecPerThread = fp8::kBlock * fp8::kBlock / kThreads / kVec;  // 8
  static_assert(kVecPerThread * kVec * 2 == fp8::kBlock, "two threads per block row");
  __shared__ uint32_t warp_max[kThreads / 32];
  const int64_t blk = blockIdx.x;
  const int64_t cb = blk % a.blocks_c, block_row = blk / a.blocks_c;  // e * R/128 + rb
  const int64_t row = block_row * fp8::kBlock + threadIdx.x / 2;     // row of [E * R, C]
  const int64_t first = row * a.row_vec + cb * (fp8::kBlock / kVec) + (threadIdx.x % 2) * kVecPerThread;
  uint4 v[kVecPerThread];
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < kVecPerThread; ++j) {
    v[j] = __ldg(a.w + first + j);
    m = max(m, abs_max_bits(v[j]));
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) m = max(m, warp_max[i]);
  const float s = fp8::e4m3_scale_from_amax(__uint_as_float(m << 16));
#pragma unroll
  for (int j = 0; j < kVecPerThread; ++j) a.q[first + j] = quantize8(v[j], s);
  if (threadIdx.x == 0) a.scale[blk] = s;
}

void check_aligned(const void* p, int bytes, const char* name) {
  MODMOE_CHECK(reinterpret_cast<uintptr_t>(p) % bytes == 0, "cuda::quantize: ", name,
               " must be ", bytes, "-byte aligned");
}

}  // namespace

void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options,
                          Stream stream) {
  const int64_t n = x.numel();  // a multiple of 128 (validated)
  check_aligned(x.data, 16, "x");
  check_aligned(q.data, 8, "q");
  if (scheme == QuantScheme::Fp8Block128) {
    const BlockArgs a{x.ptr<const uint4>(), q.ptr<uint2>(), scale.ptr<float>(), n / fp8::kBlock,
                      nullptr, 0};
    if (a.num_groups == 0) return;
    quantize_block128_kernel<<<blocks_for(a.num_groups * kLanesPerGroup), kThreads, 0, stream>>>(a);
    MODMOE_LAUNCH_CHECK(stream);
    return;
  }
  const TensorArgs a{x.ptr<const uint4>(), q.ptr<uint2>(), scale.ptr<float>(), n / kVec,
                     !options.static_scale};
  const int64_t num_scales = scale.numel();  // 1, or one per row (dynamic only)
  if (num_scales == 0) return;               // no rows
  if (!options.static_scale) {
    MODMOE_CUDA_CHECK(cudaMemsetAsync(a.scale, 0, sizeof(float), stream));
    if (a.num_vec > 0) {
      // Grid-stride: at most 1024 blocks, so at most 1024 atomics on scale[0].
      const unsigned blocks = blocks_for(a.num_vec) < 1024u ? blocks_for(a.num_vec) : 1024u;
      amax_kernel<<<blocks, kThreads, 0, stream>>>(a);
      MODMOE_LAUNCH_CHECK(stream);
    }
  }
  if (a.num_vec > 0) {
    quantize_tensor_kernel<<<blocks_for(a.num_vec), kThreads, 0, stream>>>(a);
    MODMOE_LAUNCH_CHECK(stream);
  }
  if (!options.static_scale) {
    finalize_scale_kernel<<<1, num_scales == 1 ? 1 : kThreads, 0, stream>>>(a.scale, num_scales);
    MODMOE_LAUNCH_CHECK(stream);
  }
}

void quantize_rows_block128(const __nv_bfloat16* x, uint8_t* q, float* scale, int64_t rows,
                            int64_t cols, const int64_t* valid_rows, cudaStream_t stream) {
  check_aligned(x, 16, "x");
  check_aligned(q, 8, "q");
  MODMOE_CHECK(cols % fp8::kBlock == 0, "cuda::quantize_rows_block128: cols = ", cols,
               ": expected a multiple of 128");
  const BlockArgs a{reinterpret_cast<const uint4*>(x), reinterpret_cast<uint2*>(q), scale,
                    rows * (cols / fp8::kBlock), valid_rows, cols / fp8::kBlock};
  if (a.num_groups == 0) return;
  quantize_block128_kernel<<<blocks_for(a.num_groups * kLanesPerGroup), kThreads, 0, stream>>>(a);
  MODMOE_LAUNCH_CHECK(stream);
}

void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale, Stream stream) {
  const int64_t E = w.size(0), R = w.size(1), C = w.size(2);
  if (E == 0) return;
  check_aligned(w.data, 16, "w");
  check_aligned(q.data, 8, "q");
  if (scheme == QuantScheme::Fp8PerTensor) {
    // One scale per expert: the per-tensor activation path on each expert's [R, C].
    for (int64_t e = 0; e < E; ++e) {
      const TensorView we = make_view(w.ptr<uint16_t>() + e * R * C, DType::BF16, {R, C}, w.device);
      const TensorView qe = make_view(q.ptr<uint8_t>() + e * R * C, DType::E4M3, {R, C}, q.device);
      const TensorView se = make_view(scale.ptr<float>() + e, DType::F32, {1}, scale.device);
      cuda::quantize_activations(we, QuantScheme::Fp8PerTensor, qe, se, QuantizeOptions{}, stream);
    }
    return;
  }
  const WeightBlockArgs a{w.ptr<const uint4>(), q.ptr<uint2>(), scale.ptr<float>(), C / kVec,
                          C / fp8::kBlock};
  const int64_t num_blocks = E * (R / fp8::kBlock) * (C / fp8::kBlock);
  MODMOE_CHECK(num_blocks <= 0x7fffffff, "quantize_weights: ", num_blocks,
               " blocks of 128x128: expected at most 2^31 - 1 (one CTA each)");
  quantize_weight_block128_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(a);
  MODMOE_LAUNCH_CHECK(stream);
}

// The scale layout follows from the sizes: one scale per 128 elements, per row, or one.
void dequantize_activations(const TensorView& q, QuantScheme /*scheme*/, const TensorView& scale,
                            const TensorView& out, Stream stream) {
  check_aligned(q.data, 8, "q");
  check_aligned(out.data, 16, "out");
  const int64_t num_vec = q.numel() / kVec;
  if (num_vec == 0) return;
  const DequantArgs a{q.ptr<const uint2>(), scale.ptr<const float>(), out.data, num_vec,
                      num_vec / scale.numel(), out.dtype == DType::BF16};
  dequantize_kernel<<<blocks_for(a.num_vec), kThreads, 0, stream>>>(a);
  MODMOE_LAUNCH_CHECK(stream);
}

}  // namespace modmoe::cuda
