// CPU reference of FP8 activation quantization, dequantization and FP8 weight preparation
// (docs/fp8.md). Arguments were validated by src/api/quant.cpp. Every formula goes through
// src/core/fp8.h, which the CUDA kernels share, so both produce the same bytes.
#include "reference/quant.h"

#include <cstring>

#include "core/fp8.h"
#include "modmoe/dtype.h"
#include "reference/experts_common.h"

namespace modmoe::reference {

namespace detail {

float quantize_group_128(const uint16_t* x, uint8_t* q) {
  // amax over |x| as integers: for sign-cleared floats the bit order is the value order, and
  // a NaN (bits above inf) wins, so a NaN anywhere in the group makes the scale NaN.
  uint16_t amax_bits = 0;
  for (int i = 0; i < fp8::kBlock; ++i) {
    const uint16_t a = static_cast<uint16_t>(x[i] & 0x7fffu);
    amax_bits = a > amax_bits ? a : amax_bits;
  }
  const float s = fp8::e4m3_scale_from_amax(bf16_bits_to_float(amax_bits));
  for (int i = 0; i < fp8::kBlock; ++i) q[i] = fp8::quantize_e4m3(bf16_bits_to_float(x[i]), s);
  return s;
}

}  // namespace detail

void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options) {
  const int64_t n = x.numel();
  const auto* xb = x.ptr<const uint16_t>();  // [rows, H] bf16
  auto* qb = q.ptr<uint8_t>();               // [rows, H] e4m3
  auto* sb = scale.ptr<float>();             // [1] or [rows, H/128] fp32
  if (scheme == QuantScheme::Fp8Block128) {
    for (int64_t g = 0; g < n / fp8::kBlock; ++g) {
      sb[g] = detail::quantize_group_128(xb + g * fp8::kBlock, qb + g * fp8::kBlock);
    }
    return;
  }
  // Fp8PerTensor.
  float s = sb[0];
  if (!options.static_scale) {
    uint16_t amax_bits = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t a = static_cast<uint16_t>(xb[i] & 0x7fffu);
      amax_bits = a > amax_bits ? a : amax_bits;
    }
    s = fp8::e4m3_scale_from_amax(bf16_bits_to_float(amax_bits));
    sb[0] = s;
  }
  for (int64_t i = 0; i < n; ++i) qb[i] = fp8::quantize_e4m3(bf16_bits_to_float(xb[i]), s);
}

void dequantize_activations(const TensorView& q, QuantScheme scheme, const TensorView& scale,
                            const TensorView& out) {
  const int64_t n = q.numel();
  const auto* qb = q.ptr<const uint8_t>();
  const auto* sb = scale.ptr<const float>();
  const bool block = scheme == QuantScheme::Fp8Block128;
  for (int64_t i = 0; i < n; ++i) {
    const float v = fp8::e4m3_to_float(qb[i]) * sb[block ? i / fp8::kBlock : 0];
    if (out.dtype == DType::BF16) {
      out.ptr<uint16_t>()[i] = float_to_bf16_bits(v);
    } else {
      out.ptr<float>()[i] = v;
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
