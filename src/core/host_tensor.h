// An owning, 64-byte aligned host tensor with a TensorView of itself. Used by the reference
// backend for its scratch, by the `modmoe` command and by the tests; never by the hot path.
#pragma once

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

#include "modmoe/error.h"
#include "modmoe/tensor.h"

namespace modmoe {

class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::initializer_list<int64_t> shape) { reset(dtype, shape); }
  HostTensor(DType dtype, const std::vector<int64_t>& shape) { reset(dtype, shape); }

  void reset(DType dtype, std::initializer_list<int64_t> shape) {
    reset(dtype, std::vector<int64_t>(shape));
  }
  void reset(DType dtype, const std::vector<int64_t>& shape) {
    view_ = make_view(nullptr, dtype, shape.data(), static_cast<int>(shape.size()));
    const size_t bytes = (view_.nbytes() + 63) / 64 * 64;
    storage_.reset(bytes ? static_cast<unsigned char*>(std::aligned_alloc(64, bytes)) : nullptr);
    MODMOE_CHECK(bytes == 0 || storage_ != nullptr, "out of host memory allocating ", bytes,
                 " bytes");
    view_.data = storage_.get();
    if (bytes) std::memset(storage_.get(), 0, bytes);
  }

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }  // NOLINT: views convert freely
  template <class T>
  T* data() const {
    return static_cast<T*>(view_.data);
  }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> storage_;
  TensorView view_;
};

}  // namespace modmoe
