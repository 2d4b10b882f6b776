// An in-process simulation of expert parallelism on the CPU: N ranks split the experts
// contiguously; dispatch, the experts of each rank, then combine, with the semantics of
// docs/contract.md "Stage 2". It is the oracle for the real all-to-all backends.
#pragma once

#include <vector>

#include "core/host_tensor.h"
#include "modmoe/experts.h"

namespace modmoe::reference {

struct EpRankTokens {
  TensorView hidden;        // [T_r, H] bf16 (host)
  TensorView topk_ids;      // [T_r, k] int32 global ids
  TensorView topk_weights;  // [T_r, k] fp32
};

// Who sends what where. A token goes once to each distinct rank that owns one of its experts.
struct EpPlan {
  int ep_size = 0;
  int num_experts = 0;
  int max_tokens = 0;
  // sent[s][r]: the token indices of source rank s sent to rank r, ascending.
  std::vector<std::vector<std::vector<int>>> sent;
  // slot[s][r][t]: row of token t of rank s in rank r's receive block from s, or -1.
  std::vector<std::vector<std::vector<int>>> slot;

  int owner(int expert_idx) const { return expert_idx / (num_experts / ep_size); }
};

// Throws modmoe::Error when a rank would receive more than max_tokens rows from one source.
EpPlan ep_plan(const std::vector<EpRankTokens>& ranks, int num_experts, int ep_size, int max_tokens);

// What rank r received: rows [s, i] = the i-th token received from rank s, in source order.
struct EpReceived {
  HostTensor hidden;        // [ep_size, max_tokens, H] bf16; padding rows zero
  HostTensor topk_ids;      // [ep_size, max_tokens, k] int32; padding rows -1
  HostTensor topk_weights;  // [ep_size, max_tokens, k] fp32; padding rows 0
  std::vector<int> recv_counts;  // [ep_size]
};

std::vector<EpReceived> ep_dispatch(const EpPlan& plan, const std::vector<EpRankTokens>& ranks);

// payloads[r]: [ep_size, max_tokens, H] bf16, rank r's rows for each source. Returns, per
// source rank s, out [T_s, H] bf16: the fp32 sum over r in rank order of the rows it sent,
// cast once. Tokens sent nowhere are zero.
std::vector<HostTensor> ep_combine(const EpPlan& plan, const std::vector<EpRankTokens>& ranks,
                                   const std::vector<HostTensor>& payloads);

// The whole layer: dispatch, on every rank `experts` (do_finalize) over its received rows
// with ExpertMap::for_rank and the rank's slice of `all_weights` (canonical, all E experts),
// writing straight into the combine payload, then combine.
std::vector<HostTensor> ep_moe_layer(const std::vector<EpRankTokens>& ranks,
                                     const ExpertWeights& all_weights, int num_experts,
                                     int ep_size, int max_tokens, const ExpertsOptions& options);

// The slice of experts [first, first + count) of canonical weights (views into `w`).
ExpertWeights slice_experts(const ExpertWeights& w, int64_t first, int64_t count);

}  // namespace modmoe::reference
