// MODMOE_CUDA_CHECK for every CUDA runtime call, and MODMOE_LAUNCH_CHECK after every launch.
// Setting MODMOE_SYNC_LAUNCHES=1 in the environment synchronises after each launch, so an
// asynchronous fault is reported at the launch that caused it.
#pragma once

#include <cuda_runtime.h>

#include "modmoe/error.h"

namespace modmoe::cuda_detail {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
bool sync_after_launch();  // MODMOE_SYNC_LAUNCHES, read once

}  // namespace modmoe::cuda_detail

#define MODMOE_CUDA_CHECK(call)                                                        \
  do {                                                                                 \
    cudaError_t modmoe_err_ = (call);                                                  \
    if (modmoe_err_ != cudaSuccess) {                                                  \
      ::modmoe::cuda_detail::throw_cuda_error(modmoe_err_, #call, __FILE__, __LINE__); \
    }                                                                                  \
  } while (0)

#define MODMOE_LAUNCH_CHECK(stream)                                                    \
  do {                                                                                 \
    MODMOE_CUDA_CHECK(cudaGetLastError());                                             \
    if (::modmoe::cuda_detail::sync_after_launch()) {                                  \
      MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));                                \
    }                                                                                  \
  } while (0)
