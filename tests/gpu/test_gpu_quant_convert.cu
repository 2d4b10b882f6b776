// The e4m3 conversions of src/core/fp8.h against the hardware, on every input:
//   - all 2^32 fp32 bit patterns: fp8::float_to_e4m3(x, saturate=true) (the emulation the
//     CPU reference uses, here compiled for the device) == __nv_cvt_float_to_fp8(x,
//     __NV_SATFINITE, __NV_E4M3), and == both bytes of the paired __nv_cvt_float2_to_fp8x2 that
//     the quantization kernels use;
//   - the same emulation compiled for the host (g++) on 2^24 inputs spread over all patterns;
//   - every one of the 256 codes decoded by the hardware (fp8 -> f16 -> f32) ==
//     fp8::e4m3_to_float;
//   - fp8::quantize_e4m3 and fp8::e4m3_scale_from_amax on the device (intrinsic and
//     __fdiv_rn) == on the host, on random and edge inputs.
// A .cu file because it needs its own kernels; it skips cleanly without a GPU.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "gpu_test_util.h"

namespace modmoe {
namespace {

constexpr int kMaxReported = 16;

struct Mismatches {
  unsigned long long count;     // inputs whose results differ
  unsigned int first[kMaxReported];  // some of them (slots filled in arrival order)
};

// Every u in [0, 2^32): x = bits u. The emulation against the scalar intrinsic, and the pair
// intrinsic on (x, x ^ sign) against both.
__global__ void exhaustive_kernel(Mismatches* out) {
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (1ull << 32);
       i += stride) {
    const uint32_t u = static_cast<uint32_t>(i);
    const float x = __uint_as_float(u);
    const float y = __uint_as_float(u ^ 0x80000000u);
    const uint8_t hw = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    const uint8_t emu = fp8::float_to_e4m3(x, true);
    const uint16_t pair =
        __nv_cvt_float2_to_fp8x2(make_float2(x, y), __NV_SATFINITE, __NV_E4M3);
    const bool bad = hw != emu || (pair & 0xff) != emu ||
                     (pair >> 8) != fp8::float_to_e4m3(y, true);
    if (bad) {
      const unsigned long long slot = atomicAdd(&out->count, 1ull);
      if (slot < kMaxReported) out->first[slot] = u;
    }
  }
}

// out[j] = hardware conversion of bits (j * step + offset).
__global__ void sample_kernel(uint8_t* out, uint64_t n, uint32_t step, uint32_t offset) {
  for (uint64_t j = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += uint64_t(gridDim.x) * blockDim.x) {
    const float x = __uint_as_float(static_cast<uint32_t>(j * step + offset));
    out[j] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  }
}

__global__ void decode_kernel(uint32_t* out) {
  const int c = threadIdx.x;
  const __half h = __half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E4M3));
  out[c] = __float_as_uint(__half2float(h));
}

// quantize_e4m3(x[i], s[i]) and e4m3_scale_from_amax(a[i]) on the device.
__global__ void quantize_kernel(const float* x, const float* s, const float* a, uint8_t* q,
                                float* scale, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  q[i] = fp8::quantize_e4m3(x[i], s[i]);
  scale[i] = fp8::e4m3_scale_from_amax(a[i]);
}

class GpuFp8Convert : public test::GpuTest {};

TEST_F(GpuFp8Convert, EmulationEqualsHardwareOnAllFloats) {
  Mismatches* d = nullptr;
  MODMOE_CUDA_CHECK(cudaMalloc(&d, sizeof(Mismatches)));
  MODMOE_CUDA_CHECK(cudaMemset(d, 0, sizeof(Mismatches)));
  exhaustive_kernel<<<4096, 256>>>(d);
  MODMOE_CUDA_CHECK(cudaGetLastError());
  Mismatches h{};
  MODMOE_CUDA_CHECK(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost));
  MODMOE_CUDA_CHECK(cudaFree(d));
  EXPECT_EQ(h.count, 0ull) << "inputs where fp8::float_to_e4m3(x, true) differs from "
                              "__nv_cvt_float_to_fp8(SATFINITE) or the x2 form";
  for (unsigned long long i = 0; i < std::min<unsigned long long>(h.count, kMaxReported); ++i) {
    const uint32_t u = h.first[i];
    ADD_FAILURE() << "x bits 0x" << std::hex << u << " (" << std::bit_cast<float>(u)
                  << "): emulation 0x" << int(fp8::float_to_e4m3(std::bit_cast<float>(u), true));
  }
}

