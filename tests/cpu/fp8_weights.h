// FP8 test weights: float weights whose 128x128 blocks differ in magnitude, quantized to e4m3
// with one scale per 128x128 block (Fp8Block128) or per expert (Fp8PerTensor), the way a
// DeepSeek-V3 / vLLM checkpoint stores them. Shared by the FP8 experts tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/host_tensor.h"
#include "modmoe/quant.h"
#include "reference/quantize_weights.h"

namespace modmoe::test {

// w: [E, R, C] float. q: [E, R, C] e4m3; s: Fp8Block128 [E, R/128, C/128], Fp8PerTensor [E]
// fp32 dequantization scales (w ~ float(q) * s), s = max(amax, 1e-10) / 448 per block.
inline void quantize_weights(const std::vector<float>& w, int64_t E, int64_t R, int64_t C,
                             QuantScheme scheme, HostTensor& q, HostTensor& s) {
  constexpr int64_t kB = kFp8BlockSize;
  q.reset(DType::E4M3, {E, R, C});
  if (scheme == QuantScheme::Fp8Block128) {
    s.reset(DType::F32, {E, R / kB, C / kB});
  } else {
    s.reset(DType::F32, {E});
  }
  reference::quantize_fp8_weights(make_view(const_cast<float*>(w.data()), DType::F32, {E, R, C}),
                                  scheme, q, s);
}

// [E, R, C] float, N(0, std^2) (never zero) times a factor 2^j, j uniform in [-3, 3], per
// 128x128 block, so that a scale read from the wrong block shows. R, C multiples of 128.
inline std::vector<float> block_varied(std::mt19937_64& rng, int64_t E, int64_t R, int64_t C,
                                       float std) {
  constexpr int64_t kB = kFp8BlockSize;
  std::normal_distribution<float> nd(0.0f, std);
  std::uniform_int_distribution<int> ex(-3, 3);
  std::vector<float> f(static_cast<size_t>(E * (R / kB) * (C / kB)));
  for (float& v : f) v = std::ldexp(1.0f, ex(rng));
  std::vector<float> w(static_cast<size_t>(E * R * C));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const float g = f[(e * (R / kB) + r / kB) * (C / kB) + c / kB];
        float v = nd(rng);
        if (v == 0.0f) v = std * 1e-3f;
        w[(e * R + r) * C + c] = v * g;
      }
    }
  }
  return w;
}

}  // namespace modmoe::test
