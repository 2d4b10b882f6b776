#include "core/check.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace modmoe::check {

std::optional<bool> env_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return std::nullopt;
  if (std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  MODMOE_FAIL("environment variable ", name, "='", v, "': expected 0 or 1 (or unset)");
}

std::string dtypes_string(std::initializer_list<DType> allowed) {
  std::ostringstream os;
  int i = 0;
  for (DType d : allowed) os << (i++ ? " or " : "") << dtype_name(d);
  return os.str();
}

void defined(const TensorView& t, const char* name) {
  MODMOE_CHECK(t.defined(), "argument '", name, "' is missing: expected a tensor");
}

void dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed) {
    if (t.dtype == d) return;
  }
  MODMOE_FAIL("argument '", name, "' has dtype ", dtype_name(t.dtype), ": expected ",
              dtypes_string(allowed));
}

void shape(const TensorView& t, const char* name, std::initializer_list<int64_t> expected) {
  std::ostringstream want;
  want << "[";
  int i = 0;
  for (int64_t e : expected) {
    want << (i ? ", " : "");
    if (e == kAny) {
      want << "*";
    } else {
      want << e;
    }
    ++i;
  }
  want << "]";
  bool ok = t.ndim == static_cast<int>(expected.size());
  i = 0;
  for (int64_t e : expected) {
    if (ok && e != kAny && t.shape[i] != e) ok = false;
    ++i;
  }
  MODMOE_CHECK(ok, "argument '", name, "' has shape ", t.shape_string(), ": expected ",
               want.str());
}

void contiguous(const TensorView& t, const char* name) {
  MODMOE_CHECK(t.is_contiguous(), "argument '", name, "' of shape ", t.shape_string(),
               " is not contiguous: expected a row-major dense tensor");
}

void rows_aligned16(const TensorView& t, const char* name) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  MODMOE_CHECK(addr % 16 == 0, "argument '", name, "' starts at address 0x", std::hex, addr,
               std::dec, ": expected a 16-byte aligned pointer");
  if (t.ndim >= 2) {
    const int64_t row_bytes = t.strides[t.ndim - 2] * static_cast<int64_t>(dtype_bytes(t.dtype));
    MODMOE_CHECK(row_bytes % 16 == 0, "argument '", name, "' has rows of ", row_bytes,
                 " bytes (shape ", t.shape_string(), ", dtype ", dtype_name(t.dtype),
                 "): expected a multiple of 16 bytes");
  }
}

void device(const TensorView& t, const char* name, const Device& expected) {
  MODMOE_CHECK(t.device == expected, "argument '", name, "' is on ", t.device.to_string(),
               ": expected ", expected.to_string(), " like the other tensors");
}

void dense(const TensorView& t, const char* name, const Device& dev) {
  defined(t, name);
  device(t, name, dev);
  contiguous(t, name);
  rows_aligned16(t, name);
}

void disjoint(const TensorView& a, const char* a_name, const TensorView& b, const char* b_name) {
  const auto* a0 = static_cast<const char*>(a.data);
  const auto* b0 = static_cast<const char*>(b.data);
  const bool apart = a0 + a.nbytes() <= b0 || b0 + b.nbytes() <= a0;
  MODMOE_CHECK(apart || a.nbytes() == 0 || b.nbytes() == 0, "argument '", a_name,
               "' overlaps '", b_name, "': expected separate memory");
}

void same_as(const TensorView& dst, const TensorView& src, const char* dst_name,
             const char* src_name, const Device& dev) {
  defined(dst, dst_name);
  MODMOE_CHECK(dst.dtype == src.dtype, "argument '", dst_name, "' has dtype ",
               dtype_name(dst.dtype), ": expected ", dtype_name(src.dtype), " like ", src_name);
  bool same_shape = dst.ndim == src.ndim;
  for (int d = 0; same_shape && d < src.ndim; ++d) same_shape = dst.shape[d] == src.shape[d];
  MODMOE_CHECK(same_shape, "argument '", dst_name, "' has shape ", dst.shape_string(),
               ": expected ", src.shape_string(), " like ", src_name);
  contiguous(dst, dst_name);
  device(dst, dst_name, dev);
  const auto* d0 = static_cast<const char*>(dst.data);
  const auto* s0 = static_cast<const char*>(src.data);
  const bool apart = d0 + dst.nbytes() <= s0 || s0 + src.nbytes() <= d0;
  MODMOE_CHECK(apart || src.nbytes() == 0, "argument '", dst_name, "' overlaps ", src_name,
               ": expected separate memory (prepare_weights does not work in place)");
}

}  // namespace modmoe::check