TEST_F(GpuFp8Convert, HostEmulationEqualsHardware) {
  // 2^24 inputs spread over every pattern (an odd step visits all exponents and signs), and
  // the first 2^24 patterns after 0x43000000 (128 .. beyond 448: saturation) densely.
  const uint64_t n = 1ull << 24;
  DeviceTensor d(DType::U8, {static_cast<int64_t>(n)});
  for (const auto [step, offset] : {std::pair<uint32_t, uint32_t>{257u, 12345u},
                                    std::pair<uint32_t, uint32_t>{1u, 0x43000000u},
                                    std::pair<uint32_t, uint32_t>{1u, 0x3a000000u}}) {
    sample_kernel<<<1024, 256>>>(d.data<uint8_t>(), n, step, offset);
    MODMOE_CUDA_CHECK(cudaGetLastError());
    const HostTensor h = d.to_host();
    for (uint64_t j = 0; j < n; ++j) {
      const uint32_t u = static_cast<uint32_t>(j * step + offset);
      const uint8_t want = h.data<uint8_t>()[j];
      ASSERT_EQ(fp8::float_to_e4m3(std::bit_cast<float>(u), true), want)
          << "x bits 0x" << std::hex << u;
    }
  }
}

TEST_F(GpuFp8Convert, DecodeEqualsHardwareOnAllCodes) {
  DeviceTensor d(DType::I32, {256});
  decode_kernel<<<1, 256>>>(reinterpret_cast<uint32_t*>(d.data<int32_t>()));
  MODMOE_CUDA_CHECK(cudaGetLastError());
  const HostTensor h = d.to_host();
  for (int c = 0; c < 256; ++c) {
    const uint32_t hw = static_cast<uint32_t>(h.data<int32_t>()[c]);
    const float emu = fp8::e4m3_to_float(static_cast<uint8_t>(c));
    if (std::isnan(emu)) {
      EXPECT_TRUE(std::isnan(std::bit_cast<float>(hw))) << "code 0x" << std::hex << c;
    } else {
      EXPECT_EQ(hw, std::bit_cast<uint32_t>(emu)) << "code 0x" << std::hex << c;
    }
  }
}

TEST_F(GpuFp8Convert, QuantizeAndScaleEqualHost) {
  std::mt19937_64 rng(test::seed(850));
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::uniform_int_distribution<uint32_t> any;
  std::vector<float> x, s, a;
  // Random values and scales, random bit patterns, and the edge cases.
  for (int i = 0; i < (1 << 20); ++i) {
    x.push_back(nd(rng));
    s.push_back(std::ldexp(std::fabs(nd(rng)) + 0.01f, static_cast<int>(any(rng) % 40) - 30));
    a.push_back(std::bit_cast<float>(any(rng) & 0x7fffffffu));
  }
  for (uint32_t b = 0; b < 65536; ++b) {  // every bf16 as an amax, and as a value
    x.push_back(std::bit_cast<float>(b << 16));
    s.push_back(0.0078125f);
    a.push_back(std::fabs(std::bit_cast<float>(b << 16)));
  }
  for (float v : {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, 448.0f, 464.0f, 1e-10f}) {
    for (float sc : {1.0f, 1e-10f / 448.0f, INFINITY, NAN, 1e-40f}) {
      x.push_back(v);
      s.push_back(sc);
      a.push_back(v);
    }
  }
  const int n = static_cast<int>(x.size());
  const DeviceTensor dx = test::device_from(x, DType::F32, {n});
  const DeviceTensor ds = test::device_from(s, DType::F32, {n});
  const DeviceTensor da = test::device_from(a, DType::F32, {n});
  DeviceTensor dq(DType::U8, {n}), dscale(DType::F32, {n});
  quantize_kernel<<<(n + 255) / 256, 256>>>(dx.data<float>(), ds.data<float>(), da.data<float>(),
                                            dq.data<uint8_t>(), dscale.data<float>(), n);
  MODMOE_CUDA_CHECK(cudaGetLastError());
  const HostTensor q = dq.to_host(), sc = dscale.to_host();
  for (int i = 0; i < n; ++i) {
    ASSERT_EQ(q.data<uint8_t>()[i], fp8::quantize_e4m3(x[i], s[i]))
        << "x = " << x[i] << ", s = " << s[i] << " (input " << i << ")";
    ASSERT_EQ(std::bit_cast<uint32_t>(sc.data<float>()[i]),
              std::bit_cast<uint32_t>(fp8::e4m3_scale_from_amax(a[i])))
        << "amax = " << a[i] << " (input " << i << ")";
  }
}

}  // namespace
}  // namespace modmoe
