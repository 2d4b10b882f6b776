// Host helpers shared by the kernel launchers: the per-device opt-in to more than 48 KB of
// dynamic shared memory, and a launch with programmatic dependent launch (PDL) on request.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/device/cuda_check.h"

namespace modmoe::cuda {

// One kernel's opt-in to `bytes` of dynamic shared memory, made once per device (bit d % 64 of
// a mask). Each launcher keeps one as a function-local static next to its kernel, so that every
// kernel has its own mask.
class DynamicSmemOptIn {
 public:
  // Opts the kernel in on the current device; returns that device.
  template <class Kernel>
  int ensure(Kernel kernel, size_t bytes) {
    int device = 0;
    MODMOE_CUDA_CHECK(cudaGetDevice(&device));
    const uint64_t bit = uint64_t{1} << (device % 64);
    if ((devices_.load(std::memory_order_acquire) & bit) != 0) return device;
    MODMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
    devices_.fetch_or(bit, std::memory_order_acq_rel);
    return device;
  }

 private:
  std::atomic<uint64_t> devices_{0};
};

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when
// `pdl` (the kernel then waits for the previous kernel of the stream itself); checked.
template <class... KArgs, class... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, unsigned block, size_t smem,
                   cudaStream_t stream, bool pdl, const Args&... args) {
  cudaLaunchConfig_t lc{};
  lc.gridDim = grid;
  lc.blockDim = dim3(block);
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  lc.attrs = attr;
  lc.numAttrs = pdl ? 1 : 0;
  MODMOE_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, args...));
  MODMOE_LAUNCH_CHECK(stream);
}

}  // namespace modmoe::cuda
