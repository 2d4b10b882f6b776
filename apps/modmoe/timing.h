// Median time of a callable: CUDA events on a GPU, the steady clock on the CPU.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include "modmoe/tensor.h"
#ifdef MODMOE_WITH_CUDA
#include "cuda/device/cuda_check.h"
#endif

namespace modmoe::app {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Milliseconds, the median of `reps` runs after `warmup` runs.
inline double time_ms(const Device& device, const std::function<void()>& fn, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
#ifdef MODMOE_WITH_CUDA
  if (device.is_cuda()) {
    cudaEvent_t a, b;
    MODMOE_CUDA_CHECK(cudaEventCreate(&a));
    MODMOE_CUDA_CHECK(cudaEventCreate(&b));
    for (int i = 0; i < reps; ++i) {
      MODMOE_CUDA_CHECK(cudaEventRecord(a));
      fn();
      MODMOE_CUDA_CHECK(cudaEventRecord(b));
      MODMOE_CUDA_CHECK(cudaEventSynchronize(b));
      float ms = 0;
      MODMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return median(t);
  }
#endif
  (void)device;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(t);
}

}  // namespace modmoe::app
