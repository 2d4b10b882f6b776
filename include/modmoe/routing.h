// Stage 1: routing. logits -> (topk_ids, topk_weights). See docs/contract.md, "Stage 1".
#pragma once

#include "modmoe/tensor.h"

namespace modmoe {

// Numbered as FlashInfer numbers RoutingMethodType, so callers can pass the same integer.
enum class RoutingMethod : int {
  Default = 0,           // softmax over all E, then top-k; weights not renormalised
  Renormalize = 1,       // top-k of the logits, then softmax over the k picks
  DeepSeekV3 = 2,        // sigmoid, +bias for selection, grouped top-k, renormalise, scale
  Llama4 = 3,            // top-1, weight = sigmoid(logit); k must be 1
  RenormalizeNaive = 4,  // softmax over all E, top-k, divide by the sum of the k
  TopK = 5,              // top-k of the logits; weights are the raw logits
};

const char* routing_method_name(RoutingMethod method);

struct RoutingParams {
  RoutingMethod method = RoutingMethod::Default;
  int num_experts = 0;  // E, global
  int top_k = 0;
  int n_group = 0;     // DeepSeekV3 only: groups of E / n_group contiguous experts
  int topk_group = 0;  // DeepSeekV3 only: groups kept
  float routed_scaling_factor = 1.0f;  // DeepSeekV3 only; a float32 multiply
  // DeepSeekV3 only: renormalise the k unbiased scores to sum 1 before scaling. The other
  // methods define their own normalisation and ignore it.
  bool norm_topk_prob = true;

  // Throws modmoe::Error naming the first bad field.
  void validate() const;
};

// logits:       [T, E] fp32 or bf16
// bias:         [E] fp32 or bf16, optional (DeepSeekV3 selection bias); undefined view if absent
// topk_ids:     [T, k] int32, written; global expert ids
// topk_weights: [T, k] fp32, written
// Runs on the device of the tensors: the CPU reference for CPU views, CUDA kernels for CUDA
// views (asynchronous on `stream`, no host synchronisation). Ties break toward the lower id.
void route(const TensorView& logits, const TensorView& bias, const RoutingParams& params,
           const TensorView& topk_ids, const TensorView& topk_weights, Stream stream = nullptr);

}  // namespace modmoe
