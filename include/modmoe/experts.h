// Stage 3: the modular expert compute on already-dispatched tokens, plus the pieces it is
// made of (permute metadata, finalize). See docs/contract.md, "Stage 3".
#pragma once

#include <cstddef>
#include <cstdint>

#include "modmoe/tensor.h"

namespace modmoe {

// ---------------------------------------------------------------------------------------
// Expert placement
// ---------------------------------------------------------------------------------------

// Experts are split contiguously: this rank owns [local_expert_offset,
// local_expert_offset + num_local_experts). Any other id contributes nothing.
struct ExpertMap {
  int num_experts = 0;  // E, global
  int local_expert_offset = 0;
  int num_local_experts = 0;  // E_local

  static ExpertMap single(int num_experts) { return {num_experts, 0, num_experts}; }
  // Rank `ep_rank` of `ep_size`; num_experts must divide evenly.
  static ExpertMap for_rank(int num_experts, int ep_size, int ep_rank);
  bool is_local(int expert_idx) const {
    return expert_idx >= local_expert_offset &&
           expert_idx < local_expert_offset + num_local_experts;
  }
  void validate() const;
};

// ---------------------------------------------------------------------------------------
// Activation
// ---------------------------------------------------------------------------------------

enum class Activation : int {
  Swiglu,     // silu(gate) * up
  SwigluOai,  // gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit),
              //          act = g * sigmoid(alpha * g) * (u + beta)
  Geglu,      // gelu(gate) * up, exact (erf) gelu
  Relu2,      // relu(x)^2, not gated: w13 is [E_local, I, H]
};

const char* activation_name(Activation act);
inline bool is_gated(Activation act) { return act != Activation::Relu2; }

struct ActivationParams {
  Activation kind = Activation::Swiglu;
  // SwigluOai constants (gpt-oss defaults), used where no per-expert tensor is given.
  float alpha = 1.702f;
  float beta = 1.0f;
  float limit = 7.0f;
  TensorView alpha_per_expert;  // [E_local] fp32, optional
  TensorView beta_per_expert;   // [E_local] fp32, optional
  TensorView limit_per_expert;  // [E_local] fp32, optional
};

// ---------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------

// Which half of w13's 2I rows is the gate in the canonical layout.
enum class GateUpOrder : uint8_t {
  GateUp,  // vLLM: rows [0, I) gate, [I, 2I) up
  UpGate,  // FlashInfer / TRT-LLM: rows [0, I) up, [I, 2I) gate
};

enum class WeightLayout : uint8_t {
  Canonical,          // as a checkpoint stores it; `order` says where the gate is
  GateUpInterleaved,  // prepare_weights output: per expert, groups of `interleave_rows` gate
                      // rows then the same up rows: g0, u0, g1, u1, ... (g_i = gate rows
                      // [i*G, (i+1)*G)), so one GEMM1 tile holds matching gate and up columns
};

struct ExpertWeights {
  QuantScheme scheme = QuantScheme::None;
  WeightLayout layout = WeightLayout::Canonical;
  GateUpOrder order = GateUpOrder::GateUp;  // canonical order (kept after preparation)
  int interleave_rows = 0;                  // G, GateUpInterleaved only
  TensorView w13;  // [E_local, 2I, H] (gated) or [E_local, I, H] (Relu2); bf16, H contiguous
  TensorView w2;   // [E_local, H, I] bf16, I contiguous
  TensorView w13_bias;  // [E_local, 2I] (or [E_local, I]) fp32, optional, same row order as w13
  TensorView w2_bias;   // [E_local, H] fp32, optional
  // Quantized schemes only (see quant.h; NVFP4 packs w13/w2 as E2M1x2 with K/2 bytes per
  // row); undefined for QuantScheme::None.
  TensorView w13_scale;
  TensorView w2_scale;
  TensorView w13_global_scale;
  TensorView w2_global_scale;

