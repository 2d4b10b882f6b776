// NVFP4 on the GPU (docs/nvfp4.md): quantize_nvfp4, dequantize_nvfp4 and the Nvfp4 branch of
// prepare_weights, the twins of src/reference/nvfp4.cpp. Every formula is src/core/nvfp4.h's
// (fp8::div_rn is __fdiv_rn on the device, the e4m3 and e2m1 conversions are the shared
// emulations), so both sides produce the same bytes.
//
// quantize, dynamic global scale: four operations on the stream, no host synchronisation
// (the FP8 per-tensor pattern, src/cuda/quant/quantize.cu):
//   memset(global, 0) -> amax (atomicMax of the bits into global[0]) -> quantize (every thread
//   turns global[0]'s amax into g itself) -> one thread writes g over the amax.
//   NOTE: atomicMax on the bits of non-negative floats is an exact, order-independent max
//   (NaN, above inf, wins), so the result is the same on every run.
// quantize, static: the quantize kernel alone, reading the caller's global[0].
// One thread per block of 16 values: two 16-byte loads, 8 bytes of codes, one scale byte.
// quantize with one global per row (the all-to-all payload form): one kernel, one CTA of
// kRowThreads per row (grid-stride over rows): the row's amax (a CTA reduction, no atomics),
// its global written by thread 0, then the row's blocks; static reads global[row].
// dequantize: one thread per packed byte, the global of its row (or global[0]).
#include <cuda_runtime.h>

#include <cstdint>

#include "core/nvfp4.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/gate_up_rows.h"
#include "cuda/quant/quant.h"

namespace modmoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxBlocks = 4096;

unsigned blocks_for(int64_t threads_needed) {
  const int64_t b = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

// amax of |x| over x [n / 8] 16-byte vectors of bf16, as bits, into *amax_bits.
__global__ void amax_kernel(const uint4* x, int64_t num_vec, unsigned int* amax_bits) {
  uint32_t m = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < num_vec;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint4 v = x[i];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      m = max(m, w[j] & 0x7fffu);
      m = max(m, (w[j] >> 16) & 0x7fffu);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  // The bf16 magnitude as fp32 bits: same order, so the max of either is the same value.
  if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, m << 16);
}

struct QuantArgs {
  const uint4* x;      // [blocks * 2] 16-byte vectors: [rows, H] bf16
  uint2* q;            // [blocks] 8 bytes of codes: [rows, H/2] E2M1x2
  uint8_t* scale;      // [blocks]: [rows, H/16] E4M3
  const float* global;  // [1]: the amax bits (dynamic) or the caller's scale (static)
  int64_t num_blocks;  // rows * H / 16
  bool dynamic;
};

// Block b of 16 values (x[2b], x[2b + 1]) with global g: 8 bytes of codes and the scale.
__device__ __forceinline__ void quantize_block(const uint4* x, uint2* q, uint8_t* scale,
                                               int64_t b, float g) {
  const uint4 v0 = x[2 * b], v1 = x[2 * b + 1];
  const uint32_t w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
  uint32_t amax = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    amax = max(amax, w[j] & 0x7fffu);
    amax = max(amax, (w[j] >> 16) & 0x7fffu);
  }
  const uint8_t sc = nvfp4::block_scale_e4m3(bf16_bits_to_f32(amax), g);
  const float d = nvfp4::block_divisor(sc, g);
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int j = 0; j < 8; ++j) {  // word j holds values 2j (low half) and 2j + 1
    const uint8_t lo = nvfp4::quantize_e2m1(bf16_bits_to_f32(w[j] & 0xffffu), d);
    const uint8_t hi = nvfp4::quantize_e2m1(bf16_bits_to_f32(w[j] >> 16), d);
    packed[j / 4] |= static_cast<uint32_t>(nvfp4::pack_e2m1x2(lo, hi)) << (8 * (j % 4));
  }
  q[b] = make_uint2(packed[0], packed[1]);
  scale[b] = sc;
}

__global__ void quantize_kernel(const QuantArgs a) {
  const float g = a.dynamic ? nvfp4::global_scale_from_amax(*a.global) : *a.global;
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < a.num_blocks;
       b += int64_t{gridDim.x} * blockDim.x) {
    quantize_block(a.x, a.q, a.scale, b, g);
  }
}

