// An in-process simulation of expert parallelism on the CPU: N ranks split the experts
// contiguously; dispatch, the experts of each rank, then combine, with the semantics of
// docs/contract.md "Stage 2". It is the oracle for the real all-to-all backends.
#pragma once

#include <vector>

#include "core/host_tensor.h"
#include "modmoe/experts.h"

namespace modmoe::reference {

struct EpRankTokens {
  TensorView hidden;        // [T_r, H] bf16, e4m3 [T_r, H] or E2M1x2 [T_r, H/2] (host)
  TensorView topk_ids;      // [T_r, k] int32 global ids
  TensorView topk_weights;  // [T_r, k] fp32
  // Quantized hidden only: e4m3 hidden: Fp8Block128 [T_r, H/128], Fp8PerTensor [T_r] (the
  // rank's scale per token) fp32; E2M1x2 hidden (Nvfp4): [T_r, H/16] e4m3 block scales.
  // Undefined for bf16.
  TensorView hidden_scale;
  // E2M1x2 hidden only: [T_r] fp32, each token's own global scale (docs/nvfp4.md, "Quantize
  // before dispatch"). Undefined otherwise.
  TensorView hidden_global;
};

// Quantize before dispatch (docs/fp8.md, docs/nvfp4.md): what one token adds to the dispatch
// under `scheme` (None = bf16 activations). Scales per token: Fp8Block128 H/128 (fp32),
// Fp8PerTensor 1 (fp32: the rank's dynamic scale, replicated per token so that rows from
// different ranks keep their own), Nvfp4 H/16 (e4m3 block scales; the per-token fp32 global
// travels besides), None 0.
int64_t ep_scales_per_token(QuantScheme scheme, int64_t hidden);
// Bytes per token of the dispatch payloads {hidden, its scales[, its global], topk_weights
// fp32}: None 2H + 4k; Fp8Block128 H + 4H/128 + 4k; Fp8PerTensor H + 4 + 4k; Nvfp4
// H/2 + H/16 + 4 + 4k. topk_ids (4k) travel besides.
size_t ep_payload_bytes_per_token(QuantScheme scheme, int64_t hidden, int top_k);

// A rank's bf16 tokens [T, H] (host) quantized for the dispatch with dynamic scales:
// Fp8Block128 / Fp8PerTensor (quantize_activations): e4m3 [T, H] and scales [T, H/128] or [T]
// (one scale over the rank's tokens, written once per token). Nvfp4 (quantize_nvfp4 with one
// global per row): E2M1x2 [T, H/2], e4m3 block scales [T, H/16] and hidden_global [T] fp32,
// each token quantized as a tensor of its own.
struct EpQuantized {
  HostTensor hidden, hidden_scale, hidden_global;
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
  HostTensor hidden;        // [ep_size, max_tokens, H] bf16 (or e4m3, or E2M1x2 H/2); padding rows zero
  HostTensor hidden_scale;  // quantized hidden only: [ep_size, max_tokens(, S)]; padding zero
  HostTensor hidden_global;  // E2M1x2 hidden only: [ep_size, max_tokens] fp32; padding zero
  HostTensor topk_ids;      // [ep_size, max_tokens, k] int32; padding rows -1
  HostTensor topk_weights;  // [ep_size, max_tokens, k] fp32; padding rows 0
  std::vector<int> recv_counts;  // [ep_size]
};

std::vector<EpReceived> ep_dispatch(const EpPlan& plan, const std::vector<EpRankTokens>& ranks);

// What the receiver of an NVFP4 dispatch hands to experts that take bf16 (W4A16, or identity):
// dequantize_nvfp4 of the received rows with their own globals, [ep_size * max_tokens, H]
// bf16; padding rows (zero codes, scales and globals) decode to zero.
HostTensor ep_dequantize_received(const EpReceived& rx);

// payloads[r]: [ep_size, max_tokens, H] bf16, rank r's rows for each source. Returns, per
// source rank s, out [T_s, H] bf16: the fp32 sum over r in rank order of the rows it sent,
// cast once. Tokens sent nowhere are zero.
std::vector<HostTensor> ep_combine(const EpPlan& plan, const std::vector<EpRankTokens>& ranks,
                                   const std::vector<HostTensor>& payloads);

// The whole layer: dispatch, on every rank `experts` (do_finalize) over its received rows
// with ExpertMap::for_rank and the rank's slice of `all_weights` (all E experts), writing
// straight into the combine payload, then combine. With FP8 weights every rank first quantizes
// its bf16 tokens (ep_quantize), and the e4m3 rows and their scales are what travel. With
// NVFP4 weights the tokens travel as NVFP4 (ep_quantize: packed rows, block scales, one global
// per token) and each receiver dequantizes them to bf16 (ep_dequantize_received) for the W4A16
// experts. `identity` (NVFP4 only, for the round-trip tests): the experts return their
// dequantized input rows unweighted instead of computing.

std::vector<HostTensor> ep_moe_layer(const std::vector<EpRankTokens>& ranks,
                                     const ExpertWeights& all_weights, int num_experts,
                                     int ep_size, int max_tokens, const ExpertsOptions& options,
                                     bool identity = false);

// The slice of experts [first, first + count) of `w` (views into it): every per-expert tensor,
// weights, biases and scales, in any layout.
ExpertWeights slice_experts(const ExpertWeights& w, int64_t first, int64_t count);

}  // namespace modmoe::reference
