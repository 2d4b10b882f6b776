#include "modmoe/tensor.h"

#include <sstream>

#include "modmoe/error.h"

namespace modmoe {

std::string Device::to_string() const {
  return type == DeviceType::CPU ? std::string("cpu") : "cuda:" + std::to_string(index);
}

int64_t TensorView::numel() const {
  if (ndim == 0) return 0;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::ostringstream os;
  os << "[";
  for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
  os << "]";
  return os.str();
}

TensorView TensorView::select0(int64_t i) const {
  MODMOE_CHECK(ndim >= 1 && i >= 0 && i < shape[0], "select0: index ", i,
               " out of range for a tensor of shape ", shape_string());
  TensorView v = *this;
  v.data = static_cast<char*>(data) + i * strides[0] * static_cast<int64_t>(dtype_bytes(dtype));
  v.ndim = ndim - 1;
  for (int d = 0; d + 1 < ndim; ++d) {
    v.shape[d] = shape[d + 1];
    v.strides[d] = strides[d + 1];
  }
  v.shape[ndim - 1] = 0;
  v.strides[ndim - 1] = 0;
  return v;
}

TensorView make_view(void* data, DType dtype, const int64_t* shape, int ndim, Device device) {
  MODMOE_CHECK(ndim >= 1 && ndim <= TensorView::kMaxDims, "make_view: ndim = ", ndim,
               ": expected 1 to ", TensorView::kMaxDims);
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = ndim;
  v.device = device;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    MODMOE_CHECK(shape[d] >= 0, "make_view: shape[", d, "] = ", shape[d], ": expected >= 0");
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device) {
  return make_view(data, dtype, shape.begin(), static_cast<int>(shape.size()), device);
}

}  // namespace modmoe
