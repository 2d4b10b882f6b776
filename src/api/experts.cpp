// Public entry points of the experts stage (include/modmoe/experts.h): every argument is
// checked here, then the backend of the tensors' device runs (src/backend.h).
#include "modmoe/experts.h"

#include <algorithm>

#include "api/api_util.h"
#include "api/nvfp4_check.h"
#include "api/quant_check.h"
#include "backend.h"
#include "core/check.h"
#include "reference/nvfp4.h"
#include "reference/quant.h"

namespace modmoe {

// ---------------------------------------------------------------------------------------
// ExpertMap, Activation, ExpertWeights
// ---------------------------------------------------------------------------------------

ExpertMap ExpertMap::for_rank(int num_experts, int ep_size, int ep_rank) {
  MODMOE_CHECK(ep_size >= 1, "argument 'ep_size' = ", ep_size, ": expected >= 1");
  MODMOE_CHECK(ep_rank >= 0 && ep_rank < ep_size, "argument 'ep_rank' = ", ep_rank,
               ": expected in [0, ep_size = ", ep_size, ")");
  MODMOE_CHECK(num_experts >= 1, "argument 'num_experts' = ", num_experts, ": expected >= 1");
  MODMOE_CHECK(num_experts % ep_size == 0, "argument 'num_experts' = ", num_experts,
               ": expected a multiple of ep_size = ", ep_size,
               " (experts are split contiguously and evenly over the ranks)");
  const int num_local = num_experts / ep_size;
  ExpertMap map{num_experts, ep_rank * num_local, num_local};
  map.validate();
  return map;
}

void ExpertMap::validate() const {
  MODMOE_CHECK(num_experts >= 1, "argument 'expert_map.num_experts' = ", num_experts,
               ": expected >= 1");
  MODMOE_CHECK(num_local_experts >= 1 && num_local_experts <= num_experts,
               "argument 'expert_map.num_local_experts' = ", num_local_experts,
               ": expected in [1, num_experts = ", num_experts, "]");
  MODMOE_CHECK(local_expert_offset >= 0 && local_expert_offset < num_experts,
               "argument 'expert_map.local_expert_offset' = ", local_expert_offset,
               ": expected in [0, num_experts = ", num_experts, ")");
  const int64_t end = static_cast<int64_t>(local_expert_offset) + num_local_experts;
  MODMOE_CHECK(end <= num_experts, "argument 'expert_map': local_expert_offset (",
               local_expert_offset, ") + num_local_experts (", num_local_experts, ") = ", end,
               ": expected <= num_experts = ", num_experts);
}

const char* activation_name(Activation act) {
  switch (act) {
    case Activation::Swiglu: return "swiglu";
    case Activation::SwigluOai: return "swiglu_oai";
    case Activation::Geglu: return "geglu";
    case Activation::Relu2: return "relu2";
  }
  return "unknown";
}

int64_t ExpertWeights::gate_row(int64_t i) const {
  if (layout == WeightLayout::GateUpInterleaved) {
    MODMOE_CHECK(interleave_rows > 0, "argument 'weights.interleave_rows' = ", interleave_rows,
                 ": expected > 0 with the GateUpInterleaved layout");
    const int64_t g = interleave_rows;
    return (i / g) * 2 * g + i % g;
  }
  return order == GateUpOrder::GateUp ? i : intermediate() + i;
}

int64_t ExpertWeights::up_row(int64_t i) const {
  if (layout == WeightLayout::GateUpInterleaved) return gate_row(i) + interleave_rows;
  return order == GateUpOrder::GateUp ? intermediate() + i : i;
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

void ExpertsDesc::validate() const {
  expert_map.validate();
  const bool fp8 = api::is_fp8(scheme);
  const bool nvfp4 = scheme == QuantScheme::Nvfp4;
  if (scheme == QuantScheme::Mxfp8) {
    MODMOE_NOT_SUPPORTED("quant scheme ", quant_scheme_name(scheme),
                         " in the experts stage: implemented are 'none' (bf16), 'fp8-tensor', "
                         "'fp8-block' (CPU, and CUDA on sm_90) and 'nvfp4' (W4A16, CPU and "
                         "CUDA)");
  }
  MODMOE_CHECK(scheme == QuantScheme::None || fp8 || nvfp4, "argument 'scheme' = ",
               static_cast<int>(scheme), ": expected None, Fp8PerTensor, Fp8Block128 or Nvfp4");
  const int act = static_cast<int>(activation);
  MODMOE_CHECK(act >= 0 && act <= static_cast<int>(Activation::Relu2),
               "argument 'activation' = ", act, ": expected Swiglu, SwigluOai, Geglu or Relu2");
  MODMOE_CHECK(format == InputFormat::Standard || format == InputFormat::Batched,
               "argument 'format' = ", static_cast<int>(format),
               ": expected Standard or Batched");
  if (format == InputFormat::Batched && do_finalize) {
    MODMOE_NOT_SUPPORTED(
        "do_finalize = true with the batched input format: batched rows carry no token "
        "identity; expected do_finalize = false (the combine sums the rows)");
  }
  MODMOE_CHECK(num_tokens >= 0, "argument 'num_tokens' = ", num_tokens, ": expected >= 0");
  MODMOE_CHECK(hidden > 0 && hidden % 64 == 0, "argument 'hidden' = ", hidden,
               ": expected a multiple of 64 (the GEMM tile)");
  MODMOE_CHECK(intermediate > 0 && intermediate % 64 == 0, "argument 'intermediate' = ",
               intermediate, ": expected a multiple of 64 (the GEMM tile)");
  if (fp8) {
    MODMOE_CHECK(hidden % kFp8BlockSize == 0 && intermediate % kFp8BlockSize == 0,
                 "argument 'hidden' = ", hidden, ", 'intermediate' = ", intermediate,
                 " with quant scheme ", quant_scheme_name(scheme),
                 ": expected both multiples of 128 (the FP8 scale block)");
  }
  // NOTE: implied today by the multiples of 64 above; stated so that the NVFP4 rule stays
  // checked if the GEMM tile rule ever loosens.
  if (nvfp4) {
    MODMOE_CHECK(hidden % 32 == 0 && intermediate % 32 == 0, "argument 'hidden' = ", hidden,
                 ", 'intermediate' = ", intermediate,
                 " with quant scheme nvfp4: expected both multiples of 32 (16-value scale "
                 "blocks, packed rows of K/2 bytes in whole 16-byte vectors)");
  }
  if (format == InputFormat::Standard) {
    MODMOE_CHECK(top_k >= 1 && top_k <= expert_map.num_experts, "argument 'top_k' = ", top_k,
                 ": expected in [1, num_experts = ", expert_map.num_experts, "]");
  }
  MODMOE_CHECK(!fp8_fast_accum || scheme == QuantScheme::Fp8PerTensor,
               "argument 'fp8_fast_accum' = true with quant scheme ", quant_scheme_name(scheme),
               ": expected quant scheme fp8-tensor (FP8 fast accumulation sums the per-tensor "
               "GEMM1 over all of K; the other schemes have no fast mode), or "
               "fp8_fast_accum = false");
}

namespace {

// The usual dense bf16 tensor with an exact shape.
void check_bf16_dense(const TensorView& t, const char* name, const Device& dev,
                      std::initializer_list<int64_t> shape) {
  check::defined(t, name);
  check::dtype(t, name, {DType::BF16});
  check::shape(t, name, shape);
  check::dense(t, name, dev);
}

// A small contiguous tensor (ids, weights, counts): no row alignment needed.
void check_small(const TensorView& t, const char* name, const Device& dev, DType dtype,
                 std::initializer_list<int64_t> shape) {
  check::defined(t, name);
  check::dtype(t, name, {dtype});
  check::shape(t, name, shape);
  check::contiguous(t, name);
  check::device(t, name, dev);
}

void check_undefined(const TensorView& t, const char* name, const char* why) {
  MODMOE_CHECK(!t.defined(), "argument '", name, "' of shape ", t.shape_string(),
               " is given: expected it undefined ", why);
}

void check_weights(const ExpertWeights& w, const ExpertMap& map, const ActivationParams& act,
                   const Device& dev) {
  check::defined(w.w2, "weights.w2");
  check::dtype(w.w2, "weights.w2", {DType::BF16});
  MODMOE_CHECK(w.w2.ndim == 3, "argument 'weights.w2' has shape ", w.w2.shape_string(),
               ": expected [E_local, H, I]");
  check::dense(w.w2, "weights.w2", dev);
  const int64_t num_local = w.w2.size(0);
  const int64_t H = w.w2.size(1);
  const int64_t I = w.w2.size(2);
  MODMOE_CHECK(num_local == map.num_local_experts, "argument 'weights.w2' has shape ",
               w.w2.shape_string(), " with E_local = ", num_local,
               ": expected E_local = expert_map.num_local_experts = ", map.num_local_experts);

  const bool gated = is_gated(act.kind);
  const int64_t rows = gated ? 2 * I : I;
  check::defined(w.w13, "weights.w13");
  check::dtype(w.w13, "weights.w13", {DType::BF16});
  const bool w13_ok = w.w13.ndim == 3 && w.w13.size(0) == num_local && w.w13.size(1) == rows &&
                      w.w13.size(2) == H;
  MODMOE_CHECK(w13_ok, "argument 'weights.w13' has shape ", w.w13.shape_string(),
               ": expected [E_local, ", gated ? "2I" : "I", ", H] = [", num_local, ", ", rows,
               ", ", H, "] for the ", gated ? "gated" : "non-gated", " activation ",
               activation_name(act.kind), " (E_local, H and I from weights.w2)");
  check::dense(w.w13, "weights.w13", dev);

  MODMOE_CHECK(w.order == GateUpOrder::GateUp || w.order == GateUpOrder::UpGate,
               "argument 'weights.order' = ", static_cast<int>(w.order),
               ": expected GateUp or UpGate");
  if (w.layout == WeightLayout::GateUpInterleaved) {
    MODMOE_CHECK(gated, "argument 'weights.layout' = GateUpInterleaved with the non-gated ",
                 "activation ", activation_name(act.kind),
                 ": expected Canonical (there is no gate/up pair to interleave)");
    const int g = w.interleave_rows;
    MODMOE_CHECK(g > 0 && g % 8 == 0 && I % g == 0, "argument 'weights.interleave_rows' = ", g,
                 ": expected a positive multiple of 8 that divides intermediate = ", I);
  } else {
    MODMOE_CHECK(w.layout == WeightLayout::Canonical, "argument 'weights.layout' = ",
                 static_cast<int>(w.layout), ": expected Canonical or GateUpInterleaved");
  }

  if (w.w13_bias.defined()) {
    check_small(w.w13_bias, "weights.w13_bias", dev, DType::F32, {num_local, rows});
  }
  if (w.w2_bias.defined()) {
    check_small(w.w2_bias, "weights.w2_bias", dev, DType::F32, {num_local, H});
  }
  const char* no_scales = "with quant scheme none (scales belong to quantized schemes)";
  check_undefined(w.w13_scale, "weights.w13_scale", no_scales);
  check_undefined(w.w2_scale, "weights.w2_scale", no_scales);
  check_undefined(w.w13_global_scale, "weights.w13_global_scale", no_scales);
  check_undefined(w.w2_global_scale, "weights.w2_global_scale", no_scales);

  const struct {
    const TensorView& t;
    const char* name;
  } per_expert[] = {{act.alpha_per_expert, "options.activation.alpha_per_expert"},
                    {act.beta_per_expert, "options.activation.beta_per_expert"},
                    {act.limit_per_expert, "options.activation.limit_per_expert"}};
  for (const auto& p : per_expert) {
    if (!p.t.defined()) continue;
    MODMOE_CHECK(act.kind == Activation::SwigluOai, "argument '", p.name,
                 "' is given with the activation ", activation_name(act.kind),
                 ": expected it only with swiglu_oai, the one activation that uses it");
    check_small(p.t, p.name, dev, DType::F32, {num_local});
  }
}

void check_standard(const ExpertsInputs& in, const ExpertMap& map, const ExpertsOptions& opt,
                    const ExpertsOutputs& out, const Device& dev, ExpertsDesc& desc) {
  const int64_t H = desc.hidden;
  const int64_t I = desc.intermediate;
  MODMOE_CHECK(in.hidden.ndim == 2 && in.hidden.size(1) == H, "argument 'hidden' has shape ",
               in.hidden.shape_string(), ": expected [M, ", H,
               "] (standard format; H from weights.w2) or [E_local, max_m, H] (batched)");
  const int64_t M = in.hidden.size(0);

  check::defined(in.topk_ids, "topk_ids");
  check::dtype(in.topk_ids, "topk_ids", {DType::I32});
  MODMOE_CHECK(in.topk_ids.ndim == 2 && in.topk_ids.size(0) == M, "argument 'topk_ids' has shape ",
               in.topk_ids.shape_string(), ": expected [M, k] with M = ", M, " (hidden rows)");
  check::contiguous(in.topk_ids, "topk_ids");
  check::device(in.topk_ids, "topk_ids", dev);
  const int64_t k = in.topk_ids.size(1);
  MODMOE_CHECK(k >= 1 && k <= map.num_experts, "argument 'topk_ids' has shape ",
               in.topk_ids.shape_string(), ": expected top_k (its columns) in [1, num_experts = ",
               map.num_experts, "]");
  desc.num_tokens = M;
  desc.top_k = static_cast<int>(k);

  if (in.topk_weights.defined()) {
    check::dtype(in.topk_weights, "topk_weights", {DType::F32, DType::BF16});
    check::shape(in.topk_weights, "topk_weights", {M, k});
    check::contiguous(in.topk_weights, "topk_weights");
    check::device(in.topk_weights, "topk_weights", dev);
  } else {
    // Packed: (id << 16) | bf16 bits with a signed 16-bit id; the sentinel num_experts too.
    MODMOE_CHECK(map.num_experts <= 32767, "argument 'topk_ids' is packed (topk_weights ",
                 "undefined) with num_experts = ", map.num_experts,
                 ": expected num_experts <= 32767, the ids travel in 16 signed bits");
  }
  check_undefined(in.expert_num_tokens, "expert_num_tokens", "with the standard input format");
  check_undefined(in.hidden_scale, "hidden_scale", "with quant scheme none");
  MODMOE_CHECK(!opt.apply_router_weight_on_input || k == 1,
               "argument 'options.apply_router_weight_on_input' = true with top_k = ", k,
               ": expected top_k = 1 (the weight scales the expert's input)");

  const int64_t rows = is_gated(desc.activation) ? 2 * I : I;
  if (in.gemm1_lora_delta.defined()) {
    check_bf16_dense(in.gemm1_lora_delta, "gemm1_lora_delta", dev, {M, k, rows});
  }

  if (opt.do_finalize) {
    check_bf16_dense(out.out, "out", dev, {M, H});
  } else {
    check_undefined(out.out, "out", "with do_finalize = false (gemm2_out receives the rows)");
    check::defined(out.gemm2_out, "gemm2_out");
    check::defined(out.expert_weights, "expert_weights");
    check::defined(out.expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx");
    check::defined(out.expert_first_token_offset, "expert_first_token_offset");
  }
  // Optional in do_finalize = true mode, required (checked above) otherwise.
  if (out.gemm2_out.defined()) check_bf16_dense(out.gemm2_out, "gemm2_out", dev, {M * k, H});
  if (out.expert_weights.defined()) {
    check_small(out.expert_weights, "expert_weights", dev, DType::F32, {M, k});
  }
  if (out.expanded_idx_to_permuted_idx.defined()) {
    check_small(out.expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx", dev,
                DType::I32, {M, k});
  }
  if (out.expert_first_token_offset.defined()) {
    check_small(out.expert_first_token_offset, "expert_first_token_offset", dev, DType::I64,
                {map.num_local_experts + 1});
  }
  if (out.gemm1_activation_output.defined()) {
    check_bf16_dense(out.gemm1_activation_output, "gemm1_activation_output", dev, {M * k, I});
  }
}

void check_batched(const ExpertsInputs& in, const ExpertMap& map, const ExpertsOptions& opt,
                   const ExpertsOutputs& out, const Device& dev, ExpertsDesc& desc) {
  const int64_t H = desc.hidden;
  const int64_t num_local = map.num_local_experts;
  MODMOE_CHECK(in.hidden.ndim == 3 && in.hidden.size(0) == num_local && in.hidden.size(2) == H,
               "argument 'hidden' has shape ", in.hidden.shape_string(),
               ": expected [E_local, max_m, H] = [", num_local, ", *, ", H,
               "] (batched format) or [M, H] (standard)");
  const int64_t max_m = in.hidden.size(1);
  desc.num_tokens = max_m;
  desc.top_k = 0;
  check_small(in.expert_num_tokens, "expert_num_tokens", dev, DType::I32, {num_local});
  const char* no_routing = "with the batched input format (its rows carry no routing)";
  check_undefined(in.topk_ids, "topk_ids", no_routing);
  check_undefined(in.topk_weights, "topk_weights", no_routing);
  check_undefined(in.hidden_scale, "hidden_scale", "with quant scheme none");
  if (in.gemm1_lora_delta.defined()) {
    MODMOE_NOT_SUPPORTED("argument 'gemm1_lora_delta' with the batched input format: the delta "
                         "is indexed by (token, slot); expected the standard format");
  }
  if (opt.apply_router_weight_on_input) {
    MODMOE_NOT_SUPPORTED("options.apply_router_weight_on_input with the batched input format: "
                         "batched rows carry no routing weight; expected the standard format");
  }
  if (out.gemm1_activation_output.defined()) {
    MODMOE_NOT_SUPPORTED("argument 'gemm1_activation_output' with the batched input format; "
                         "expected the standard format");
  }
  const char* not_written = "with the batched input format (only gemm2_out is written)";
  check_undefined(out.out, "out", not_written);
  check_undefined(out.expert_weights, "expert_weights", not_written);
  check_undefined(out.expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx", not_written);
  check_undefined(out.expert_first_token_offset, "expert_first_token_offset", not_written);
  check_bf16_dense(out.gemm2_out, "gemm2_out", dev, {num_local, max_m, H});
}

}  // namespace

ExpertsDesc make_experts_desc(const ExpertsInputs& in, const ExpertWeights& weights,
                              const ExpertMap& map, const ExpertsOptions& options,
                              const ExpertsOutputs& out) {
  map.validate();
  check::defined(in.hidden, "hidden");
  const Device dev = in.hidden.device;
  MODMOE_CHECK(!options.fp8_fast_accum || weights.scheme == QuantScheme::Fp8PerTensor,
               "argument 'options.fp8_fast_accum' = true with quant scheme ",
               quant_scheme_name(weights.scheme),
               ": expected quant scheme fp8-tensor (FP8 fast accumulation sums the per-tensor "
               "GEMM1 over all of K; the other schemes have no fast mode), or "
               "fp8_fast_accum = false");
  // FP8: its own dtype and scale checks, then this function on a bf16 shadow of the call.
  if (api::is_fp8(weights.scheme)) return api::check_fp8_experts(in, weights, map, options, out);
  // NVFP4 (W4A16): likewise, on a bf16 shadow of the packed weights.
  if (weights.scheme == QuantScheme::Nvfp4) {
    return api::check_nvfp4_experts(in, weights, map, options, out);
  }
  if (weights.scheme != QuantScheme::None) {
    MODMOE_NOT_SUPPORTED("quant scheme ", quant_scheme_name(weights.scheme), " on ",
                         dev.to_string(),
                         " in the experts stage: implemented are 'none' (bf16 activations and "
                         "weights), 'fp8-tensor', 'fp8-block' (CPU, and CUDA on sm_90) and "
                         "'nvfp4' (W4A16, CPU and CUDA)");
  }
  const int act = static_cast<int>(options.activation.kind);
  MODMOE_CHECK(act >= 0 && act <= static_cast<int>(Activation::Relu2),
               "argument 'options.activation.kind' = ", act,
               ": expected Swiglu, SwigluOai, Geglu or Relu2");
  check::dtype(in.hidden, "hidden", {DType::BF16});
  check::dense(in.hidden, "hidden", dev);
  check_weights(weights, map, options.activation, dev);

  ExpertsDesc desc;
  desc.format = in.format();
  desc.hidden = weights.hidden();
  desc.intermediate = weights.intermediate();
  desc.expert_map = map;
  desc.activation = options.activation.kind;
  desc.scheme = weights.scheme;
  desc.do_finalize = options.do_finalize;
  if (desc.format == InputFormat::Batched) {
    // Reports do_finalize = true before complaining about outputs that mode would need.
    if (options.do_finalize) desc.validate();
    check_batched(in, map, options, out, dev, desc);
  } else {
    check_standard(in, map, options, out, dev, desc);
  }
  desc.validate();
  return desc;
}

size_t experts_workspace_size(const ExpertsDesc& desc) {
  desc.validate();
  size_t bytes = reference::experts_workspace_size(desc);
#ifdef MODMOE_WITH_CUDA
  bytes = std::max(bytes, cuda::experts_workspace_size(desc));
#endif
  return bytes;
}

void experts(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
             const ExpertsOptions& options, const ExpertsOutputs& out,
             const Workspace& workspace, Stream stream) {
  const ExpertsDesc desc = make_experts_desc(in, weights, map, options, out);
  const Device dev = in.hidden.device;
  if (api::is_fp8(desc.scheme)) {
    api::check_fp8_experts_device(desc.scheme, weights, options.activation.kind, dev, "experts");
    if (!dev.is_cuda()) {
      reference::experts_fp8(in, weights, map, options, out);
      return;
    }
  }
  if (desc.scheme == QuantScheme::Nvfp4) {
    api::check_nvfp4_experts_device(dev, "experts");
    if (!dev.is_cuda()) {
      reference::experts_nvfp4(in, weights, map, options, out);
      return;
    }
  }
  if (!dev.is_cuda()) {
    if (desc.format == InputFormat::Batched) {
      const auto* counts = in.expert_num_tokens.ptr<const int32_t>();
      for (int e = 0; e < map.num_local_experts; ++e) {
        MODMOE_CHECK(counts[e] >= 0 && counts[e] <= desc.num_tokens, "argument ",
                     "'expert_num_tokens'[", e, "] = ", counts[e], ": expected in [0, max_m = ",
                     desc.num_tokens, "] (hidden.size(1))");
      }
    }
    reference::experts(desc, in, weights, map, options, out, workspace, stream);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  api::check_workspace(workspace, cuda::experts_workspace_size(desc), "experts");
  cuda::experts(desc, in, weights, map, options, out, workspace, stream);
#else
  api::no_cuda_backend("experts", dev);
#endif
}

// ---------------------------------------------------------------------------------------
// permute and finalize
// ---------------------------------------------------------------------------------------

size_t permute_workspace_size(int64_t num_tokens, int top_k, int num_local_experts) {
  MODMOE_CHECK(num_tokens >= 0, "argument 'num_tokens' = ", num_tokens, ": expected >= 0");
  MODMOE_CHECK(top_k >= 1, "argument 'top_k' = ", top_k, ": expected >= 1");
  MODMOE_CHECK(num_local_experts >= 1, "argument 'num_local_experts' = ", num_local_experts,
               ": expected >= 1");
  size_t bytes = reference::permute_workspace_size(num_tokens, top_k, num_local_experts);
#ifdef MODMOE_WITH_CUDA
  bytes = std::max(bytes, cuda::permute_workspace_size(num_tokens, top_k, num_local_experts));
#endif
  return bytes;
}

void permute(const TensorView& topk_ids, bool packed, const ExpertMap& map,
             const PermuteMetadata& out, const Workspace& workspace, Stream stream) {
  map.validate();
  check::defined(topk_ids, "topk_ids");
  const Device dev = topk_ids.device;
  check::dtype(topk_ids, "topk_ids", {DType::I32});
  MODMOE_CHECK(topk_ids.ndim == 2, "argument 'topk_ids' has shape ", topk_ids.shape_string(),
               ": expected [M, k]");
  check::contiguous(topk_ids, "topk_ids");
  const int64_t M = topk_ids.size(0);
  const int64_t k = topk_ids.size(1);
  MODMOE_CHECK(k >= 1 && k <= map.num_experts, "argument 'topk_ids' has shape ",
               topk_ids.shape_string(), ": expected top_k (its columns) in [1, num_experts = ",
               map.num_experts, "]");
  MODMOE_CHECK(!packed || map.num_experts <= 32767, "argument 'packed' = true with ",
               "num_experts = ", map.num_experts,
               ": expected num_experts <= 32767, the ids travel in 16 signed bits");
  check_small(out.expert_first_token_offset, "expert_first_token_offset", dev, DType::I64,
              {map.num_local_experts + 1});
  check_small(out.expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx", dev, DType::I32,
              {M, k});
  check_small(out.permuted_idx_to_expanded_idx, "permuted_idx_to_expanded_idx", dev, DType::I32,
              {M * k});
  if (!dev.is_cuda()) {
    reference::permute(topk_ids, packed, map, out, workspace, stream);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  api::check_workspace(workspace,
                       cuda::permute_workspace_size(M, static_cast<int>(k), map.num_local_experts),
                       "permute");
  cuda::permute(topk_ids, packed, map, out, workspace, stream);
#else
  api::no_cuda_backend("permute", dev);
#endif
}

void finalize(const TensorView& gemm2_out, const TensorView& expert_weights,
              const TensorView& expanded_idx_to_permuted_idx, const TensorView& out,
              Stream stream) {
  check::defined(gemm2_out, "gemm2_out");
  const Device dev = gemm2_out.device;
  check::dtype(gemm2_out, "gemm2_out", {DType::BF16});
  MODMOE_CHECK(gemm2_out.ndim == 2, "argument 'gemm2_out' has shape ", gemm2_out.shape_string(),
               ": expected [P, H] (P >= the permuted rows)");
  check::dense(gemm2_out, "gemm2_out", dev);
  const int64_t H = gemm2_out.size(1);
  check::defined(out, "out");
  check::dtype(out, "out", {DType::BF16});
  MODMOE_CHECK(out.ndim == 2 && out.size(1) == H, "argument 'out' has shape ",
               out.shape_string(), ": expected [M, ", H, "] (H from gemm2_out)");
  check::dense(out, "out", dev);
  const int64_t M = out.size(0);
  check::defined(expert_weights, "expert_weights");
  check::dtype(expert_weights, "expert_weights", {DType::F32});
  MODMOE_CHECK(expert_weights.ndim == 2 && expert_weights.size(0) == M &&
                   expert_weights.size(1) >= 1,
               "argument 'expert_weights' has shape ", expert_weights.shape_string(),
               ": expected [M, k] with M = ", M, " (out rows) and k >= 1");
  check::contiguous(expert_weights, "expert_weights");
  check::device(expert_weights, "expert_weights", dev);
  const int64_t k = expert_weights.size(1);
  check_small(expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx", dev, DType::I32,
              {M, k});
  if (!dev.is_cuda()) {
    const auto* e2p = expanded_idx_to_permuted_idx.ptr<const int32_t>();
    for (int64_t x = 0; x < M * k; ++x) {
      MODMOE_CHECK(e2p[x] >= -1 && e2p[x] < gemm2_out.size(0),
                   "argument 'expanded_idx_to_permuted_idx'[", x / k, ", ", x % k, "] = ",
                   e2p[x], ": expected -1 (not local) or a row of gemm2_out in [0, ",
                   gemm2_out.size(0), ")");
    }
    reference::finalize(gemm2_out, expert_weights, expanded_idx_to_permuted_idx, out, stream);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::finalize(gemm2_out, expert_weights, expanded_idx_to_permuted_idx, out, stream);
#else
  api::no_cuda_backend("finalize", dev);
#endif
}

}  // namespace modmoe
