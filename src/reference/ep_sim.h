// An in-process simulation of expert parallelism on the CPU: N ranks split the experts
// contiguously; dispatch, the experts of each rank, then combine, with the semantics of
// docs/contract.md "Stage 2". It is the oracle for the real all-to-all backends.
#pragma once

#include <vector>

#include "core/host_tensor.h"
#include "modmoe/experts.h"

namespace modmoe::reference {

struct EpRankTokens {
  TensorView hidden;        // [T_r, H] bf16, or e4m3 with hidden_scale (host)
  TensorView topk_ids;      // [T_r, k] int32 global ids
  TensorView topk_weights;  // [T_r, k] fp32
  // e4m3 hidden only: Fp8Block128 [T_r, H/128], Fp8PerTensor [T_r] (the rank's scale per
  // token) fp32; undefined for bf16.
  TensorView hidden_scale;
};

// Quantize before dispatch (docs/fp8.md): what one token adds to the dispatch under `scheme`
// (None = bf16 activations). Scales per token: Fp8Block128 H/128, Fp8PerTensor 1 (the rank's
// dynamic scale, replicated per token so that rows from different ranks keep their own), None 0.
int64_t ep_scales_per_token(QuantScheme scheme, int64_t hidden);
// Bytes per token of the dispatch payloads {hidden, its scales, topk_weights fp32}: None
// 2H + 4k; Fp8Block128 H + 4H/128 + 4k; Fp8PerTensor H + 4 + 4k. topk_ids (4k) travel besides.
size_t ep_payload_bytes_per_token(QuantScheme scheme, int64_t hidden, int top_k);

// A rank's bf16 tokens [T, H] (host) quantized for the dispatch with dynamic scales
// (quantize_activations): e4m3 [T, H] and scales [T, H/128] (Fp8Block128) or [T] (Fp8PerTensor:
// one scale over the rank's tokens, written once per token).
struct EpQuantized {
  HostTensor hidden, hidden_scale;
};
EpQuantized ep_quantize(const TensorView& hidden, QuantScheme scheme);

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
  HostTensor hidden;        // [ep_size, max_tokens, H] bf16 (or e4m3); padding rows zero
  HostTensor hidden_scale;  // e4m3 hidden only: [ep_size, max_tokens(, H/128)]; padding zero
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
// with ExpertMap::for_rank and the rank's slice of `all_weights` (all E experts), writing
// straight into the combine payload, then combine. With FP8 weights every rank first quantizes
// its bf16 tokens (ep_quantize), and the e4m3 rows and their scales are what travel.
std::vector<HostTensor> ep_moe_layer(const std::vector<EpRankTokens>& ranks,
                                     const ExpertWeights& all_weights, int num_experts,
                                     int ep_size, int max_tokens, const ExpertsOptions& options);

// The slice of experts [first, first + count) of `w` (views into it): every per-expert tensor,
// weights, biases and scales, in any layout.
ExpertWeights slice_experts(const ExpertWeights& w, int64_t first, int64_t count);

}  // namespace modmoe::reference
