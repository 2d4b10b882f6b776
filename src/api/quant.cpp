// prepare_weights (include/modmoe/quant.h): checks the canonical weights and the caller's
// destination views, sets dst's descriptor, then runs the backend of the tensors' device.
#include "modmoe/quant.h"

#include "api/api_util.h"
#include "backend.h"
#include "core/check.h"

namespace modmoe {
namespace {

void check_same_as(const TensorView& dst, const TensorView& src, const char* dst_name,
                   const char* src_name, const Device& dev) {
  check::defined(dst, dst_name);
  MODMOE_CHECK(dst.dtype == src.dtype, "argument '", dst_name, "' has dtype ",
               dtype_name(dst.dtype), ": expected ", dtype_name(src.dtype), " like ", src_name);
  bool same_shape = dst.ndim == src.ndim;
  for (int d = 0; same_shape && d < src.ndim; ++d) same_shape = dst.shape[d] == src.shape[d];
  MODMOE_CHECK(same_shape, "argument '", dst_name, "' has shape ", dst.shape_string(),
               ": expected ", src.shape_string(), " like ", src_name);
  check::contiguous(dst, dst_name);
  check::device(dst, dst_name, dev);
  const auto* d0 = static_cast<const char*>(dst.data);
  const auto* s0 = static_cast<const char*>(src.data);
  const bool disjoint = d0 + dst.nbytes() <= s0 || s0 + src.nbytes() <= d0;
  MODMOE_CHECK(disjoint || src.nbytes() == 0, "argument '", dst_name, "' overlaps ", src_name,
               ": expected separate memory (prepare_weights does not work in place)");
}

}  // namespace

void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options, Stream stream) {
  check::defined(src.w2, "src.w2");
  const Device dev = src.w2.device;
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

  check::defined(src.w13, "src.w13");
  check::dtype(src.w13, "src.w13", {DType::BF16});
  const bool shape_ok = src.w13.ndim == 3 && src.w13.size(0) == num_local &&
                        (src.w13.size(1) == 2 * I || src.w13.size(1) == I) &&
                        src.w13.size(2) == H;
  MODMOE_CHECK(shape_ok, "argument 'src.w13' has shape ", src.w13.shape_string(),
               ": expected [E_local, 2I, H] = [", num_local, ", ", 2 * I, ", ", H,
               "] (gated) or [E_local, I, H] = [", num_local, ", ", I, ", ", H,
               "] (non-gated), with E_local, H and I from src.w2");
  check::dense(src.w13, "src.w13", dev);
  const int64_t rows = src.w13.size(1);
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

  check_same_as(dst.w13, src.w13, "dst.w13", "src.w13", dev);
  check_same_as(dst.w2, src.w2, "dst.w2", "src.w2", dev);
  if (src.w13_bias.defined()) {
    check_same_as(dst.w13_bias, src.w13_bias, "dst.w13_bias", "src.w13_bias", dev);
  }
  if (src.w2_bias.defined()) {
    check_same_as(dst.w2_bias, src.w2_bias, "dst.w2_bias", "src.w2_bias", dev);
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

}  // namespace modmoe
