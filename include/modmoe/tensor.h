// A non-owning tensor view: pointer, dtype, shape, strides and device. modmoe never owns or
// allocates the caller's tensors; every entry point takes views. No CUDA needed to include.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "modmoe/dtype.h"

struct CUstream_st;  // the same type as cudaStream_t, without including CUDA headers

namespace modmoe {

// A CUDA stream (cudaStream_t converts to it implicitly); nullptr is the legacy default stream.
using Stream = CUstream_st*;

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;  // CUDA ordinal; 0 for CPU

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int idx = 0) { return {DeviceType::CUDA, idx}; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string to_string() const;
};

struct TensorView {
  static constexpr int kMaxDims = 5;

  void* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements, not bytes
  Device device{};

  // An undefined view marks an optional argument that is absent.
  bool defined() const { return ndim > 0; }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_bytes(dtype); }
  bool is_contiguous() const;
  std::string shape_string() const;  // "[4, 128, 2048]"

  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  // A view of index i along dimension 0, one dimension fewer.
  TensorView select0(int64_t i) const;
};

// A contiguous view of `data` with the given shape.
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device = Device::cpu());
TensorView make_view(void* data, DType dtype, const int64_t* shape, int ndim,
                     Device device = Device::cpu());

}  // namespace modmoe
