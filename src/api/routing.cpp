// Public entry point of stage 1, routing: validates every argument, then calls the backend of
// the tensors' device (src/backend.h). See docs/contract.md, "Stage 1".
#include "modmoe/routing.h"

#include <cmath>

#include "backend.h"
#include "core/check.h"

namespace modmoe {
namespace {

bool is_known(RoutingMethod method) {
  switch (method) {
    case RoutingMethod::Default:
    case RoutingMethod::Renormalize:
    case RoutingMethod::DeepSeekV3:
    case RoutingMethod::Llama4:
    case RoutingMethod::RenormalizeNaive:
    case RoutingMethod::TopK:
      return true;
  }
  return false;
}

// A view with elements must point somewhere; an empty one ([0, k] at T = 0) may be null.
void has_data(const TensorView& t, const char* name) {
  MODMOE_CHECK(t.data != nullptr || t.numel() == 0, "argument '", name, "' of shape ",
               t.shape_string(), " has a null data pointer: expected allocated memory");
}

}  // namespace

const char* routing_method_name(RoutingMethod method) {
  switch (method) {
    case RoutingMethod::Default: return "Default";
    case RoutingMethod::Renormalize: return "Renormalize";
    case RoutingMethod::DeepSeekV3: return "DeepSeekV3";
    case RoutingMethod::Llama4: return "Llama4";
    case RoutingMethod::RenormalizeNaive: return "RenormalizeNaive";
    case RoutingMethod::TopK: return "TopK";
  }
  return "Unknown";
}

void RoutingParams::validate() const {
  const int m = static_cast<int>(method);
  MODMOE_CHECK(is_known(method), "argument 'params.method' = ", m,
               ": expected a RoutingMethod from 0 (Default) to 5 (TopK)");
  const char* name = routing_method_name(method);
  MODMOE_CHECK(num_experts >= 1, "argument 'params.num_experts' = ", num_experts,
               ": expected >= 1");
  MODMOE_CHECK(top_k >= 1 && top_k <= num_experts, "argument 'params.top_k' = ", top_k,
               ": expected 1 <= top_k <= num_experts (", num_experts, ")");
  MODMOE_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0.0f,
               "argument 'params.routed_scaling_factor' = ", routed_scaling_factor,
               ": expected a finite value > 0");

  if (method == RoutingMethod::Llama4) {
    MODMOE_CHECK(top_k == 1, "argument 'params.top_k' = ", top_k,
                 ": expected top_k == 1 for method Llama4 (its weight scales the expert input)");
  }

  if (method != RoutingMethod::DeepSeekV3) {
    // NOTE: these fields only mean something to DeepSeekV3. A caller that sets them for another
    // method expects grouping or scaling that would silently not happen.
    MODMOE_CHECK(n_group == 0 && topk_group == 0, "argument 'params.n_group' = ", n_group,
                 " / 'params.topk_group' = ", topk_group, ": expected 0 for method ", name,
                 " (grouping is DeepSeekV3 only)");
    MODMOE_CHECK(routed_scaling_factor == 1.0f, "argument 'params.routed_scaling_factor' = ",
                 routed_scaling_factor, ": expected 1 for method ", name,
                 " (scaling is DeepSeekV3 only)");
    return;
  }

  MODMOE_CHECK(n_group >= 1, "argument 'params.n_group' = ", n_group,
               ": expected >= 1 for method DeepSeekV3 (1 = no group limit)");
  MODMOE_CHECK(num_experts % n_group == 0, "argument 'params.n_group' = ", n_group,
               ": expected a divisor of num_experts (", num_experts, ")");
  const int group_size = num_experts / n_group;
  MODMOE_CHECK(group_size >= 2, "argument 'params.n_group' = ", n_group,
               ": expected groups of >= 2 experts (num_experts ", num_experts, " / n_group = ",
               group_size, "), since a group is scored by its two best experts");
  MODMOE_CHECK(topk_group >= 1 && topk_group <= n_group, "argument 'params.topk_group' = ",
               topk_group, ": expected 1 <= topk_group <= n_group (", n_group, ")");
  MODMOE_CHECK(top_k <= topk_group * group_size, "argument 'params.top_k' = ", top_k,
               ": expected <= topk_group * num_experts / n_group (", topk_group, " * ",
               group_size, " = ", topk_group * group_size, "), the experts of the kept groups");
}

void route(const TensorView& logits, const TensorView& bias, const RoutingParams& params,
           const TensorView& topk_ids, const TensorView& topk_weights, Stream stream) {
  params.validate();
  const int64_t num_experts = params.num_experts;
  const int64_t k = params.top_k;

  // logits: [T, E] fp32|bf16
  check::defined(logits, "logits");
  check::dtype(logits, "logits", {DType::F32, DType::BF16});
  check::shape(logits, "logits", {check::kAny, num_experts});
  check::contiguous(logits, "logits");
  has_data(logits, "logits");
  const Device dev = logits.device;
  const int64_t num_tokens = logits.size(0);

  // topk_ids: [T, k] int32, written
  check::defined(topk_ids, "topk_ids");
  check::device(topk_ids, "topk_ids", dev);
  check::dtype(topk_ids, "topk_ids", {DType::I32});
  check::shape(topk_ids, "topk_ids", {num_tokens, k});
  check::contiguous(topk_ids, "topk_ids");
  has_data(topk_ids, "topk_ids");

  // topk_weights: [T, k] fp32, written
  check::defined(topk_weights, "topk_weights");
  check::device(topk_weights, "topk_weights", dev);
  check::dtype(topk_weights, "topk_weights", {DType::F32});
  check::shape(topk_weights, "topk_weights", {num_tokens, k});
  check::contiguous(topk_weights, "topk_weights");
  has_data(topk_weights, "topk_weights");

  // bias: [E] fp32|bf16, optional, DeepSeekV3 only
  if (bias.defined()) {
    MODMOE_CHECK(params.method == RoutingMethod::DeepSeekV3, "argument 'bias' of shape ",
                 bias.shape_string(), " is given for method ", routing_method_name(params.method),
                 ": expected no bias (an undefined view); only DeepSeekV3 uses a selection bias");
    check::device(bias, "bias", dev);
    check::dtype(bias, "bias", {DType::F32, DType::BF16});
    check::shape(bias, "bias", {num_experts});
    check::contiguous(bias, "bias");
    has_data(bias, "bias");
  }

  if (!dev.is_cuda()) {
    reference::route(logits, bias, params, topk_ids, topk_weights, stream);
    return;
  }
#ifdef MODMOE_WITH_CUDA
  cuda::route(logits, bias, params, topk_ids, topk_weights, stream);
#else
  MODMOE_FAIL("route: the tensors are on ", dev.to_string(),
              " but this build has no CUDA backend; rebuild with nvcc available "
              "(MODMOE_CUDA=AUTO or ON) or pass CPU tensors");
#endif
}

}  // namespace modmoe
