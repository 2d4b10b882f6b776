// The NVFP4 numerics of src/core/nvfp4.h compiled for the device, against CUDA's conversions
// and against the same header compiled for the host:
//   - all 2^32 fp32 bit patterns: nvfp4::float_to_e2m1(x) on the device ==
//     __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest) and == its nibble of the paired
//     __nv_cvt_float2_to_fp4x2 (.x in the low nibble). On an sm_100a build running on
//     Blackwell that is the instruction cvt.rn.satfinite.e2m1x2.f32; on sm_90a CUDA emulates
//     it in software, an implementation independent of modmoe's;
//   - the 16 codes decoded by CUDA (fp4 -> half) == nvfp4::e2m1_to_float on the device;
//   - the quantization steps (global scale, block scale, one value, dequantize) on the device
//     == on the host, on random and edge inputs;
//   - the W4A16 kernels' scale factors (scale_factors_pair: bf16(s) * 2^119 in one bf16x2
//     multiply) and their lane-broadcast decode multiply (bf16x2_mul_half), on all 2^16 scale
//     pairs, bitwise against the formulation they replaced (fp32 multiply, then bf16; a
//     byte-permute broadcast, then bf16x2_mul), NaN scales included.
// A .cu file because it needs its own kernels; it skips cleanly without a GPU.
#include <cuda_fp16.h>
#include <cuda_fp4.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "core/nvfp4.h"
#include "cuda/gemm/sm80_w4a16_grouped_gemm.cuh"
#include "gpu_test_util.h"

namespace modmoe {
namespace {

constexpr int kMaxReported = 16;

struct Mismatches {
  unsigned long long count;
  unsigned int first[kMaxReported];
};

__global__ void exhaustive_kernel(Mismatches* out) {
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (1ull << 32);
       i += stride) {
    const uint32_t u = static_cast<uint32_t>(i);
    const float x = __uint_as_float(u);
    const float y = __uint_as_float(u ^ 0x80000000u);
    const uint8_t emu = nvfp4::float_to_e2m1(x);
    const uint8_t cuda = __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest);
    const uint8_t pair = __nv_cvt_float2_to_fp4x2(make_float2(x, y), __NV_E2M1, cudaRoundNearest);
    if (cuda != emu || pair != nvfp4::pack_e2m1x2(emu, nvfp4::float_to_e2m1(y))) {
      const unsigned long long slot = atomicAdd(&out->count, 1ull);
      if (slot < kMaxReported) out->first[slot] = u;
    }
  }
}

__global__ void decode_kernel(uint32_t* cuda, uint32_t* emu) {
  const int c = threadIdx.x;  // 16 threads
  const __half h = __half(__nv_cvt_fp4_to_halfraw(static_cast<__nv_fp4_storage_t>(c), __NV_E2M1));
  cuda[c] = __float_as_uint(__half2float(h));
  emu[c] = __float_as_uint(nvfp4::e2m1_to_float(static_cast<uint8_t>(c)));
}

// Per input i: global_scale_from_amax(a), block_scale_e4m3(a, g), quantize_e2m1(x, d) and
// dequantize(code, scale, g), with d = block_divisor(scale, g).
__global__ void steps_kernel(const float* x, const float* a, const float* g, float* global,
                             uint8_t* scale, uint8_t* code, float* deq, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  global[i] = nvfp4::global_scale_from_amax(a[i]);
  scale[i] = nvfp4::block_scale_e4m3(a[i], g[i]);
  code[i] = nvfp4::quantize_e2m1(x[i], nvfp4::block_divisor(scale[i], g[i]));
  deq[i] = nvfp4::dequantize(code[i], scale[i], g[i]);
}

// Per scale pair p (s_lo = p & 0xff, s_hi = p >> 8): the kernel's k = scale_factors_pair(p) and
// the earlier formulation's (K(s_lo), K(s_hi)) with K = bf16(float(s) * 2^119) in fp32; and for
// a word w of packed values, the decode multiplies of both lanes with each.
__global__ void scale_factors_kernel(uint32_t* k_new, uint32_t* k_old, uint32_t* mul_new,
                                     uint32_t* mul_old, uint32_t w) {
  const uint32_t p = blockIdx.x * blockDim.x + threadIdx.x;  // 65536 threads
  const uint32_t k = cuda::gemm::scale_factors_pair(p);
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(p), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  const __nv_bfloat162 ko = __floats2bfloat162_rn(__fmul_rn(f.x, nvfp4::kDecodeScaleBias),
                                                  __fmul_rn(f.y, nvfp4::kDecodeScaleBias));
  const uint32_t kb = *reinterpret_cast<const uint32_t*>(&ko);
  k_new[p] = k;
  k_old[p] = kb;
  const uint32_t x = nvfp4::e2m1_pair_bf16_bits(w ^ (p * 0x9E3779B9u), p & 3);
  mul_new[2 * p] = cuda::gemm::bf16x2_mul_half<0>(x, k);
  mul_new[2 * p + 1] = cuda::gemm::bf16x2_mul_half<1>(x, k);
  mul_old[2 * p] = cuda::gemm::bf16x2_mul(x, __byte_perm(kb, 0, 0x1010));
  mul_old[2 * p + 1] = cuda::gemm::bf16x2_mul(x, __byte_perm(kb, 0, 0x3232));
}

