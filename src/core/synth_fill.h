// Filling tensors with the synthetic data of synth.h, on the host or (CUDA builds) the device.
// Element i of a tensor gets offset + scale * normal(seed, stream, i), rounded to its dtype.
#pragma once

#include "core/synth.h"
#include "modmoe/tensor.h"

namespace modmoe::synth {

void fill_host(const TensorView& t, uint64_t seed, uint64_t stream, float scale, float offset = 0.0f);
#ifdef MODMOE_WITH_CUDA
void fill_device(const TensorView& t, uint64_t seed, uint64_t stream, float scale,
                 float offset = 0.0f, Stream cuda_stream = nullptr);
#endif
// Either of the two, by the tensor's device.
inline void fill(const TensorView& t, uint64_t seed, uint64_t stream, float scale, float offset = 0.0f) {
#ifdef MODMOE_WITH_CUDA
  if (t.device.is_cuda()) {
    fill_device(t, seed, stream, scale, offset);
    return;
  }
#endif
  fill_host(t, seed, stream, scale, offset);
}

}  // namespace modmoe::synth