  int64_t num_local_experts() const { return w2.size(0); }
  int64_t hidden() const { return w2.size(1); }
  // I, in values: E2M1x2 (NVFP4) stores two values per byte, so its w2 is [E_local, H, I/2].
  int64_t intermediate() const {
    return w2.dtype == DType::E2M1x2 ? 2 * w2.size(2) : w2.size(2);
  }
  // Row of w13 (within one expert) that holds gate row i, and up row i, in this layout.
  int64_t gate_row(int64_t i) const;
  int64_t up_row(int64_t i) const;
};

// ---------------------------------------------------------------------------------------
// The experts call
// ---------------------------------------------------------------------------------------

enum class InputFormat : uint8_t {
  Standard,  // hidden [M, H] with top-k ids and weights per row
  Batched,   // hidden [E_local, max_m, H] with expert_num_tokens [E_local] (low-latency a2a)
};

struct ExpertsInputs {
  // Standard: [M, H] bf16. Batched: [E_local, max_m, H] bf16. Rows 16-byte aligned.
  // FP8 weights (Fp8PerTensor, Fp8Block128): e4m3, with hidden_scale fp32: Fp8Block128
  // [M, H/128] (batched [E_local, max_m, H/128]); Fp8PerTensor [1] or one per row (quant.h).
  // NVFP4 weights (Nvfp4, W4A16): bf16, no hidden_scale.
  TensorView hidden;
  TensorView hidden_scale;  // quantized schemes only
  // Standard: [M, k] int32 global ids; or, when topk_weights is undefined, the packed form
  // (id << 16) | bf16_weight_bits with a signed 16-bit id.
  TensorView topk_ids;
  TensorView topk_weights;       // [M, k] fp32 or bf16; undefined when topk_ids is packed
  TensorView expert_num_tokens;  // Batched only: [E_local] int32, each <= max_m
  // Optional: [M, k, 2I] bf16 (gated; columns in the canonical `order` of the weights) or
  // [M, k, I] (Relu2), added in fp32 to the GEMM1 output before the activation.
  TensorView gemm1_lora_delta;

  InputFormat format() const {
    return hidden.ndim == 3 ? InputFormat::Batched : InputFormat::Standard;
  }
};

struct ExpertsOptions {
  ActivationParams activation;
  // true: write out [M, H], the weighted sum over local experts (contract "do_finalize").
  // false: write gemm2_out and the permutation metadata instead.
  bool do_finalize = true;
  // Llama4: scale the expert *input* by the routing weight (k must be 1); the output is
  // then unweighted. The scaled input is rounded to bf16 before GEMM1.
  bool apply_router_weight_on_input = false;
  // Round fp32 routing weights to bf16 first, to match kernels that keep bf16 weights.
  bool bf16_routing_weights = false;
  // FP8 fast accumulation (docs/fp8.md "FP8 fast accumulation"; cuBLASLt's FAST_ACCUM, CUTLASS's
  // FP8FastAccum). Fp8PerTensor only: GEMM1's dot over all of H is summed in the tensor cores'
  // FP8 accumulator, which on Hopper keeps only about 14 bits (not a full fp32 sum), then
  // multiplied once by (sx * sw), the scale product rounded first. GEMM2 and the rest of the
  // call are unchanged. Faster prefill (a 256-token GEMM1 tile); the error against the
  // promoted oracle grows with H (random inputs at H = 4096: GEMM1 rel L2 3.2e-3 instead of
  // 8.5e-4), while the error against float64 stays dominated by the FP8 quantization.
  // Where: on the GPU, the GEMM1s with more than 128 rows per expert (prefill; the 256-token
  // tile), deterministically from the call's sizes; smaller ones keep the default's promoted
  // GEMM1 (decode reads weights, the sum is not what limits it). The CPU backend sums every
  // row over all of K.
  // false (the default): the contract's numerics, every sum in fp32, the scales applied every
  // 128 of K. With another scheme: modmoe::Error (the other schemes have no fast mode).
  bool fp8_fast_accum = false;
};

// The outputs. Which ones must be defined depends on the mode; the others may stay undefined.
//   Standard, do_finalize = true:  out [M, H] bf16. The metadata views below are filled when
//                                  given (LoRA callers use them).
//   Standard, do_finalize = false: gemm2_out [M*k, H] bf16 (permuted, unweighted; rows
//                                  [0, P) written, P = expert_first_token_offset[E_local]),
//                                  expert_weights, expanded_idx_to_permuted_idx and
//                                  expert_first_token_offset.
//   Batched:                       gemm2_out [E_local, max_m, H] bf16, unweighted; rows past
//                                  expert_num_tokens[e] are written as zero. do_finalize must
//                                  be false: the rows carry no token identity.
struct ExpertsOutputs {
  TensorView out;                           // [M, H] bf16
  TensorView gemm2_out;                     // [M*k, H] or [E_local, max_m, H] bf16
  TensorView expert_weights;                // [M, k] fp32, the weights as applied, 0 if not local
  TensorView expanded_idx_to_permuted_idx;  // [M, k] int32, -1 where not local
  TensorView expert_first_token_offset;     // [E_local + 1] int64
  TensorView gemm1_activation_output;       // [M*k, I] bf16, permuted, optional
};

// Caller-owned scratch memory on the device of the tensors. The hot path never allocates.
struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;
};

