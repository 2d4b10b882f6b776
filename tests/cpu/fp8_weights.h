// FP8 test weights: float weights whose 128x128 blocks differ in magnitude, quantized to e4m3
// with one scale per 128x128 block (Fp8Block128) or per expert (Fp8PerTensor), the way a
// DeepSeek-V3 / vLLM checkpoint stores them. Shared by the FP8 experts tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/fp8.h"
#include "core/host_tensor.h"
#include "modmoe/quant.h"

namespace modmoe::test {

// w: [E, R, C] float. q: [E, R, C] e4m3; s: Fp8Block128 [E, R/128, C/128], Fp8PerTensor [E]
// fp32 dequantization scales (w ~ float(q) * s), s = max(amax, 1e-10) / 448 per block.
inline void quantize_weights(const std::vector<float>& w, int64_t E, int64_t R, int64_t C,
                             QuantScheme scheme, HostTensor& q, HostTensor& s) {
  constexpr int64_t kB = kFp8BlockSize;
  q.reset(DType::E4M3, {E, R, C});
  const bool block = scheme == QuantScheme::Fp8Block128;
  if (block) {
    s.reset(DType::F32, {E, R / kB, C / kB});
  } else {
    s.reset(DType::F32, {E});
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t nrb = block ? R / kB : 1, ncb = block ? C / kB : 1;
    const int64_t rb_rows = block ? kB : R, cb_cols = block ? kB : C;
    for (int64_t rb = 0; rb < nrb; ++rb) {
      for (int64_t cb = 0; cb < ncb; ++cb) {
        float amax = 0.0f;
        for (int64_t r = rb * rb_rows; r < (rb + 1) * rb_rows; ++r) {
          for (int64_t c = cb * cb_cols; c < (cb + 1) * cb_cols; ++c) {
            amax = std::max(amax, std::fabs(w[(e * R + r) * C + c]));
          }
        }
        const float sc = fp8::e4m3_scale_from_amax(amax);
        s.data<float>()[block ? (e * nrb + rb) * ncb + cb : e] = sc;
        for (int64_t r = rb * rb_rows; r < (rb + 1) * rb_rows; ++r) {
          for (int64_t c = cb * cb_cols; c < (cb + 1) * cb_cols; ++c) {
            q.data<uint8_t>()[(e * R + r) * C + c] = fp8::quantize_e4m3(w[(e * R + r) * C + c], sc);
          }
        }
      }
    }
  }
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
