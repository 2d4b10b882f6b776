// An owning device tensor (cudaMalloc) with a TensorView of itself, for the `modmoe` command,
// the benchmarks and the tests. The library's hot path never allocates.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "core/host_tensor.h"
#include "cuda/device/cuda_check.h"

namespace modmoe {

class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(DType dtype, const std::vector<int64_t>& shape, int device_index = 0) {
    reset(dtype, shape, device_index);
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  DeviceTensor(DeviceTensor&& o) noexcept : view_(o.view_) { o.view_ = {}; }
  DeviceTensor& operator=(DeviceTensor&& o) noexcept {
    if (this != &o) {
      release();
      view_ = o.view_;
      o.view_ = {};
    }
    return *this;
  }
  ~DeviceTensor() { release(); }

  void reset(DType dtype, const std::vector<int64_t>& shape, int device_index = 0) {
    release();
    view_ = make_view(nullptr, dtype, shape.data(), static_cast<int>(shape.size()),
                      Device::cuda(device_index));
    if (view_.nbytes() == 0) return;
    // On device_index, whatever the current device is (a rank process sees every GPU).
    int current = 0;
    MODMOE_CUDA_CHECK(cudaGetDevice(&current));
    if (current != device_index) MODMOE_CUDA_CHECK(cudaSetDevice(device_index));
    const cudaError_t err = cudaMalloc(&view_.data, view_.nbytes());
    if (current != device_index) MODMOE_CUDA_CHECK(cudaSetDevice(current));
    MODMOE_CUDA_CHECK(err);
  }
  // A device copy of a host tensor.
  static DeviceTensor from_host(const HostTensor& h, int device_index = 0) {
    const TensorView& v = h.view();
    DeviceTensor d(v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim),
                   device_index);
    if (v.nbytes()) MODMOE_CUDA_CHECK(cudaMemcpy(d.view_.data, v.data, v.nbytes(), cudaMemcpyHostToDevice));
    return d;
  }
  HostTensor to_host() const {
    HostTensor h(view_.dtype, std::vector<int64_t>(view_.shape.begin(), view_.shape.begin() + view_.ndim));
    if (view_.nbytes()) MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, view_.data, view_.nbytes(), cudaMemcpyDeviceToHost));
    return h;
  }
  // Fills every byte with `byte` (0xFF makes bf16/fp32 NaN: the poison before each run).
  void fill_bytes(int byte, cudaStream_t stream = nullptr) {
    if (view_.nbytes()) MODMOE_CUDA_CHECK(cudaMemsetAsync(view_.data, byte, view_.nbytes(), stream));
  }

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }  // NOLINT
  template <class T>
  T* data() const {
    return static_cast<T*>(view_.data);
  }

 private:
  void release() {
    if (view_.data) cudaFree(view_.data);
    view_.data = nullptr;
  }
  TensorView view_;
};

}  // namespace modmoe