// nvfp4::scale_tile_offset (the Blackwell 128x4 scale layout) for every (row, col) of a padded
// [rows, cols] scale matrix, one thread per element.
__global__ void scale_tile_offset_kernel(int64_t* out, int64_t rows, int64_t cols) {
  const int64_t pc = nvfp4::scale_tile_padded_cols(cols);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < nvfp4::scale_tile_padded_rows(rows) * pc) {
    out[i] = nvfp4::scale_tile_offset(i / pc, i % pc, cols);
  }
}

class GpuNvfp4Convert : public test::GpuTest {};

// The device compiles the same layout formula the host tests (Nvfp4ScaleLayout in
// tests/cpu/test_nvfp4.cpp); an sm_100a build compiles it for the block-scaled kernel's target.
TEST_F(GpuNvfp4Convert, ScaleTileOffsetEqualsHost) {
  for (const int64_t cols : {int64_t{5}, int64_t{180}}) {
    const int64_t rows = 300;
    const int64_t n = nvfp4::scale_tile_padded_rows(rows) * nvfp4::scale_tile_padded_cols(cols);
    DeviceTensor out(DType::I64, {n});
    MODMOE_CUDA_CHECK(cudaMemset(out.data<int64_t>(), 0xff, n * sizeof(int64_t)));  // poison
    scale_tile_offset_kernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(
        out.data<int64_t>(), rows, cols);
    MODMOE_CUDA_CHECK(cudaGetLastError());
    const HostTensor h = out.to_host();
    const int64_t pc = nvfp4::scale_tile_padded_cols(cols);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(h.data<int64_t>()[i], nvfp4::scale_tile_offset(i / pc, i % pc, cols))
          << "cols " << cols << ", element " << i;
    }
  }
}

TEST_F(GpuNvfp4Convert, EmulationEqualsCudaOnAllFloats) {
  Mismatches* d = nullptr;
  MODMOE_CUDA_CHECK(cudaMalloc(&d, sizeof(Mismatches)));
  MODMOE_CUDA_CHECK(cudaMemset(d, 0, sizeof(Mismatches)));
  exhaustive_kernel<<<4096, 256>>>(d);
  MODMOE_CUDA_CHECK(cudaGetLastError());
  Mismatches h{};
  MODMOE_CUDA_CHECK(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost));
  MODMOE_CUDA_CHECK(cudaFree(d));
  EXPECT_EQ(h.count, 0ull) << "inputs where nvfp4::float_to_e2m1 differs from "
                              "__nv_cvt_float_to_fp4 or the x2 form";
  for (unsigned long long i = 0; i < std::min<unsigned long long>(h.count, kMaxReported); ++i) {
    const uint32_t u = h.first[i];
    ADD_FAILURE() << "x bits 0x" << std::hex << u << " (" << std::bit_cast<float>(u)
                  << "): emulation 0x" << int(nvfp4::float_to_e2m1(std::bit_cast<float>(u)));
  }
}

TEST_F(GpuNvfp4Convert, DecodeEqualsCudaOnAllCodes) {
  DeviceTensor cuda(DType::I32, {16}), emu(DType::I32, {16});
  decode_kernel<<<1, 16>>>(reinterpret_cast<uint32_t*>(cuda.data<int32_t>()),
                           reinterpret_cast<uint32_t*>(emu.data<int32_t>()));
  MODMOE_CUDA_CHECK(cudaGetLastError());
  const HostTensor hc = cuda.to_host(), he = emu.to_host();
  for (int c = 0; c < 16; ++c) {
    const uint32_t host = std::bit_cast<uint32_t>(nvfp4::e2m1_to_float(static_cast<uint8_t>(c)));
    EXPECT_EQ(static_cast<uint32_t>(hc.data<int32_t>()[c]), host) << "code " << c;
    EXPECT_EQ(static_cast<uint32_t>(he.data<int32_t>()[c]), host) << "code " << c;
  }
}

