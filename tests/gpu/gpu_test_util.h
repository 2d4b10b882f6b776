// Helpers shared by the single-GPU suites: a fixture that skips where no CUDA device is
// present (CPU-only CI builds these suites too), host <-> device copies, poisoning and the
// test data folder.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/host_tensor.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/device_tensor.h"

namespace modmoe::test {

// Every GPU test derives from this: no device, no test (GTEST_SKIP, not a failure).
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      (void)cudaGetLastError();  // clear the sticky "no device" error
      GTEST_SKIP() << "no CUDA device";
    }
    MODMOE_CUDA_CHECK(cudaSetDevice(0));
  }
};

template <class Param>
class GpuTestWithParam : public GpuTest, public ::testing::WithParamInterface<Param> {};

// The poison before each run: 0xFF bytes are NaN in bf16 and fp32 and -1 in integers.
inline void poison(const DeviceTensor& t) {
  if (t.view().nbytes() > 0) MODMOE_CUDA_CHECK(cudaMemset(t.view().data, 0xFF, t.view().nbytes()));
}

inline void sync() { MODMOE_CUDA_CHECK(cudaDeviceSynchronize()); }

// A device copy with the shape of `shape`, holding `values`.
template <class T>
DeviceTensor device_from(const std::vector<T>& values, DType dtype, std::vector<int64_t> shape) {
  HostTensor h(dtype, shape);
  if (!values.empty()) std::memcpy(h.view().data, values.data(), h.nbytes());
  return DeviceTensor::from_host(h);
}

// Sets an environment variable for the scope (the stage hooks are read at every call: see
// apply_overrides in src/cuda/experts.cu and use_block_permute in src/cuda/permute/permute.cu).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_, old_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

}  // namespace modmoe::test
