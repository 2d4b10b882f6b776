#include "reference/quantize_weights.h"

#include "reference/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/fp8.h"
#include "modmoe/dtype.h"
#include "modmoe/error.h"
#include "reference/nvfp4.h"

namespace modmoe::reference {
namespace {

std::vector<int64_t> shape_of(const TensorView& t) {
  return std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim);
}

void check_host_3d(const TensorView& w, const char* what) {
  MODMOE_CHECK(!w.device.is_cuda() && w.is_contiguous() && w.ndim == 3, what, ": w has shape ",
               w.shape_string(), " on ", w.device.to_string(),
               ": expected a contiguous [E, R, C] host tensor");
}

}  // namespace

void quantize_fp8_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale) {
  check_host_3d(w, "quantize_fp8_weights");
  MODMOE_CHECK(w.dtype == DType::BF16 || w.dtype == DType::F32,
               "quantize_fp8_weights: w is ", dtype_name(w.dtype), ": expected bf16 or fp32");
  const bool block = scheme == QuantScheme::Fp8Block128;
  MODMOE_CHECK(block || scheme == QuantScheme::Fp8PerTensor, "quantize_fp8_weights: scheme ",
               quant_scheme_name(scheme), ": expected fp8-block or fp8-tensor");
  const int64_t E = w.size(0), R = w.size(1), C = w.size(2), kB = kFp8BlockSize;
  MODMOE_CHECK(!block || (R % kB == 0 && C % kB == 0), "quantize_fp8_weights: w has shape ",
               w.shape_string(), ": 128x128 blocks need R and C multiples of 128");
  MODMOE_CHECK(q.dtype == DType::E4M3 && q.numel() == w.numel() && scale.dtype == DType::F32 &&
                   scale.numel() == (block ? E * (R / kB) * (C / kB) : E),
               "quantize_fp8_weights: q ", q.shape_string(), " ", dtype_name(q.dtype),
               ", scale ", scale.shape_string(), " do not match w ", w.shape_string());
  if (w.dtype == DType::BF16) {  // the library's quantizer (modmoe::quantize_weights), same bits
    reference::quantize_weights(w, scheme, q, scale);
    return;
  }
  auto value = [&](int64_t i) {
    return w.dtype == DType::F32 ? w.ptr<const float>()[i]
                                 : bf16_bits_to_float(w.ptr<const uint16_t>()[i]);
  };
  const int64_t nrb = block ? R / kB : 1, ncb = block ? C / kB : 1;  // blocks per expert
  const int64_t rows = R / nrb, cols = C / ncb;                      // elements per block
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t rb = 0; rb < nrb; ++rb) {
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t first = (e * R + rb * rows) * C + cb * cols;  // block's first element
        float amax = 0.0f;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(value(first + r * C + c)));
        }
        const float s = fp8::e4m3_scale_from_amax(amax);
        scale.ptr<float>()[(e * nrb + rb) * ncb + cb] = s;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t i = first + r * C + c;
            q.ptr<uint8_t>()[i] = fp8::quantize_e4m3(value(i), s);
          }
        }
      }
    }
  }
}

void quantize_nvfp4_weights(const TensorView& w, const TensorView& q, const TensorView& scale,
                            const TensorView& global) {
  check_host_3d(w, "quantize_nvfp4_weights");
  const int64_t E = w.size(0), R = w.size(1), C = w.size(2);
  MODMOE_CHECK(w.dtype == DType::BF16 && C % 32 == 0 && q.dtype == DType::E2M1x2 &&
                   q.numel() == E * R * C / 2 && scale.dtype == DType::E4M3 &&
                   scale.numel() == E * R * C / kNvfp4BlockSize && global.dtype == DType::F32 &&
                   global.numel() == E,
               "quantize_nvfp4_weights: w ", w.shape_string(), " ", dtype_name(w.dtype), ", q ",
               q.shape_string(), ", scale ", scale.shape_string(), ", global ",
               global.shape_string(), ": expected bf16 [E, R, C] with C % 32 == 0, E2M1x2 "
               "[E, R, C/2], E4M3 [E, R, C/16] and fp32 [E]");
  HostTensor g(DType::F32, {1});
  for (int64_t e = 0; e < E; ++e) {
    reference::quantize_nvfp4(w.select0(e), q.select0(e), scale.select0(e), g, {});
    global.ptr<float>()[e] = g.data<float>()[0];
  }
}

ExpertWeights quantize_expert_weights(const ExpertWeights& src, QuantScheme scheme,
                                      std::vector<HostTensor>& keep) {
  MODMOE_CHECK(src.scheme == QuantScheme::None && src.layout == WeightLayout::Canonical,
               "quantize_expert_weights: expected canonical bf16 weights, got scheme ",
               quant_scheme_name(src.scheme));
  const bool fp4 = scheme == QuantScheme::Nvfp4;
  const bool block = scheme == QuantScheme::Fp8Block128;
  MODMOE_CHECK(fp4 || block || scheme == QuantScheme::Fp8PerTensor,
               "quantize_expert_weights: scheme ", quant_scheme_name(scheme),
               ": expected fp8-block, fp8-tensor or nvfp4");
  auto add = [&keep](DType dtype, const std::vector<int64_t>& shape) -> TensorView {
    keep.emplace_back(dtype, shape);
    return keep.back();
  };
  // [E, R, C] master -> q [E, R, C] e4m3 (or [E, R, C/2] E2M1x2) and its scales.
  auto one = [&](const TensorView& w, TensorView& q, TensorView& s, TensorView& g) {
    const int64_t E = w.size(0), R = w.size(1), C = w.size(2);
    if (fp4) {
      q = add(DType::E2M1x2, {E, R, C / 2});
      s = add(DType::E4M3, {E, R, C / kNvfp4BlockSize});
      g = add(DType::F32, {E});
      quantize_nvfp4_weights(w, q, s, g);
      return;
    }
    q = add(DType::E4M3, shape_of(w));
    s = block ? add(DType::F32, {E, R / kFp8BlockSize, C / kFp8BlockSize}) : add(DType::F32, {E});
    quantize_fp8_weights(w, scheme, q, s);
  };
  ExpertWeights dst = src;
  dst.scheme = scheme;
  one(src.w13, dst.w13, dst.w13_scale, dst.w13_global_scale);
  one(src.w2, dst.w2, dst.w2_scale, dst.w2_global_scale);
  for (TensorView* b : {&dst.w13_bias, &dst.w2_bias}) {
    if (!b->defined()) continue;
    const TensorView from = *b;
    *b = add(from.dtype, shape_of(from));
    std::memcpy(b->data, from.data, from.nbytes());
  }
  return dst;
}

}  // namespace modmoe::reference