TEST_F(GpuNvfp4Convert, QuantizationStepsEqualHost) {
  std::mt19937_64 rng(test::seed(860));
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::uniform_int_distribution<int> ex(-30, 10);
  std::uniform_int_distribution<uint32_t> any;
  std::vector<float> x, a, g;
  for (int i = 0; i < (1 << 20); ++i) {
    x.push_back(nd(rng) * std::ldexp(1.0f, ex(rng) / 3));
    a.push_back(std::fabs(i % 4 ? x.back() * 1.5f : std::bit_cast<float>(any(rng))));
    g.push_back(std::ldexp(std::fabs(nd(rng)) + 0.01f, ex(rng)));
  }
  for (float v : {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, 6.0f, 5.0f, 2688.0f}) {
    for (float sc : {1.0f, 1e-10f / 2688.0f, INFINITY, NAN, 1e-40f}) {
      x.push_back(v);
      a.push_back(std::fabs(v));
      g.push_back(sc);
    }
  }
  const int n = static_cast<int>(x.size());
  const DeviceTensor dx = test::device_from(x, DType::F32, {n});
  const DeviceTensor da = test::device_from(a, DType::F32, {n});
  const DeviceTensor dg = test::device_from(g, DType::F32, {n});
  DeviceTensor dglobal(DType::F32, {n}), dscale(DType::U8, {n}), dcode(DType::U8, {n}),
      ddeq(DType::F32, {n});
  steps_kernel<<<(n + 255) / 256, 256>>>(dx.data<float>(), da.data<float>(), dg.data<float>(),
                                         dglobal.data<float>(), dscale.data<uint8_t>(),
                                         dcode.data<uint8_t>(), ddeq.data<float>(), n);
  MODMOE_CUDA_CHECK(cudaGetLastError());
  const HostTensor hg = dglobal.to_host(), hs = dscale.to_host(), hq = dcode.to_host(),
                   hd = ddeq.to_host();
  for (int i = 0; i < n; ++i) {
    const uint8_t sc = nvfp4::block_scale_e4m3(a[i], g[i]);
    const uint8_t q = nvfp4::quantize_e2m1(x[i], nvfp4::block_divisor(sc, g[i]));
    const float deq = nvfp4::dequantize(q, sc, g[i]);
    ASSERT_EQ(std::bit_cast<uint32_t>(hg.data<float>()[i]),
              std::bit_cast<uint32_t>(nvfp4::global_scale_from_amax(a[i])))
        << "amax " << a[i] << " (input " << i << ")";
    ASSERT_EQ(hs.data<uint8_t>()[i], sc) << "amax " << a[i] << ", g " << g[i];
    ASSERT_EQ(hq.data<uint8_t>()[i], q) << "x " << x[i] << ", scale " << int(sc) << ", g " << g[i];
    const float dev = hd.data<float>()[i];
    ASSERT_TRUE(std::bit_cast<uint32_t>(dev) == std::bit_cast<uint32_t>(deq) ||
                (std::isnan(dev) && std::isnan(deq)))
        << "code " << int(q) << ", scale " << int(sc) << ", g " << g[i];
  }
}

TEST_F(GpuNvfp4Convert, KernelScaleFactorsEqualTheFp32Formula) {
  constexpr int n = 1 << 16;
  DeviceTensor k_new(DType::I32, {n}), k_old(DType::I32, {n}), mul_new(DType::I32, {2 * n}),
      mul_old(DType::I32, {2 * n});
  for (uint32_t w : {0x01234567u, 0x89abcdefu, 0xf7e6d5c4u}) {
    scale_factors_kernel<<<n / 256, 256>>>(
        reinterpret_cast<uint32_t*>(k_new.data<int32_t>()),
        reinterpret_cast<uint32_t*>(k_old.data<int32_t>()),
        reinterpret_cast<uint32_t*>(mul_new.data<int32_t>()),
        reinterpret_cast<uint32_t*>(mul_old.data<int32_t>()), w);
    MODMOE_CUDA_CHECK(cudaGetLastError());
    const HostTensor hn = k_new.to_host(), ho = k_old.to_host(), mn = mul_new.to_host(),
                     mo = mul_old.to_host();
    // Both lanes the same bits, or both NaN (a NaN's payload is not part of the contract).
    auto same = [](int32_t a, int32_t b) {
      auto nan = [](uint32_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; };
      for (int lane = 0; lane < 2; ++lane) {
        const uint32_t x = (static_cast<uint32_t>(a) >> (16 * lane)) & 0xffffu;
        const uint32_t y = (static_cast<uint32_t>(b) >> (16 * lane)) & 0xffffu;
        if (x != y && !(nan(x) && nan(y))) return false;
      }
      return true;
    };
    for (int p = 0; p < n; ++p) {
      ASSERT_TRUE(same(hn.data<int32_t>()[p], ho.data<int32_t>()[p]))
          << "scale pair 0x" << std::hex << p << ": 0x" << hn.data<int32_t>()[p] << " against 0x"
          << ho.data<int32_t>()[p];
      for (int h = 0; h < 2; ++h) {
        ASSERT_TRUE(same(mn.data<int32_t>()[2 * p + h], mo.data<int32_t>()[2 * p + h]))
            << "scale pair 0x" << std::hex << p << ", half " << h;
      }
      // And the value: K(s_lo) = float(s_lo) * 2^119 exactly (the bf16 is the fp32's top half).
      const uint8_t s_lo = static_cast<uint8_t>(p & 0xff);
      if ((s_lo & 0x7f) != 0x7f) {
        const float k = fp8::e4m3_to_float(s_lo) * nvfp4::kDecodeScaleBias;
        ASSERT_EQ(static_cast<uint32_t>(hn.data<int32_t>()[p]) & 0xffffu,
                  std::bit_cast<uint32_t>(k) >> 16)
            << "scale 0x" << std::hex << int(s_lo);
      }
    }
  }
}

}  // namespace
}  // namespace modmoe
