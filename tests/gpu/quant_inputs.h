// bf16 inputs of the GPU quantization tests (activations and weights alike), shared by
// test_gpu_quant and test_gpu_quant_ep.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "core/host_tensor.h"
#include "modmoe/quant.h"

namespace modmoe::test {

// bf16 activations: N(0, 1) times a per-group power of two in 2^-20 .. 2^20, never zero;
// with `edges`, some groups carry NaN, +-inf, only zeros, bf16 subnormals or bf16 maxima.
inline HostTensor make_x(const std::vector<int64_t>& shape, uint64_t salt, bool edges) {
  std::mt19937_64 rng(test::seed(salt));
  HostTensor x(DType::BF16, shape);
  test::fill_normal(x, rng, 1.0f);
  std::uniform_int_distribution<int> ex(-20, 20);
  auto* b = x.data<uint16_t>();
  constexpr int64_t kB = kFp8BlockSize;
  const int64_t groups = x.numel() / kB;
  for (int64_t g = 0; g < groups; ++g) {
    const float f = std::ldexp(1.0f, ex(rng));
    for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
      b[i] = float_to_bf16_bits(bf16_bits_to_float(b[i]) * f);
    }
    if (!edges) continue;
    uint16_t* grp = b + g * kB;
    switch (g % 11) {
      case 1: grp[g % kB] = 0x7fc0; break;                      // NaN
      case 3: grp[(g * 7) % kB] = (g % 2) ? 0xff80 : 0x7f80; break;  // -inf / +inf
      case 5:
        for (int64_t i = 0; i < kB; ++i) grp[i] = (i % 3) ? 0x0000 : 0x8000;  // +-0 only
        break;
      case 7:
        for (int64_t i = 0; i < kB; ++i)
          grp[i] = static_cast<uint16_t>((i % 2 ? 0x8000 : 0) | (1 + i % 127));
        break;  // bf16 subnormals: the amax floor decides
      case 9: grp[3] = 0x7f7f; grp[4] = 0xff7f; break;          // +-bf16 max
      default: break;
    }
  }
  return x;
}

}  // namespace modmoe::test
