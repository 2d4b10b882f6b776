// The monolithic fused_moe (include/modmoe/moe.h): route() into the workspace, then (FP8
// weights) quantize_activations() into the workspace, then experts() with do_finalize, through
// the same public calls on both backends, so that the fused output is bitwise equal to
// calling the stages one by one. NVFP4 weights (W4A16) take the bf16 hidden as it is.
#include "modmoe/moe.h"

#include "api/api_util.h"
#include "api/nvfp4_check.h"
#include "api/quant_check.h"
#include "core/check.h"
#include "core/host_tensor.h"
#include "modmoe/quant.h"

namespace modmoe {
namespace {

// fused_moe workspace, from its 256-byte aligned base:
//   [0, A)               topk_ids      [T, k] int32     A = align256(T * k * 4)
//   [A, 2A)              topk_weights  [T, k] fp32
//   FP8 weights only (Q = B + S; Q = 0 for bf16 and NVFP4, whose layout is the same without
//   them):
//   [2A, 2A + B)         hidden_q      [T, H] e4m3      B = align256(T * H)
//   [2A + B, 2A + Q)     hidden_scale  fp8-block:  [T, H/128] fp32, S = align256(T * H/128 * 4)
//                                      fp8-tensor: [1] fp32,          S = align256(4)
//   [2A + Q, 2A + Q + X) experts() workspace,           X = experts_workspace_size(desc)
size_t routing_bytes(int64_t num_tokens, int top_k) {
  return api::align_up(static_cast<size_t>(num_tokens) * static_cast<size_t>(top_k) * 4);
}

size_t hidden_q_bytes(const ExpertsDesc& d) {
  if (!api::is_fp8(d.scheme)) return 0;
  return api::align_up(static_cast<size_t>(d.num_tokens) * static_cast<size_t>(d.hidden));
}

size_t hidden_scale_bytes(const ExpertsDesc& d) {
  if (!api::is_fp8(d.scheme)) return 0;
  const size_t n = d.scheme == QuantScheme::Fp8Block128
                       ? static_cast<size_t>(d.num_tokens * (d.hidden / kFp8BlockSize))
                       : 1;
  return api::align_up(n * 4);
}

ExpertsDesc fused_desc(int64_t num_tokens, const ExpertWeights& weights,
                       const RoutingParams& routing, const ExpertMap& map,
                       const ExpertsOptions& options) {
  MODMOE_CHECK(num_tokens >= 0, "argument 'num_tokens' = ", num_tokens, ": expected >= 0");
  MODMOE_CHECK(weights.w2.ndim == 3, "argument 'weights.w2' has shape ",
               weights.w2.shape_string(), ": expected [E_local, H, I]");
  MODMOE_CHECK(options.do_finalize, "argument 'options.do_finalize' = false: expected true ",
               "(fused_moe returns the finalized output; call route() and experts() for the ",
               "unfinalized one)");
  MODMOE_CHECK(routing.num_experts == map.num_experts, "argument 'routing.num_experts' = ",
               routing.num_experts, ": expected expert_map.num_experts = ", map.num_experts);
  ExpertsDesc desc;
  desc.format = InputFormat::Standard;
  desc.num_tokens = num_tokens;
  desc.hidden = weights.hidden();
  desc.intermediate = weights.intermediate();
  desc.top_k = routing.top_k;
  desc.expert_map = map;
  desc.activation = options.activation.kind;
  desc.scheme = weights.scheme;
  desc.do_finalize = true;
  desc.fp8_fast_accum = options.fp8_fast_accum;  // refused by validate() off fp8-tensor
  desc.validate();
  return desc;
}

}  // namespace

size_t fused_moe_workspace_size(int64_t num_tokens, const ExpertWeights& weights,
                                const RoutingParams& routing, const ExpertMap& map,
                                const ExpertsOptions& options) {
  routing.validate();
  const ExpertsDesc desc = fused_desc(num_tokens, weights, routing, map, options);
  return 2 * routing_bytes(num_tokens, routing.top_k) + hidden_q_bytes(desc) +
         hidden_scale_bytes(desc) + experts_workspace_size(desc);
}

void fused_moe(const TensorView& logits, const TensorView& bias, const TensorView& hidden,
               const ExpertWeights& weights, const RoutingParams& routing,
               const ExpertMap& map, const ExpertsOptions& options, const TensorView& out,
               const Workspace& workspace, Stream stream, const TensorView& topk_ids,
               const TensorView& topk_weights) {
  map.validate();
  routing.validate();
  check::defined(hidden, "hidden");
  const Device dev = hidden.device;
  MODMOE_CHECK(hidden.ndim == 2, "argument 'hidden' has shape ", hidden.shape_string(),
               ": expected [T, H]");
  const int64_t T = hidden.size(0);
  const int k = routing.top_k;
  const ExpertsDesc desc = fused_desc(T, weights, routing, map, options);
  const bool fp8 = api::is_fp8(desc.scheme);
  if (fp8) {
    api::check_fp8_experts_device(desc.scheme, weights, options.activation.kind, dev,
                                  "fused_moe");
    // experts() checks the quantized copy; the caller's hidden is checked here.
    MODMOE_CHECK(hidden.dtype == DType::BF16, "argument 'hidden' has dtype ",
                 dtype_name(hidden.dtype), " with FP8 weights (quant scheme ",
                 quant_scheme_name(desc.scheme),
                 "): expected bf16, which fused_moe quantizes with the weights' scheme (to pass "
                 "e4m3 activations and their scales, call route() then experts())");
    MODMOE_CHECK(hidden.size(1) == desc.hidden, "argument 'hidden' has shape ",
                 hidden.shape_string(), ": expected [T, ", desc.hidden,
                 "] (H from weights.w2)");
    check::dense(hidden, "hidden", dev);
  }
  // NVFP4 (W4A16): hidden passes to experts() as it is, bf16 (checked there). Refused on
  // CUDA tensors here, before route() launches anything.
  if (desc.scheme == QuantScheme::Nvfp4) api::check_nvfp4_experts_device(dev, "fused_moe");
  check::defined(logits, "logits");
  MODMOE_CHECK(logits.ndim == 2 && logits.size(0) == T && logits.size(1) == map.num_experts,
               "argument 'logits' has shape ", logits.shape_string(), ": expected [T, E] = [",
               T, ", ", map.num_experts, "] (T from hidden, E = expert_map.num_experts)");
  check::device(logits, "logits", dev);
  if (topk_ids.defined()) {
    check::dtype(topk_ids, "topk_ids", {DType::I32});
    check::shape(topk_ids, "topk_ids", {T, k});
    check::contiguous(topk_ids, "topk_ids");
    check::device(topk_ids, "topk_ids", dev);
  }
  if (topk_weights.defined()) {
    check::dtype(topk_weights, "topk_weights", {DType::F32});
    check::shape(topk_weights, "topk_weights", {T, k});
    check::contiguous(topk_weights, "topk_weights");
    check::device(topk_weights, "topk_weights", dev);
  }

  // The workspace: the caller's, or on the CPU a scratch when none is given.
  const size_t id_bytes = routing_bytes(T, k);
  const size_t q_bytes = hidden_q_bytes(desc);
  const size_t qs_bytes = hidden_scale_bytes(desc);
  const size_t head_bytes = 2 * id_bytes + q_bytes + qs_bytes;
  const size_t required = head_bytes + experts_workspace_size(desc);
  HostTensor cpu_scratch;
  Workspace ws = workspace;
  if (!dev.is_cuda() && ws.data == nullptr && ws.bytes == 0) {
    cpu_scratch.reset(DType::U8, {static_cast<int64_t>(required)});
    ws = {cpu_scratch.data<void>(), required};
  }
  api::check_workspace(ws, required, "fused_moe", dev.is_cuda() ? api::kWorkspaceAlign : 16);
  auto* base = static_cast<char*>(ws.data);
  const TensorView ids =
      topk_ids.defined() ? topk_ids : make_view(base, DType::I32, {T, k}, dev);
  const TensorView wts = topk_weights.defined()
                             ? topk_weights
                             : make_view(base + id_bytes, DType::F32, {T, k}, dev);
  const Workspace experts_ws{required > 0 ? base + head_bytes : nullptr,
                             ws.bytes - head_bytes};

  ExpertsInputs in;
  in.hidden = hidden;
  in.topk_ids = ids;
  in.topk_weights = wts;
  if (fp8) {
    const int64_t H = desc.hidden;
    char* q_base = required > 0 ? base + 2 * id_bytes : nullptr;
    in.hidden = make_view(q_base, DType::E4M3, {T, H}, dev);
    in.hidden_scale =
        desc.scheme == QuantScheme::Fp8Block128
            ? make_view(q_base + q_bytes, DType::F32, {T, H / kFp8BlockSize}, dev)
            : make_view(q_base + q_bytes, DType::F32, {1}, dev);
  }
  ExpertsOutputs outs;
  outs.out = out;
  // Every argument of both stages is checked before route() launches anything.
  make_experts_desc(in, weights, map, options, outs);
  route(logits, bias, routing, ids, wts, stream);
  // FP8: the bf16 hidden quantized with a dynamic scale (per tensor, or per 1x128 group), as a
  // caller of the modular path does with quantize_activations.
  if (fp8) quantize_activations(hidden, desc.scheme, in.hidden, in.hidden_scale, {}, stream);
  experts(in, weights, map, options, outs, experts_ws, stream);
}

}  // namespace modmoe
