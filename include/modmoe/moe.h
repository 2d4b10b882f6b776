// The monolithic fused MoE: routing followed by the experts with finalize. At ep_size == 1
// its output is bitwise equal to calling route() then experts() (docs/contract.md,
// "Monolithic").
#pragma once

#include "modmoe/experts.h"
#include "modmoe/routing.h"

namespace modmoe {

// Workspace for fused_moe over up to `num_tokens` tokens: the routing result plus what
// experts() needs (plus, with FP8 weights, the quantized hidden and its scales).
size_t fused_moe_workspace_size(int64_t num_tokens, const ExpertWeights& weights,
                                const RoutingParams& routing, const ExpertMap& map,
                                const ExpertsOptions& options);

// logits: [T, E] fp32|bf16; bias: [E] optional; hidden: [T, H] bf16; out: [T, H] bf16.
// options.do_finalize must be true. topk_ids/topk_weights: optional [T, k] int32/fp32 views
// that receive the routing result (the workspace holds it otherwise).
// FP8 weights (Fp8PerTensor, Fp8Block128; CPU, or CUDA on sm_90): hidden stays bf16 and is
// quantized into the workspace with quantize_activations (dynamic scales of the weights'
// scheme) after routing: bitwise equal to route() -> quantize_activations() -> experts(),
// options.fp8_fast_accum (fp8-tensor only) included.
// NVFP4 weights (W4A16; CPU tensors for now): hidden stays bf16 and goes to experts() as it
// is: bitwise equal to route() -> experts().
void fused_moe(const TensorView& logits, const TensorView& bias, const TensorView& hidden,
               const ExpertWeights& weights, const RoutingParams& routing,
               const ExpertMap& map, const ExpertsOptions& options, const TensorView& out,
               const Workspace& workspace = {}, Stream stream = nullptr,
               const TensorView& topk_ids = {}, const TensorView& topk_weights = {});

}  // namespace modmoe
