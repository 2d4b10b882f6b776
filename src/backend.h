// The two backends behind the public API: `reference` (plain C++ on the CPU, the oracle) and
// `cuda` (the GPU kernels). The public functions in src/api/ validate every argument and
// then call the backend that matches the tensors' device, so a backend may assume valid input.
// Both declare the same set of functions; a CPU-only build has no `cuda` definitions and
// src/api/ reports that plainly instead of calling them.
#pragma once

#include "modmoe/experts.h"
#include "modmoe/quant.h"
#include "modmoe/routing.h"

namespace modmoe {

#define MODMOE_BACKEND_FUNCTIONS                                                            \
  void route(const TensorView& logits, const TensorView& bias, const RoutingParams& params, \
             const TensorView& topk_ids, const TensorView& topk_weights, Stream stream);    \
  size_t permute_workspace_size(int64_t num_tokens, int top_k, int num_local_experts);      \
  void permute(const TensorView& topk_ids, bool packed, const ExpertMap& map,               \
               const PermuteMetadata& out, const Workspace& workspace, Stream stream);      \
  void finalize(const TensorView& gemm2_out, const TensorView& expert_weights,              \
                const TensorView& expanded_idx_to_permuted_idx, const TensorView& out,      \
                Stream stream);                                                             \
  size_t experts_workspace_size(const ExpertsDesc& desc);                                   \
  void experts(const ExpertsDesc& desc, const ExpertsInputs& in,                            \
               const ExpertWeights& weights, const ExpertMap& map,                          \
               const ExpertsOptions& options, const ExpertsOutputs& out,                    \
               const Workspace& workspace, Stream stream);                                  \
  void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,                        \
                       const PrepareWeightsOptions& options, Stream stream);

namespace reference {
MODMOE_BACKEND_FUNCTIONS
}  // namespace reference

namespace cuda {
MODMOE_BACKEND_FUNCTIONS
}  // namespace cuda

#undef MODMOE_BACKEND_FUNCTIONS

}  // namespace modmoe
