// NVFP4 entry points (include/modmoe/quant.h): quantize_nvfp4, dequantize_nvfp4, the Nvfp4
// branch of prepare_weights and the validation of a W4A16 experts call. Each checks every
// argument, then runs the backend of the tensors' device (the CPU reference, or the CUDA
// kernels of src/cuda/quant/nvfp4.cu, bit for bit the same). Formulas: docs/nvfp4.md and
// src/core/nvfp4.h.
#include <cmath>
#include <optional>
#include <string>

#include "api/api_util.h"
#include "api/nvfp4_check.h"
#include "core/check.h"
#include "reference/nvfp4.h"
#ifdef MODMOE_WITH_CUDA
#include "cuda/quant/quant.h"
#endif

namespace modmoe {
namespace {

constexpr int64_t kBlock = kNvfp4BlockSize;  // values per e4m3 scale
constexpr int64_t kKMultiple = 32;           // K/2 packed bytes = whole 16-byte vectors

std::string join(const char* prefix, const char* name) { return std::string(prefix) + name; }

// Defined, of `dtype`, exactly `shape`, contiguous and on `dev`; `expected` spells the shape
// symbolically for the message.
void check_exact(const TensorView& t, const std::string& name, DType dtype, const Device& dev,
                 std::initializer_list<int64_t> shape, const std::string& expected) {
  check::defined(t, name.c_str());
  check::dtype(t, name.c_str(), {dtype});
  bool ok = t.ndim == static_cast<int>(shape.size());
  int d = 0;
  std::string want = "[";
  for (int64_t s : shape) {
    if (ok && t.shape[d] != s) ok = false;
    want += (d ? ", " : "") + std::to_string(s);
    ++d;
  }
  want += "]";
  MODMOE_CHECK(ok, "argument '", name, "' has shape ", t.shape_string(), ": expected ", expected,
               " = ", want);
  check::contiguous(t, name.c_str());
  check::device(t, name.c_str(), dev);
}

// `t` has `ref`'s shape except its last dimension, which is `last`.
void check_like(const TensorView& t, const char* name, const TensorView& ref, int64_t last,
                const char* expected) {
  bool ok = t.ndim == ref.ndim && t.size(-1) == last;
  for (int d = 0; ok && d + 1 < ref.ndim; ++d) ok = t.shape[d] == ref.shape[d];
  std::string want = "[";
  for (int d = 0; d + 1 < ref.ndim; ++d) want += std::to_string(ref.shape[d]) + ", ";
  want += std::to_string(last) + "]";
  MODMOE_CHECK(ok, "argument '", name, "' has shape ", t.shape_string(), ": expected ", expected,
               " = ", want);
}

void check_k(int64_t k, const char* what, const std::string& origin) {
  MODMOE_CHECK(k > 0 && k % kKMultiple == 0, "argument '", what, "' = ", k, " (", origin,
               "): expected a positive multiple of 32 with NVFP4 (16-value scale blocks, and "
               "packed rows of K/2 bytes in whole 16-byte vectors)");
}

struct Dims {
  int64_t num_local = 0, hidden = 0, inter = 0, rows = 0;
};

// The NVFP4 tensors of `w` (argument names start with `prefix`: "src." or "weights.").
// gated: the activation's kind when known, else w13 may have 2I or I rows.
Dims check_nvfp4_weights(const ExpertWeights& w, const char* prefix, const Device& dev,
                         std::optional<bool> gated) {
  const std::string w2n = join(prefix, "w2"), w13n = join(prefix, "w13");
  check::defined(w.w2, w2n.c_str());
  check::dtype(w.w2, w2n.c_str(), {DType::E2M1x2});
  MODMOE_CHECK(w.w2.ndim == 3, "argument '", w2n, "' has shape ", w.w2.shape_string(),
               ": expected [E_local, H, I/2] (E2M1x2: two values per byte)");
  Dims d;
  d.num_local = w.w2.size(0);
  d.hidden = w.w2.size(1);
  d.inter = 2 * w.w2.size(2);
  MODMOE_CHECK(d.num_local >= 1, "argument '", w2n, "' has shape ", w.w2.shape_string(),
               ": expected at least one expert");
  check_k(d.hidden, "hidden", w2n + ".size(1)");
  check_k(d.inter, "intermediate", "2 * " + w2n + ".size(2)");
  check::dense(w.w2, w2n.c_str(), dev);

  check::defined(w.w13, w13n.c_str());
  check::dtype(w.w13, w13n.c_str(), {DType::E2M1x2});
  const int64_t E = d.num_local, H = d.hidden, I = d.inter;
  const bool rows_ok = w.w13.ndim == 3 && w.w13.size(0) == E && w.w13.size(2) == H / 2 &&
                       ((gated.value_or(true) && w.w13.size(1) == 2 * I) ||
                        (!gated.value_or(false) && w.w13.size(1) == I));
  if (!gated.has_value()) {
    MODMOE_CHECK(rows_ok, "argument '", w13n, "' has shape ", w.w13.shape_string(),
                 ": expected [E_local, 2I, H/2] = [", E, ", ", 2 * I, ", ", H / 2,
                 "] (gated) or [E_local, I, H/2] = [", E, ", ", I, ", ", H / 2,
                 "] (non-gated), E2M1x2, with E_local, H and I from ", w2n);
  } else {
    MODMOE_CHECK(rows_ok, "argument '", w13n, "' has shape ", w.w13.shape_string(),
                 ": expected [E_local, ", *gated ? "2I" : "I", ", H/2] = [", E, ", ",
                 *gated ? 2 * I : I, ", ", H / 2, "] for the ", *gated ? "gated" : "non-gated",
                 " activation, E2M1x2, with E_local, H and I from ", w2n);
  }
  check::dense(w.w13, w13n.c_str(), dev);
  d.rows = w.w13.size(1);

  check_exact(w.w13_scale, join(prefix, "w13_scale"), DType::E4M3, dev, {E, d.rows, H / kBlock},
              "[E_local, w13 rows, H/16] (one e4m3 scale per 16 values, linear)");
  check_exact(w.w2_scale, join(prefix, "w2_scale"), DType::E4M3, dev, {E, H, I / kBlock},
              "[E_local, H, I/16] (one e4m3 scale per 16 values, linear)");
  const char* per_expert =
      "[E_local] (one fp32 dequantization scale per expert; gate and up share it)";
  check_exact(w.w13_global_scale, join(prefix, "w13_global_scale"), DType::F32, dev, {E},
              per_expert);
  check_exact(w.w2_global_scale, join(prefix, "w2_global_scale"), DType::F32, dev, {E},
              per_expert);
  if (w.w13_bias.defined()) {
    check_exact(w.w13_bias, join(prefix, "w13_bias"), DType::F32, dev, {E, d.rows},
                "[E_local, w13 rows]");
  }
  if (w.w2_bias.defined()) {
    check_exact(w.w2_bias, join(prefix, "w2_bias"), DType::F32, dev, {E, H}, "[E_local, H]");
  }
  if (!dev.is_cuda()) {  // values are readable on the host: a garbage scale is an error here
    for (const auto* t : {&w.w13_global_scale, &w.w2_global_scale}) {
      const std::string name =
          join(prefix, t == &w.w13_global_scale ? "w13_global_scale" : "w2_global_scale");
      for (int64_t e = 0; e < E; ++e) {
        const float g = t->ptr<const float>()[e];
        MODMOE_CHECK(std::isfinite(g) && g > 0.0f, "argument '", name, "'[", e, "] = ", g,
                     ": expected a finite positive dequantization scale (ModelOpt's "
                     "weight_scale_2)");
      }
    }
  }
  return d;
}

// An activation-like tensor [T, H] or [E_local, max_m, H] (H counted in `dtype` elements).
void check_rows(const TensorView& t, const char* name, std::initializer_list<DType> dtypes,
                const Device& dev) {
  check::defined(t, name);
  check::dtype(t, name, dtypes);
  MODMOE_CHECK(t.ndim == 2 || t.ndim == 3, "argument '", name, "' has shape ", t.shape_string(),
               ": expected [T, *] or [E_local, max_m, *]");
  check::dense(t, name, dev);
}

// The scale and global-scale tensors of NVFP4 activations of `values` values per row. The
// global scale is [1] (per tensor) or one per row of `ref` (ref's shape without its last
// dimension); a one-row tensor's [1] is both, and both mean the same there.
void check_activation_scales(const TensorView& scale, const TensorView& global,
                             const TensorView& ref, int64_t values, const Device& dev) {
  check::defined(scale, "scale");
  check::dtype(scale, "scale", {DType::E4M3});
  check_like(scale, "scale", ref, values / kBlock,
             ref.ndim == 2 ? "[T, H/16] (one e4m3 scale per 16 values, token-major)"
                           : "[E_local, max_m, H/16] (one e4m3 scale per 16 values)");
  check::contiguous(scale, "scale");
  check::device(scale, "scale", dev);
  check::defined(global, "global_scale");
  check::dtype(global, "global_scale", {DType::F32});
  const bool per_tensor = global.ndim == 1 && global.size(0) == 1;
  bool per_row = global.ndim == ref.ndim - 1;
  std::string rows = "[";
  for (int d = 0; d + 1 < ref.ndim; ++d) {
    per_row = per_row && global.shape[d] == ref.shape[d];
    rows += (d ? ", " : "") + std::to_string(ref.shape[d]);
  }
  rows += "]";
  MODMOE_CHECK(per_tensor || per_row, "argument 'global_scale' has shape ", global.shape_string(),
               ": expected [1] (one fp32 global per tensor) or one per row, ",
               ref.ndim == 2 ? "[T]" : "[E_local, max_m]", " = ", rows);
  check::contiguous(global, "global_scale");
  check::device(global, "global_scale", dev);
}

}  // namespace

void quantize_nvfp4(const TensorView& x, const TensorView& q, const TensorView& scale,
                    const TensorView& global_scale, const Nvfp4QuantizeOptions& options,
                    Stream stream) {
  check::defined(x, "x");
  const Device dev = x.device;
  check_rows(x, "x", {DType::BF16}, dev);
  const int64_t H = x.size(-1);
  check_k(H, "hidden", "x.size(-1)");
  check_rows(q, "q", {DType::E2M1x2}, dev);
  check_like(q, "q", x, H / 2, "x's shape with H/2 (E2M1x2: two values per byte)");
  check_activation_scales(scale, global_scale, x, H, dev);
  check::disjoint(q, "q", x, "x");
  check::disjoint(scale, "scale", x, "x");
  check::disjoint(scale, "scale", q, "q");
  check::disjoint(global_scale, "global_scale", x, "x");
  check::disjoint(global_scale, "global_scale", q, "q");
  check::disjoint(global_scale, "global_scale", scale, "scale");
  if (dev.is_cuda()) {
    // NOTE: a static global scale on the device is not read here (no host synchronisation).
#ifdef MODMOE_WITH_CUDA
    cuda::quantize_nvfp4(x, q, scale, global_scale, options, stream);
    return;
#else
    (void)stream;
    api::no_cuda_backend("quantize_nvfp4", dev);
#endif
  }
  if (options.static_global_scale) {
    for (int64_t i = 0; i < global_scale.numel(); ++i) {
      const float g = global_scale.ptr<const float>()[i];
      MODMOE_CHECK(std::isfinite(g) && g > 0.0f, "argument 'global_scale'[", i, "] = ", g,
                   " with options.static_global_scale: expected a finite positive dequantization "
                   "scale (amax / (6 * 448); FlashInfer's global_sf is its reciprocal)");
    }
  }
  reference::quantize_nvfp4(x, q, scale, global_scale, options);
}

void dequantize_nvfp4(const TensorView& q, const TensorView& scale,
                      const TensorView& global_scale, const TensorView& out,
                      Stream stream) {
  check::defined(q, "q");
  const Device dev = q.device;
  check_rows(q, "q", {DType::E2M1x2}, dev);
  const int64_t H = 2 * q.size(-1);
  check_k(H, "hidden", "2 * q.size(-1)");
  check_activation_scales(scale, global_scale, q, H, dev);
  check_rows(out, "out", {DType::F32, DType::BF16}, dev);
  check_like(out, "out", q, H, "q's shape with H = 2 * q.size(-1)");
  check::disjoint(out, "out", q, "q");
  check::disjoint(out, "out", scale, "scale");
  check::disjoint(out, "out", global_scale, "global_scale");
  if (dev.is_cuda()) {
#ifdef MODMOE_WITH_CUDA
    cuda::dequantize_nvfp4(q, scale, global_scale, out, stream);
    return;
#else
    (void)stream;
    api::no_cuda_backend("dequantize_nvfp4", dev);
#endif
  }
  reference::dequantize_nvfp4(q, scale, global_scale, out);
}

namespace api {

void prepare_weights_nvfp4(const ExpertWeights& src, ExpertWeights& dst,
                           const PrepareWeightsOptions& options, Stream stream) {
  check::defined(src.w2, "src.w2");
  const Device dev = src.w2.device;
  MODMOE_CHECK(src.layout == WeightLayout::Canonical, "argument 'src.layout' = ",
               static_cast<int>(src.layout),
               ": expected Canonical (prepare_weights reads the checkpoint layout)");
  MODMOE_CHECK(src.order == GateUpOrder::GateUp || src.order == GateUpOrder::UpGate,
               "argument 'src.order' = ", static_cast<int>(src.order),
               ": expected GateUp or UpGate");
  const Dims d = check_nvfp4_weights(src, "src.", dev, std::nullopt);
  const bool gated = d.rows == 2 * d.inter;

  MODMOE_CHECK(options.layout == WeightLayout::Canonical ||
                   options.layout == WeightLayout::GateUpInterleaved,
               "argument 'options.layout' = ", static_cast<int>(options.layout),
               ": expected Canonical or GateUpInterleaved");
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && gated;
  if (interleave) {
    const int g = options.interleave_rows;
    MODMOE_CHECK(g > 0 && g % 8 == 0 && d.inter % g == 0, "argument 'options.interleave_rows' = ",
                 g, ": expected a positive multiple of 8 that divides intermediate = ", d.inter);
  }

  check::same_as(dst.w13, src.w13, "dst.w13", "src.w13", dev);
  check::same_as(dst.w2, src.w2, "dst.w2", "src.w2", dev);
  check::same_as(dst.w13_scale, src.w13_scale, "dst.w13_scale", "src.w13_scale", dev);
  check::same_as(dst.w2_scale, src.w2_scale, "dst.w2_scale", "src.w2_scale", dev);
  check::same_as(dst.w13_global_scale, src.w13_global_scale, "dst.w13_global_scale",
                 "src.w13_global_scale", dev);
  check::same_as(dst.w2_global_scale, src.w2_global_scale, "dst.w2_global_scale",
                 "src.w2_global_scale", dev);
  if (src.w13_bias.defined()) {
    check::same_as(dst.w13_bias, src.w13_bias, "dst.w13_bias", "src.w13_bias", dev);
  }
  if (src.w2_bias.defined()) {
    check::same_as(dst.w2_bias, src.w2_bias, "dst.w2_bias", "src.w2_bias", dev);
  }
#ifndef MODMOE_WITH_CUDA
  if (dev.is_cuda()) api::no_cuda_backend("prepare_weights", dev);
#endif

  // dst's descriptor: the views stay the caller's, the rest follows the preparation.
  dst.scheme = QuantScheme::Nvfp4;
  dst.layout = interleave ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  dst.order = src.order;
  dst.interleave_rows = interleave ? options.interleave_rows : 0;
  if (!src.w13_bias.defined()) dst.w13_bias = {};
  if (!src.w2_bias.defined()) dst.w2_bias = {};
  if (!dev.is_cuda()) {
    reference::prepare_weights_nvfp4(src, dst, options);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::prepare_weights_nvfp4(src, dst, options, stream);
#else
  (void)stream;
#endif
}

// NOTE: the checks that W4A16 shares with bf16 (routing tensors, outputs, LoRA, activation
// parameters, modes, the interleave) run through make_experts_desc on a bf16 "shadow" of the
// call: the same data pointers viewed as bf16 [E_local, rows, H] and [E_local, H, I], with no
// scales. Only metadata is read.
ExpertsDesc check_nvfp4_experts(const ExpertsInputs& in, const ExpertWeights& weights,
                                const ExpertMap& map, const ExpertsOptions& options,
                                const ExpertsOutputs& out) {
  map.validate();
  check::defined(in.hidden, "hidden");
  const Device dev = in.hidden.device;
  MODMOE_CHECK(weights.scheme == QuantScheme::Nvfp4, "argument 'weights.scheme' = ",
               quant_scheme_name(weights.scheme), ": expected Nvfp4 (the NVFP4 experts)");
  MODMOE_CHECK(!options.fp8_fast_accum, "argument 'options.fp8_fast_accum' = true with quant ",
               "scheme nvfp4: expected quant scheme fp8-tensor (FP8 fast accumulation sums the "
               "per-tensor GEMM1 over all of K), or fp8_fast_accum = false");
  if (in.hidden.dtype == DType::E2M1x2) {
    MODMOE_NOT_SUPPORTED("NVFP4 activations (argument 'hidden' of dtype e2m1x2, W4A4): the "
                         "NVFP4 experts take bf16 hidden (W4A16) for now");
  }
  check::dtype(in.hidden, "hidden", {DType::BF16});
  MODMOE_CHECK(!in.hidden_scale.defined(), "argument 'hidden_scale' of shape ",
               in.hidden_scale.shape_string(),
               " is given: expected it undefined with bf16 hidden (W4A16: only the weights are "
               "NVFP4)");
  const Dims d = check_nvfp4_weights(weights, "weights.", dev, is_gated(options.activation.kind));

  ExpertWeights shadow = weights;
  shadow.scheme = QuantScheme::None;
  shadow.w13 = make_view(weights.w13.data, DType::BF16, {d.num_local, d.rows, d.hidden}, dev);
  shadow.w2 = make_view(weights.w2.data, DType::BF16, {d.num_local, d.hidden, d.inter}, dev);
  shadow.w13_scale = {};
  shadow.w2_scale = {};
  shadow.w13_global_scale = {};
  shadow.w2_global_scale = {};
  ExpertsDesc desc = make_experts_desc(in, shadow, map, options, out);
  desc.scheme = QuantScheme::Nvfp4;
  desc.validate();
  return desc;
}

void check_nvfp4_experts_device(const Device& dev, const char* function) {
  if (!dev.is_cuda()) return;
#ifdef MODMOE_WITH_CUDA
  // The W4A16 kernel reads every weight layout (Canonical, GateUpInterleaved with any G) and
  // runs on sm_80+ devices the build has an image for; cuda::experts checks the device, the
  // alignment and the workspace before anything is launched.
  (void)function;
#else
  api::no_cuda_backend(function, dev);
#endif
}

}  // namespace api
}  // namespace modmoe
