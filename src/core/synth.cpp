#include "core/synth_fill.h"

#include "modmoe/error.h"

namespace modmoe::synth {

void fill_host(const TensorView& t, uint64_t seed, uint64_t stream, float scale, float offset) {
  MODMOE_CHECK(!t.device.is_cuda(), "fill_host: tensor is on ", t.device.to_string());
  MODMOE_CHECK(t.is_contiguous(), "fill_host: tensor of shape ", t.shape_string(),
               " is not contiguous");
  const int64_t n = t.numel();
  if (t.dtype == DType::BF16) {
    auto* p = t.ptr<uint16_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16_bits(offset + scale * normal(seed, stream, i));
  } else if (t.dtype == DType::F32) {
    auto* p = t.ptr<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = offset + scale * normal(seed, stream, i);
  } else {
    MODMOE_FAIL("fill_host: dtype ", dtype_name(t.dtype), ": expected bf16 or f32");
  }
}

}  // namespace modmoe::synth