constexpr int kRowThreads = 128;
constexpr unsigned kMaxRowBlocks = 8192;

struct RowQuantArgs {
  const uint4* x;      // [rows, H] bf16 as 16-byte vectors
  uint2* q;            // [rows, H/2] E2M1x2, 8 bytes per block of 16
  uint8_t* scale;      // [rows, H/16] E4M3
  float* global;       // [rows] fp32: written (dynamic) or read (static)
  int64_t rows;
  int64_t row_blocks;  // H / 16
  bool dynamic;
};

// One CTA per row (grid-stride): each row is quantized as a tensor of its own.
__global__ void __launch_bounds__(kRowThreads) quantize_rows_kernel(const RowQuantArgs a) {
  __shared__ uint32_t warp_amax[kRowThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const uint4* xr = a.x + r * a.row_blocks * 2;
    float g;
    if (a.dynamic) {
      uint32_t m = 0;  // bf16 magnitude bits: their order is the value order, NaN wins
      for (int64_t i = threadIdx.x; i < a.row_blocks * 2; i += kRowThreads) {
        const uint4 v = xr[i];
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          m = max(m, w[j] & 0x7fffu);
          m = max(m, (w[j] >> 16) & 0x7fffu);
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) warp_amax[warp] = m;
      __syncthreads();
      m = warp_amax[0];
#pragma unroll
      for (int w = 1; w < kRowThreads / 32; ++w) m = max(m, warp_amax[w]);
      g = nvfp4::global_scale_from_amax(bf16_bits_to_f32(m));
      if (threadIdx.x == 0) a.global[r] = g;
      __syncthreads();  // warp_amax is reused by the next row
    } else {
      g = a.global[r];
    }
    uint2* qr = a.q + r * a.row_blocks;
    uint8_t* sr = a.scale + r * a.row_blocks;
    for (int64_t b = threadIdx.x; b < a.row_blocks; b += kRowThreads) quantize_block(xr, qr, sr, b, g);
  }
}

// Dynamic: the amax bits in global[0] become the global scale.
__global__ void write_global_kernel(float* global) {
  *global = nvfp4::global_scale_from_amax(*global);
}

// out[i] = dequantize(code i, scale[i / 16], g): one thread per packed byte (two values);
// g = global[0], or the global of the byte's row (row_bytes > 0: H/2 packed bytes per row).
template <bool kBf16>
__global__ void dequantize_kernel(const uint8_t* q, const uint8_t* scale, const float* global,
                                  void* out, int64_t num_bytes, int64_t row_bytes) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < num_bytes;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = global[row_bytes > 0 ? i / row_bytes : 0];
    const uint8_t byte = q[i];
    const uint8_t sc = scale[i / (nvfp4::kBlock / 2)];
    const float v0 = nvfp4::dequantize(nvfp4::e2m1x2_first(byte), sc, g);
    const float v1 = nvfp4::dequantize(nvfp4::e2m1x2_second(byte), sc, g);
    if constexpr (kBf16) {
      reinterpret_cast<__nv_bfloat162*>(out)[i] = __floats2bfloat162_rn(v0, v1);
    } else {
      reinterpret_cast<float2*>(out)[i] = make_float2(v0, v1);
    }
  }
}

}  // namespace

