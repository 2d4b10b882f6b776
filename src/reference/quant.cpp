// CPU reference of FP8 activation quantization, dequantization and FP8 weight preparation
// (docs/fp8.md). Arguments were validated by src/api/quant.cpp. Every formula goes through
// src/core/fp8.h, which the CUDA kernels share, so both produce the same bytes.
#include "reference/quant.h"

#include <algorithm>
#include <cstring>

#include "core/fp8.h"
#include "modmoe/dtype.h"
#include "reference/experts_common.h"

namespace modmoe::reference {

namespace {

// Largest |x| of n bf16 as sign-cleared bits: for such floats the bit order is the value order,
// and a NaN (bits above inf) wins, so a NaN anywhere makes the scale NaN.
uint16_t amax_bits(const uint16_t* x, int64_t n) {
  uint16_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t a = static_cast<uint16_t>(x[i] & 0x7fffu);
    m = a > m ? a : m;
  }
  return m;
}

void quantize_row(const uint16_t* x, uint8_t* q, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8::quantize_e4m3(bf16_bits_to_float(x[i]), s);
}

float scale_of(uint16_t amax) { return fp8::e4m3_scale_from_amax(bf16_bits_to_float(amax)); }

}  // namespace

namespace detail {

float quantize_group_128(const uint16_t* x, uint8_t* q) {
  const float s = scale_of(amax_bits(x, fp8::kBlock));
  quantize_row(x, q, fp8::kBlock, s);
  return s;
}

}  // namespace detail

void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options) {
  const int64_t n = x.numel();
  const auto* xb = x.ptr<const uint16_t>();  // [rows, H] bf16
  auto* qb = q.ptr<uint8_t>();               // [rows, H] e4m3
  auto* sb = scale.ptr<float>();             // [1], [rows] or [rows, H/128] fp32
  if (scheme == QuantScheme::Fp8Block128) {
    for (int64_t g = 0; g < n / fp8::kBlock; ++g) {
      sb[g] = detail::quantize_group_128(xb + g * fp8::kBlock, qb + g * fp8::kBlock);
    }
    return;
  }
  // Fp8PerTensor; a dynamic scale goes to every entry of `scale` ([1], or one per row).
  float s = 0.0f;
  if (options.static_scale) {
    s = sb[0];
  } else {  // NOTE: a per-row scale of no rows has no entry, not even sb[0]
    s = scale_of(amax_bits(xb, n));
    for (int64_t i = 0; i < scale.numel(); ++i) sb[i] = s;
  }
  quantize_row(xb, qb, n, s);
}

void dequantize_activations(const TensorView& q, QuantScheme /*scheme*/,
                            const TensorView& scale, const TensorView& out) {
  const int64_t n = q.numel();
  if (n == 0) return;
  const auto* qb = q.ptr<const uint8_t>();
  const auto* sb = scale.ptr<const float>();
  // Elements per scale: 128 (Fp8Block128), H (Fp8PerTensor, one per row) or n (one scale).
  const int64_t per = n / scale.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float v = fp8::e4m3_to_float(qb[i]) * sb[i / per];
    if (out.dtype == DType::BF16) {
      out.ptr<uint16_t>()[i] = float_to_bf16_bits(v);
    } else {
      out.ptr<float>()[i] = v;
    }
  }
}


void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale) {
  const int64_t E = w.size(0), R = w.size(1), C = w.size(2), B = fp8::kBlock;
  const auto* wb = w.ptr<const uint16_t>();  // [E, R, C] bf16
  auto* qb = q.ptr<uint8_t>();               // [E, R, C] e4m3
  auto* sb = scale.ptr<float>();             // [E] or [E, R/128, C/128] fp32
  for (int64_t e = 0; e < E; ++e) {
    const uint16_t* we = wb + e * R * C;
    uint8_t* qe = qb + e * R * C;
    if (scheme == QuantScheme::Fp8PerTensor) {
      sb[e] = scale_of(amax_bits(we, R * C));
      quantize_row(we, qe, R * C, sb[e]);
      continue;
    }
    for (int64_t rb = 0; rb < R / B; ++rb) {
      for (int64_t cb = 0; cb < C / B; ++cb) {
        const int64_t first = rb * B * C + cb * B;  // element [rb*128, cb*128] of the expert
        uint16_t m = 0;
        for (int64_t r = 0; r < B; ++r) m = std::max(m, amax_bits(we + first + r * C, B));
        const float s = scale_of(m);
        sb[(e * (R / B) + rb) * (C / B) + cb] = s;
        for (int64_t r = 0; r < B; ++r) quantize_row(we + first + r * C, qe + first + r * C, B, s);
      }
    }
  }
}

void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options) {
  const int64_t E = src.w13.size(0), rows = src.w13.size(1), H = src.w13.size(2);
  const int64_t I = src.w2.size(2);
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;
  detail::copy_view(dst.w2, src.w2);
  detail::copy_view(dst.w2_bias, src.w2_bias);
  detail::copy_view(dst.w2_scale, src.w2_scale);
  if (!interleave) {
    detail::copy_view(dst.w13, src.w13);
    detail::copy_view(dst.w13_bias, src.w13_bias);
    detail::copy_view(dst.w13_scale, src.w13_scale);
    return;
  }
  const int64_t G = options.interleave_rows;
  const bool up_first = src.order == GateUpOrder::UpGate;
  detail::gather_interleaved(src.w13.data, dst.w13.data, E, I, G, up_first, H);  // e4m3: 1 byte
  if (src.w13_bias.defined()) {
    detail::gather_interleaved(src.w13_bias.data, dst.w13_bias.data, E, I, G, up_first, 4);
  }
  if (src.scheme == QuantScheme::Fp8Block128) {
    // Block rows: gate block j, then up block j (G = 1 in units of 128-row blocks).
    detail::gather_interleaved(src.w13_scale.data, dst.w13_scale.data, E, I / fp8::kBlock, 1, up_first,
                       H / fp8::kBlock * 4);
  } else {
    detail::copy_view(dst.w13_scale, src.w13_scale);  // [E_local]: one scale per expert
  }
}

}  // namespace modmoe::reference
