#include <cuda_bf16.h>

#include "core/synth_fill.h"
#include "cuda/device/cuda_check.h"

namespace modmoe::synth {
namespace {

template <class T>
__global__ void fill_kernel(T* out, int64_t n, uint64_t seed, uint64_t stream, float scale,
                            float offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // NOTE: __fmul_rn/__fadd_rn keep the host's unfused rounding, so both sides agree.
    const float v = __fadd_rn(offset, __fmul_rn(scale, normal(seed, stream, i)));
    if constexpr (sizeof(T) == 2) {
      out[i] = __float2bfloat16_rn(v);
    } else {
      out[i] = v;
    }
  }
}

}  // namespace

void fill_device(const TensorView& t, uint64_t seed, uint64_t stream, float scale, float offset,
                 Stream cuda_stream) {
  MODMOE_CHECK(t.device.is_cuda() && t.is_contiguous(), "fill_device: expected a contiguous CUDA tensor");
  const int64_t n = t.numel();
  if (n == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  if (t.dtype == DType::BF16) {
    fill_kernel<<<blocks, threads, 0, cuda_stream>>>(t.ptr<__nv_bfloat16>(), n, seed, stream, scale, offset);
  } else if (t.dtype == DType::F32) {
    fill_kernel<<<blocks, threads, 0, cuda_stream>>>(t.ptr<float>(), n, seed, stream, scale, offset);
  } else {
    MODMOE_FAIL("fill_device: dtype ", dtype_name(t.dtype), ": expected bf16 or f32");
  }
  MODMOE_LAUNCH_CHECK(cuda_stream);
}

}  // namespace modmoe::synth