void quantize_nvfp4(const TensorView& x, const TensorView& q, const TensorView& scale,
                    const TensorView& global_scale, const Nvfp4QuantizeOptions& options,
                    Stream stream_handle) {
  const cudaStream_t stream = stream_handle;
  const int64_t n = x.numel();  // a multiple of 32
  float* global = global_scale.ptr<float>();
  const bool dynamic = !options.static_global_scale;
  if (global_scale.numel() != 1) {  // one global per row (a [1, H] tensor takes the path below)
    const int64_t h = x.size(-1), rows = n / h;
    if (rows == 0) return;
    const RowQuantArgs a{x.ptr<const uint4>(), q.ptr<uint2>(), scale.ptr<uint8_t>(), global,
                         rows, h / nvfp4::kBlock, dynamic};
    const unsigned grid = static_cast<unsigned>(rows < kMaxRowBlocks ? rows : kMaxRowBlocks);
    quantize_rows_kernel<<<grid, kRowThreads, 0, stream>>>(a);
    MODMOE_LAUNCH_CHECK(stream);
    return;
  }
  if (n == 0) {
    if (dynamic) {  // an empty tensor's amax is 0: the all-zero tensor's global scale
      MODMOE_CUDA_CHECK(cudaMemsetAsync(global, 0, sizeof(float), stream));
      write_global_kernel<<<1, 1, 0, stream>>>(global);
      MODMOE_LAUNCH_CHECK(stream);
    }
    return;
  }
  if (dynamic) {
    MODMOE_CUDA_CHECK(cudaMemsetAsync(global, 0, sizeof(float), stream));
    amax_kernel<<<blocks_for(n / 8), kThreads, 0, stream>>>(x.ptr<const uint4>(), n / 8,
                                                              reinterpret_cast<unsigned int*>(global));
    MODMOE_LAUNCH_CHECK(stream);
  }
  QuantArgs a{x.ptr<const uint4>(), q.ptr<uint2>(), scale.ptr<uint8_t>(), global,
              n / nvfp4::kBlock, dynamic};
  quantize_kernel<<<blocks_for(a.num_blocks), kThreads, 0, stream>>>(a);
  MODMOE_LAUNCH_CHECK(stream);
  if (dynamic) {
    write_global_kernel<<<1, 1, 0, stream>>>(global);
    MODMOE_LAUNCH_CHECK(stream);
  }
}

void dequantize_nvfp4(const TensorView& q, const TensorView& scale,
                      const TensorView& global_scale, const TensorView& out,
                      Stream stream_handle) {
  const cudaStream_t stream = stream_handle;
  const int64_t bytes = q.numel();
  if (bytes == 0) return;
  const unsigned blocks = blocks_for(bytes);
  // One global per row: H/2 packed bytes per row; a single [1] global: 0 (global[0] for all).
  const int64_t row_bytes = global_scale.numel() != 1 ? q.size(-1) : 0;
  if (out.dtype == DType::BF16) {
    dequantize_kernel<true><<<blocks, kThreads, 0, stream>>>(
        q.ptr<const uint8_t>(), scale.ptr<const uint8_t>(), global_scale.ptr<const float>(),
        out.data, bytes, row_bytes);
  } else {
    dequantize_kernel<false><<<blocks, kThreads, 0, stream>>>(
        q.ptr<const uint8_t>(), scale.ptr<const uint8_t>(), global_scale.ptr<const float>(),
        out.data, bytes, row_bytes);
  }
  MODMOE_LAUNCH_CHECK(stream);
}

void prepare_weights_nvfp4(const ExpertWeights& src, ExpertWeights& dst,
                           const PrepareWeightsOptions& options, Stream stream_handle) {
  const cudaStream_t stream = stream_handle;
  const int64_t E = src.w13.size(0), rows = src.w13.size(1);
  const int64_t I = src.intermediate();
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;
  copy_device(dst.w2, src.w2, stream);
  copy_device(dst.w2_scale, src.w2_scale, stream);
  copy_device(dst.w2_bias, src.w2_bias, stream);
  copy_device(dst.w13_global_scale, src.w13_global_scale, stream);
  copy_device(dst.w2_global_scale, src.w2_global_scale, stream);
  if (!interleave) {
    copy_device(dst.w13, src.w13, stream);
    copy_device(dst.w13_scale, src.w13_scale, stream);
    copy_device(dst.w13_bias, src.w13_bias, stream);
    return;
  }
  // One permutation of w13 rows, applied to the three tensors indexed by w13 row.
  const int64_t G = options.interleave_rows;
  const bool up_first = src.order == GateUpOrder::UpGate;
  // Packed rows and their scale rows through the same row map (gate_up_rows.h).
  interleave_gate_up_rows(src.w13.data, dst.w13.data, E, I, G, up_first, src.w13.size(2),
                          stream);
  interleave_gate_up_rows(src.w13_scale.data, dst.w13_scale.data, E, I, G, up_first,
                          src.w13_scale.size(2), stream);
  if (src.w13_bias.defined()) {
    interleave_gate_up_rows(src.w13_bias.data, dst.w13_bias.data, E, I, G, up_first, 4, stream);
  }
}

}  // namespace modmoe::cuda