// The problem, reduced to sizes: what the workspace and the kernel choice depend on.
struct ExpertsDesc {
  InputFormat format = InputFormat::Standard;
  int64_t num_tokens = 0;  // M (standard), or max_m (batched)
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int top_k = 0;  // standard only
  ExpertMap expert_map;
  Activation activation = Activation::Swiglu;
  QuantScheme scheme = QuantScheme::None;
  bool do_finalize = true;
  bool fp8_fast_accum = false;  // ExpertsOptions::fp8_fast_accum: Fp8PerTensor only

  void validate() const;
};

// Bytes of workspace `experts` needs for problems up to `desc` (same or fewer tokens).
size_t experts_workspace_size(const ExpertsDesc& desc);

// Builds the desc of a call; validates every argument and throws modmoe::Error naming the
// first bad one.
ExpertsDesc make_experts_desc(const ExpertsInputs& in, const ExpertWeights& weights,
                              const ExpertMap& map, const ExpertsOptions& options,
                              const ExpertsOutputs& out);

// The modular compute. Runs on the device of the tensors (CPU reference or CUDA).
void experts(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
             const ExpertsOptions& options, const ExpertsOutputs& out,
             const Workspace& workspace = {}, Stream stream = nullptr);

// ---------------------------------------------------------------------------------------
// The stages `experts` is made of, callable on their own
// ---------------------------------------------------------------------------------------

// Local permutation. Permuted rows are grouped by local expert; inside an expert's segment
// they are in ascending expanded index (token * k + j), so the order is deterministic.
struct PermuteMetadata {
  TensorView expert_first_token_offset;     // [E_local + 1] int64, exclusive prefix sum
  TensorView expanded_idx_to_permuted_idx;  // [M, k] int32, -1 where not local
  TensorView permuted_idx_to_expanded_idx;  // [M*k] int32; token = value / k; rows >= P: -1
};

size_t permute_workspace_size(int64_t num_tokens, int top_k, int num_local_experts);

// topk_ids: [M, k] int32, plain global ids or packed (set `packed`).
void permute(const TensorView& topk_ids, bool packed, const ExpertMap& map,
             const PermuteMetadata& out, const Workspace& workspace = {},
             Stream stream = nullptr);

// out[m] = sum over j in order with expanded_idx_to_permuted_idx[m, j] >= 0 of
//          expert_weights[m, j] * gemm2_out[permuted row], in fp32, cast once to bf16.
// gemm2_out: [>= P, H] bf16; expert_weights: [M, k] fp32; out: [M, H] bf16.
void finalize(const TensorView& gemm2_out, const TensorView& expert_weights,
              const TensorView& expanded_idx_to_permuted_idx, const TensorView& out,
              Stream stream = nullptr);

}  // namespace modmoe
