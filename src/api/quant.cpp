// prepare_weights and FP8 quantization (include/modmoe/quant.h): checks the arguments (for
// prepare_weights: the canonical weights and the caller's destination views, then dst's
// descriptor), then runs the backend of the tensors' device. FP8 formulas: docs/fp8.md.
#include "modmoe/quant.h"

#include <cmath>
#include <string>

#include "api/api_util.h"
#include "api/nvfp4_check.h"
#include "api/quant_check.h"
#include "backend.h"
#include "core/check.h"
#include "reference/quant.h"
#ifdef MODMOE_WITH_CUDA
#include "cuda/quant/quant.h"
#endif

namespace modmoe {
namespace {

using api::is_fp8;

constexpr int64_t kBlock = kFp8BlockSize;

// A small fp32 tensor (scales) with an exact shape: contiguous, on `dev`, no row alignment.
void check_f32(const TensorView& t, const char* name, const Device& dev,
               std::initializer_list<int64_t> shape) {
  check::defined(t, name);
  check::dtype(t, name, {DType::F32});
  check::shape(t, name, shape);
  check::contiguous(t, name);
  check::device(t, name, dev);
}

void check_no_global_scales(const ExpertWeights& w, const char* prefix) {
  const std::string p = prefix;
  MODMOE_CHECK(!w.w13_global_scale.defined(), "argument '", p, "w13_global_scale' of shape ",
               w.w13_global_scale.shape_string(),
               " is given: expected it undefined with an FP8 scheme (global scales are NVFP4's)");
  MODMOE_CHECK(!w.w2_global_scale.defined(), "argument '", p, "w2_global_scale' of shape ",
               w.w2_global_scale.shape_string(),
               " is given: expected it undefined with an FP8 scheme (global scales are NVFP4's)");
}

// H and I of FP8 weights: multiples of the 128 scale block.
// src.w13: defined, `dtype`, [E_local, 2I, H] (gated) or [E_local, I, H], dense on `dev`, with
// E_local, H and I from src.w2. Returns its rows (2I or I).
int64_t check_w13(const ExpertWeights& src, DType dtype, int64_t num_local, int64_t H, int64_t I,
                  const Device& dev) {
  check::defined(src.w13, "src.w13");
  check::dtype(src.w13, "src.w13", {dtype});
  const bool shape_ok = src.w13.ndim == 3 && src.w13.size(0) == num_local &&
                        (src.w13.size(1) == 2 * I || src.w13.size(1) == I) &&
                        src.w13.size(2) == H;
  MODMOE_CHECK(shape_ok, "argument 'src.w13' has shape ", src.w13.shape_string(),
               ": expected [E_local, 2I, H] = [", num_local, ", ", 2 * I, ", ", H,
               "] (gated) or [E_local, I, H] = [", num_local, ", ", I, ", ", H,
               "] (non-gated), with E_local, H and I from src.w2");
  check::dense(src.w13, "src.w13", dev);
  return src.w13.size(1);
}

void check_fp8_dims(int64_t H, int64_t I, const char* w2_name) {
  MODMOE_CHECK(H > 0 && H % kBlock == 0, "argument 'hidden' = ", H, " (", w2_name,
               ".size(1)): expected a positive multiple of 128 with an FP8 scheme (the scale "
               "block and the GEMM K block)");
  MODMOE_CHECK(I > 0 && I % kBlock == 0, "argument 'intermediate' = ", I, " (", w2_name,
               ".size(2)): expected a positive multiple of 128 with an FP8 scheme (the scale "
               "block, and the 1x128 groups of the re-quantized intermediate)");
}

// G of the GateUpInterleaved layout of FP8 weights: 8 | G (the GEMM1 kernels) and G | 128 (a
// 128-row scale block holds whole groups, docs/fp8.md "Weights").
void check_fp8_interleave(int g, const char* name) {
  MODMOE_CHECK(g > 0 && g % 8 == 0 && kBlock % g == 0, "argument '", name, "' = ", g,
               ": expected 8, 16, 32, 64 or 128 with FP8 weights (a multiple of 8 that divides "
               "the 128-row scale block)");
}

// The weight scales of `scheme`: Fp8PerTensor [E_local]; Fp8Block128 [E_local, rows/128, H/128]
// and [E_local, H/128, I/128].
void check_weight_scales(const ExpertWeights& w, QuantScheme scheme, int64_t num_local,
                         int64_t rows, int64_t H, int64_t I, const Device& dev,
                         const char* prefix) {
  const std::string s13 = std::string(prefix) + "w13_scale";
  const std::string s2 = std::string(prefix) + "w2_scale";
  if (scheme == QuantScheme::Fp8PerTensor) {
    check_f32(w.w13_scale, s13.c_str(), dev, {num_local});
    check_f32(w.w2_scale, s2.c_str(), dev, {num_local});
  } else {
    check_f32(w.w13_scale, s13.c_str(), dev, {num_local, rows / kBlock, H / kBlock});
    check_f32(w.w2_scale, s2.c_str(), dev, {num_local, H / kBlock, I / kBlock});
  }
}

void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options, Stream stream) {
  const Device dev = src.w2.device;
  MODMOE_CHECK(src.layout == WeightLayout::Canonical, "argument 'src.layout' = ",
               static_cast<int>(src.layout),
               ": expected Canonical (prepare_weights reads the checkpoint layout)");
  MODMOE_CHECK(src.order == GateUpOrder::GateUp || src.order == GateUpOrder::UpGate,
               "argument 'src.order' = ", static_cast<int>(src.order),
               ": expected GateUp or UpGate");
  check::dtype(src.w2, "src.w2", {DType::E4M3});
  MODMOE_CHECK(src.w2.ndim == 3, "argument 'src.w2' has shape ", src.w2.shape_string(),
               ": expected [E_local, H, I]");
  check::dense(src.w2, "src.w2", dev);
  const int64_t num_local = src.w2.size(0), H = src.w2.size(1), I = src.w2.size(2);
  MODMOE_CHECK(num_local >= 1, "argument 'src.w2' has shape ", src.w2.shape_string(),
               ": expected at least one expert");
  check_fp8_dims(H, I, "src.w2");
  const int64_t rows = check_w13(src, DType::E4M3, num_local, H, I, dev);
  const bool gated = rows == 2 * I;
  if (src.w13_bias.defined()) check_f32(src.w13_bias, "src.w13_bias", dev, {num_local, rows});
  if (src.w2_bias.defined()) check_f32(src.w2_bias, "src.w2_bias", dev, {num_local, H});
  check_weight_scales(src, src.scheme, num_local, rows, H, I, dev, "src.");
  check_no_global_scales(src, "src.");

  MODMOE_CHECK(options.layout == WeightLayout::Canonical ||
                   options.layout == WeightLayout::GateUpInterleaved,
               "argument 'options.layout' = ", static_cast<int>(options.layout),
               ": expected Canonical or GateUpInterleaved");
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && gated;
  if (interleave) check_fp8_interleave(options.interleave_rows, "options.interleave_rows");

  check::same_as(dst.w13, src.w13, "dst.w13", "src.w13", dev);
  check::same_as(dst.w2, src.w2, "dst.w2", "src.w2", dev);
  check::same_as(dst.w13_scale, src.w13_scale, "dst.w13_scale", "src.w13_scale", dev);
  check::same_as(dst.w2_scale, src.w2_scale, "dst.w2_scale", "src.w2_scale", dev);
  if (src.w13_bias.defined()) {
    check::same_as(dst.w13_bias, src.w13_bias, "dst.w13_bias", "src.w13_bias", dev);
  }
  if (src.w2_bias.defined()) {
    check::same_as(dst.w2_bias, src.w2_bias, "dst.w2_bias", "src.w2_bias", dev);
  }

  dst.scheme = src.scheme;
  dst.layout = interleave ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  dst.order = src.order;
  dst.interleave_rows = interleave ? options.interleave_rows : 0;
  if (!src.w13_bias.defined()) dst.w13_bias = {};
  if (!src.w2_bias.defined()) dst.w2_bias = {};
  dst.w13_global_scale = {};
  dst.w2_global_scale = {};

  if (!dev.is_cuda()) {
    reference::prepare_weights_fp8(src, dst, options);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::prepare_weights_fp8(src, dst, options, stream);
#else
  (void)stream;
  api::no_cuda_backend("prepare_weights", dev);
#endif
}

// The scheme argument of the activation functions: an FP8 scheme.
void check_activation_scheme(QuantScheme scheme, const char* function) {
  if (scheme == QuantScheme::Nvfp4 || scheme == QuantScheme::Mxfp8) {
    MODMOE_NOT_SUPPORTED(function, " with quant scheme ", quant_scheme_name(scheme),
                         ": only fp8-tensor and fp8-block are implemented");
  }
  MODMOE_CHECK(is_fp8(scheme), function, ": argument 'scheme' = ",
               quant_scheme_name(scheme), ": expected Fp8PerTensor (fp8-tensor) or Fp8Block128 ",
               "(fp8-block)");
}

// An activation tensor [T, H] or [E_local, max_m, H] of `dtypes`, dense, H % 128 == 0.
void check_activation(const TensorView& t, const char* name, std::initializer_list<DType> dtypes,
                      const Device& dev) {
  check::defined(t, name);
  check::dtype(t, name, dtypes);
  MODMOE_CHECK(t.ndim == 2 || t.ndim == 3, "argument '", name, "' has shape ", t.shape_string(),
               ": expected [T, H] or [E_local, max_m, H]");
  check::dense(t, name, dev);
  const int64_t H = t.size(-1);
  MODMOE_CHECK(H > 0 && H % kBlock == 0, "argument '", name, "' has shape ", t.shape_string(),
               ": expected H (its last dimension) a positive multiple of 128 (the FP8 scale ",
               "block)");
}

// `other` has the shape of `ref` (dtypes may differ).
void check_same_shape(const TensorView& other, const char* other_name, const TensorView& ref,
                      const char* ref_name) {
  bool same = other.ndim == ref.ndim;
  for (int d = 0; same && d < ref.ndim; ++d) same = other.shape[d] == ref.shape[d];
  MODMOE_CHECK(same, "argument '", other_name, "' has shape ", other.shape_string(),
               ": expected ", ref.shape_string(), " like ", ref_name);
}

// The activation scales of `scheme` for activations `act` (named `act_name`): Fp8Block128 one
// per 1x128 group; Fp8PerTensor [1], or one per row of act (act's shape without H: [T] or
// [E_local, max_m]), the per-token form of rows that came from ranks with their own scales.
void check_activation_scale(const TensorView& scale, const char* name, QuantScheme scheme,
                            const TensorView& act, const char* act_name, const Device& dev) {
  check::defined(scale, name);
  check::dtype(scale, name, {DType::F32});
  check::contiguous(scale, name);
  check::device(scale, name, dev);
  if (scheme == QuantScheme::Fp8PerTensor) {
    bool ok = scale.ndim == 1 && scale.size(0) == 1;
    if (!ok && scale.ndim == act.ndim - 1) {
      ok = true;
      for (int d = 0; ok && d < scale.ndim; ++d) ok = scale.shape[d] == act.shape[d];
    }
    MODMOE_CHECK(ok, "argument '", name, "' has shape ", scale.shape_string(),
                 ": expected [1] or one scale per row of ", act_name, " (shape ",
                 act.shape_string(), ")");
    return;
  }
  bool ok = scale.ndim == act.ndim && scale.size(-1) == act.size(-1) / kBlock;
  for (int d = 0; ok && d + 1 < act.ndim; ++d) ok = scale.shape[d] == act.shape[d];
  MODMOE_CHECK(ok, "argument '", name, "' has shape ", scale.shape_string(),
               ": expected one fp32 scale per 1x128 group, ",
               act.ndim == 2 ? "[T, H/128] = [" : "[E_local, max_m, H/128] = [",
               act.ndim == 2 ? "" : std::to_string(act.size(0)) + ", ", act.size(-2), ", ",
               act.size(-1) / kBlock, "] (token-major)");
}

}  // namespace

void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options, Stream stream) {
  check::defined(src.w2, "src.w2");
  const Device dev = src.w2.device;
  if (is_fp8(src.scheme)) {
    prepare_weights_fp8(src, dst, options, stream);
    return;
  }
  if (src.scheme == QuantScheme::Nvfp4) {  // src/api/nvfp4.cpp
    api::prepare_weights_nvfp4(src, dst, options, stream);
    return;
  }
  if (src.scheme != QuantScheme::None) {
    MODMOE_NOT_SUPPORTED("quant scheme ", quant_scheme_name(src.scheme), " on ",
                         dev.to_string(), " in prepare_weights: only 'none' (bf16 weights) is ",
                         "implemented");
  }
  MODMOE_CHECK(src.layout == WeightLayout::Canonical, "argument 'src.layout' = ",
               static_cast<int>(src.layout),
               ": expected Canonical (prepare_weights reads the checkpoint layout)");
  MODMOE_CHECK(src.order == GateUpOrder::GateUp || src.order == GateUpOrder::UpGate,
               "argument 'src.order' = ", static_cast<int>(src.order),
               ": expected GateUp or UpGate");

  check::dtype(src.w2, "src.w2", {DType::BF16});
  MODMOE_CHECK(src.w2.ndim == 3, "argument 'src.w2' has shape ", src.w2.shape_string(),
               ": expected [E_local, H, I]");
  check::dense(src.w2, "src.w2", dev);
  const int64_t num_local = src.w2.size(0);
  const int64_t H = src.w2.size(1);
  const int64_t I = src.w2.size(2);
  MODMOE_CHECK(num_local >= 1, "argument 'src.w2' has shape ", src.w2.shape_string(),
               ": expected at least one expert");
  MODMOE_CHECK(H > 0 && H % 64 == 0, "argument 'hidden' = ", H,
               " (src.w2.size(1)): expected a multiple of 64 (the GEMM tile)");
  MODMOE_CHECK(I > 0 && I % 64 == 0, "argument 'intermediate' = ", I,
               " (src.w2.size(2)): expected a multiple of 64 (the GEMM tile)");

  const int64_t rows = check_w13(src, DType::BF16, num_local, H, I, dev);
  const bool gated = rows == 2 * I;

  if (src.w13_bias.defined()) {
    check::dtype(src.w13_bias, "src.w13_bias", {DType::F32});
    check::shape(src.w13_bias, "src.w13_bias", {num_local, rows});
    check::contiguous(src.w13_bias, "src.w13_bias");
    check::device(src.w13_bias, "src.w13_bias", dev);
  }
  if (src.w2_bias.defined()) {
    check::dtype(src.w2_bias, "src.w2_bias", {DType::F32});
    check::shape(src.w2_bias, "src.w2_bias", {num_local, H});
    check::contiguous(src.w2_bias, "src.w2_bias");
    check::device(src.w2_bias, "src.w2_bias", dev);
  }

  MODMOE_CHECK(options.layout == WeightLayout::Canonical ||
                   options.layout == WeightLayout::GateUpInterleaved,
               "argument 'options.layout' = ", static_cast<int>(options.layout),
               ": expected Canonical or GateUpInterleaved");
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && gated;
  if (interleave) {
    const int g = options.interleave_rows;
    MODMOE_CHECK(g > 0 && g % 8 == 0 && I % g == 0, "argument 'options.interleave_rows' = ", g,
                 ": expected a positive multiple of 8 that divides intermediate = ", I);
  }

  check::same_as(dst.w13, src.w13, "dst.w13", "src.w13", dev);
  check::same_as(dst.w2, src.w2, "dst.w2", "src.w2", dev);
  if (src.w13_bias.defined()) {
    check::same_as(dst.w13_bias, src.w13_bias, "dst.w13_bias", "src.w13_bias", dev);
  }
  if (src.w2_bias.defined()) {
    check::same_as(dst.w2_bias, src.w2_bias, "dst.w2_bias", "src.w2_bias", dev);
  }

  // dst's descriptor: the views stay the caller's, the rest follows the preparation.
  dst.scheme = QuantScheme::None;
  dst.layout = interleave ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  dst.order = src.order;
  dst.interleave_rows = interleave ? options.interleave_rows : 0;
  if (!src.w13_bias.defined()) dst.w13_bias = {};
  if (!src.w2_bias.defined()) dst.w2_bias = {};
  dst.w13_scale = {};
  dst.w2_scale = {};
  dst.w13_global_scale = {};
  dst.w2_global_scale = {};

  if (!dev.is_cuda()) {
    reference::prepare_weights(src, dst, options, stream);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::prepare_weights(src, dst, options, stream);
#else
  api::no_cuda_backend("prepare_weights", dev);
#endif
}

int64_t w13_scale_row_block(const ExpertWeights& w, int64_t row) {
  check::defined(w.w13, "weights.w13");
  MODMOE_CHECK(w.w13.ndim == 3 && row >= 0 && row < w.w13.size(1), "argument 'row' = ", row,
               ": expected a row of weights.w13 (shape ", w.w13.shape_string(), ")");
  if (w.layout != WeightLayout::GateUpInterleaved) return row / kBlock;
  const int64_t g = w.interleave_rows;
  check_fp8_interleave(w.interleave_rows, "weights.interleave_rows");
  // Rows [256j, 256j + 256) hold gate block j and up block j; block row 2j + (row is up).
  return 2 * (row / (2 * kBlock)) + (row / g) % 2;
}

void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options,
                          Stream stream) {
  check_activation_scheme(scheme, "quantize_activations");
  check::defined(x, "x");
  const Device dev = x.device;
  check_activation(x, "x", {DType::BF16}, dev);
  check_activation(q, "q", {DType::E4M3}, dev);
  check_same_shape(q, "q", x, "x");
  check_activation_scale(scale, "scale", scheme, x, "x", dev);
  MODMOE_CHECK(!options.static_scale || scheme == QuantScheme::Fp8PerTensor,
               "argument 'options.static_scale' = true with quant scheme ",
               quant_scheme_name(scheme),
               ": expected false (static scales are for Fp8PerTensor; 1x128 group scales are "
               "always computed)");
  MODMOE_CHECK(!options.static_scale || scale.numel() == 1, "argument 'scale' has shape ",
               scale.shape_string(), " with options.static_scale: expected [1] (a static scale ",
               "is one calibrated value; one scale per row is written by dynamic quantization)");
  check::disjoint(q, "q", x, "x");
  check::disjoint(scale, "scale", x, "x");
  check::disjoint(scale, "scale", q, "q");
  if (!dev.is_cuda()) {
    if (options.static_scale) {
      const float s = scale.ptr<const float>()[0];
      MODMOE_CHECK(std::isfinite(s) && s > 0.0f, "argument 'scale'[0] = ", s,
                   " with options.static_scale: expected a finite positive scale");
    }
    reference::quantize_activations(x, scheme, q, scale, options);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::quantize_activations(x, scheme, q, scale, options, stream);
#else
  (void)stream;
  api::no_cuda_backend("quantize_activations", dev);
#endif
}

void dequantize_activations(const TensorView& q, QuantScheme scheme, const TensorView& scale,
                            const TensorView& out, Stream stream) {
  check_activation_scheme(scheme, "dequantize_activations");
  check::defined(q, "q");
  const Device dev = q.device;
  check_activation(q, "q", {DType::E4M3}, dev);
  check_activation_scale(scale, "scale", scheme, q, "q", dev);
  check_activation(out, "out", {DType::F32, DType::BF16}, dev);
  check_same_shape(out, "out", q, "q");
  check::disjoint(out, "out", q, "q");
  check::disjoint(out, "out", scale, "scale");
  if (!dev.is_cuda()) {
    reference::dequantize_activations(q, scheme, scale, out);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::dequantize_activations(q, scheme, scale, out, stream);
#else
  (void)stream;
  api::no_cuda_backend("dequantize_activations", dev);
#endif
}

void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale, Stream stream) {
  check_activation_scheme(scheme, "quantize_weights");
  check::defined(w, "w");
  const Device dev = w.device;
  check::dtype(w, "w", {DType::BF16});
  MODMOE_CHECK(w.ndim == 3, "argument 'w' has shape ", w.shape_string(),
               ": expected [E, R, C] (w13 [E_local, 2I, H] or w2 [E_local, H, I])");
  check::dense(w, "w", dev);
  const int64_t E = w.size(0), R = w.size(1), C = w.size(2);
  MODMOE_CHECK(R > 0 && R % kBlock == 0 && C > 0 && C % kBlock == 0, "argument 'w' has shape ",
               w.shape_string(), ": expected R and C (its last two dimensions) positive ",
               "multiples of 128 with an FP8 scheme (the 128x128 scale block; H and I of FP8 "
               "experts are multiples of 128)");
  check::defined(q, "q");
  check::dtype(q, "q", {DType::E4M3});
  check_same_shape(q, "q", w, "w");
  check::dense(q, "q", dev);
  if (scheme == QuantScheme::Fp8PerTensor) {
    check_f32(scale, "scale", dev, {E});
  } else {
    check_f32(scale, "scale", dev, {E, R / kBlock, C / kBlock});
  }
  check::disjoint(q, "q", w, "w");
  check::disjoint(scale, "scale", w, "w");
  check::disjoint(scale, "scale", q, "q");
  if (!dev.is_cuda()) {
    reference::quantize_weights(w, scheme, q, scale);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::quantize_weights(w, scheme, q, scale, stream);
#else
  (void)stream;
  api::no_cuda_backend("quantize_weights", dev);
#endif
}

namespace api {

// NOTE: the checks that FP8 shares with bf16 (routing tensors, outputs, LoRA, activation
// parameters, modes) run through make_experts_desc on a bf16 "shadow" of the call: the same
// views with bf16 dtypes and no scales. Only metadata is read, and E4M3 rows of H (or I) bytes
// are 16-byte aligned exactly when the shadow's bf16 rows are (H, I multiples of 128).
ExpertsDesc check_fp8_experts(const ExpertsInputs& in, const ExpertWeights& weights,
                              const ExpertMap& map, const ExpertsOptions& options,
                              const ExpertsOutputs& out) {
  map.validate();
  check::defined(in.hidden, "hidden");
  const Device dev = in.hidden.device;
  const QuantScheme scheme = weights.scheme;
  MODMOE_CHECK(is_fp8(scheme), "argument 'weights.scheme' = ", quant_scheme_name(scheme),
               ": expected Fp8PerTensor or Fp8Block128 (the FP8 experts)");
  MODMOE_CHECK(in.hidden.dtype == DType::E4M3, "argument 'hidden' has dtype ",
               dtype_name(in.hidden.dtype), " with FP8 weights (quant scheme ",
               quant_scheme_name(scheme), "): expected e4m3 plus its 'hidden_scale' (",
               "quantize_activations makes both; fused_moe quantizes bf16 hidden states itself)");
  check::defined(weights.w2, "weights.w2");
  check::dtype(weights.w2, "weights.w2", {DType::E4M3});
  MODMOE_CHECK(weights.w2.ndim == 3, "argument 'weights.w2' has shape ",
               weights.w2.shape_string(), ": expected [E_local, H, I]");
  check::defined(weights.w13, "weights.w13");
  check::dtype(weights.w13, "weights.w13", {DType::E4M3});
  const int64_t num_local = weights.w2.size(0), H = weights.w2.size(1), I = weights.w2.size(2);
  check_fp8_dims(H, I, "weights.w2");
  if (weights.layout == WeightLayout::GateUpInterleaved) {
    check_fp8_interleave(weights.interleave_rows, "weights.interleave_rows");
  }
  check_no_global_scales(weights, "weights.");
  const bool gated = is_gated(options.activation.kind);
  check_weight_scales(weights, scheme, num_local, gated ? 2 * I : I, H, I, dev, "weights.");

  // hidden_scale: Fp8Block128 one per 1x128 group; Fp8PerTensor [1], or one per row (rows
  // that came from several ranks, each quantized with its own dynamic scale).
  check_activation_scale(in.hidden_scale, "hidden_scale", scheme, in.hidden, "hidden", dev);

  ExpertsInputs shadow_in = in;
  shadow_in.hidden.dtype = DType::BF16;
  shadow_in.hidden_scale = {};
  ExpertWeights shadow_w = weights;
  shadow_w.scheme = QuantScheme::None;
  shadow_w.w13.dtype = DType::BF16;
  shadow_w.w2.dtype = DType::BF16;
  shadow_w.w13_scale = {};
  shadow_w.w2_scale = {};
  ExpertsOptions shadow_options = options;
  shadow_options.fp8_fast_accum = false;  // a bf16 shadow has no FP8 mode; checked below
  ExpertsDesc desc = make_experts_desc(shadow_in, shadow_w, map, shadow_options, out);
  desc.scheme = scheme;
  desc.fp8_fast_accum = options.fp8_fast_accum;
  desc.validate();
  return desc;
}

void check_fp8_experts_device(QuantScheme scheme, const ExpertWeights& weights,
                              const Activation activation, const Device& dev,
                              const char* function) {
  if (!dev.is_cuda() || !is_gated(activation)) return;
  const bool prepared =
      weights.layout == WeightLayout::GateUpInterleaved && weights.interleave_rows == 8;
  if (prepared) return;
  MODMOE_NOT_SUPPORTED("FP8 experts on the GPU: ", function, " with quant scheme ",
                       quant_scheme_name(scheme), " and tensors on ", dev.to_string(),
                       ": the FP8 grouped GEMM reads w13 in the layout of prepare_weights "
                       "(GateUpInterleaved with interleave_rows = 8); got ",
                       weights.layout == WeightLayout::GateUpInterleaved
                           ? "GateUpInterleaved with interleave_rows = " +
                                 std::to_string(weights.interleave_rows)
                           : std::string("the Canonical layout"),
                       ": call prepare_weights first");
}

}  // namespace api
}  // namespace modmoe
