// The driver shared by the CPU references of the experts stage (experts.cpp: bf16,
// quant_experts.cpp: FP8, nvfp4_experts.cpp: W4A16): the stage fields every dtype has, the
// chunk of rows handed to a dtype's GEMM1 -> activation -> GEMM2, the permutation and finalize
// of the standard format and the per-expert loop of the batched format. Each dtype supplies
// only a callable `run_chunk(int e, const Rows& rows)` that reads the rows' inputs and computes
// their gemm2_out rows. Internal to src/reference/.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/activation_math.h"
#include "modmoe/error.h"
#include "reference/experts_common.h"

namespace modmoe::reference::detail {

// Rows of one expert computed together.
constexpr int64_t kRowChunk = 32;

// fp32 dot product with 8 independent partial sums combined pairwise (vectorisable, fixed
// order, so the same inputs always give the same bits). n is a multiple of 8 (H and I are
// multiples of 64, validated; FP8 blocks are 128 wide).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t i = 0; i < n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// What every dtype's stage holds: sizes, biases, row maps and activation constants.
struct StageCommon {
  int64_t hidden = 0;
  int64_t inter = 0;
  int64_t w13_rows = 0;  // 2I (gated) or I
  bool gated = true;
  const float* w13_bias = nullptr;  // [E_local, w13_rows] fp32 or null
  const float* w2_bias = nullptr;   // [E_local, H] fp32 or null
  std::vector<int64_t> gate_rows;   // [I]: w13 row (in one expert) of gate column i
  std::vector<int64_t> up_rows;     // [I]: w13 row of up column i (gated only)
  int64_t lora_cols = 0;            // 2I or I
  int64_t lora_gate_col = 0;        // canonical column of gate 0 in the LoRA delta
  int64_t lora_up_col = 0;          // canonical column of up 0 in the LoRA delta
  ActivationParams act;
  const float* alpha = nullptr;  // [E_local] fp32 or null
  const float* beta = nullptr;
  const float* limit = nullptr;
};

inline void init_stage_common(StageCommon& s, const ExpertWeights& w,
                              const ActivationParams& act) {
  s.hidden = w.hidden();
  s.inter = w.intermediate();
  s.gated = is_gated(act.kind);
  s.w13_rows = s.gated ? 2 * s.inter : s.inter;
  s.w13_bias = w.w13_bias.defined() ? w.w13_bias.ptr<const float>() : nullptr;
  s.w2_bias = w.w2_bias.defined() ? w.w2_bias.ptr<const float>() : nullptr;
  s.gate_rows.resize(static_cast<size_t>(s.inter));
  s.up_rows.resize(static_cast<size_t>(s.inter));
  for (int64_t i = 0; i < s.inter; ++i) {
    s.gate_rows[i] = s.gated ? w.gate_row(i) : i;
    s.up_rows[i] = s.gated ? w.up_row(i) : i;
  }
  s.lora_cols = s.w13_rows;
  const bool gate_first = w.order == GateUpOrder::GateUp;
  s.lora_gate_col = (s.gated && !gate_first) ? s.inter : 0;
  s.lora_up_col = gate_first ? s.inter : 0;
  s.act = act;
  s.alpha = act.alpha_per_expert.defined() ? act.alpha_per_expert.ptr<const float>() : nullptr;
  s.beta = act.beta_per_expert.defined() ? act.beta_per_expert.ptr<const float>() : nullptr;
  s.limit = act.limit_per_expert.defined() ? act.limit_per_expert.ptr<const float>() : nullptr;
}

// The activation constants of expert e and the GEMM1 epilogue of one column.
struct ExpertActivation {
  const StageCommon& s;
  const float* b13e;  // expert e's w13_bias or null
  float alpha, beta, limit;

  ExpertActivation(const StageCommon& stage, int e)
      : s(stage),
        b13e(stage.w13_bias ? stage.w13_bias + e * stage.w13_rows : nullptr),
        alpha(stage.alpha ? stage.alpha[e] : stage.act.alpha),
        beta(stage.beta ? stage.beta[e] : stage.act.beta),
        limit(stage.limit ? stage.limit[e] : stage.act.limit) {}

  // GEMM1 column i (gate, up as accumulated) + w13_bias + LoRA delta -> activation -> bf16.
  uint16_t operator()(int64_t i, float gate, float up, const uint16_t* lora) const {
    if (b13e) {
      gate += b13e[s.gate_rows[i]];
      if (s.gated) up += b13e[s.up_rows[i]];
    }
    if (lora) {
      gate += bf16_to_float(lora[s.lora_gate_col + i]);
      if (s.gated) up += bf16_to_float(lora[s.lora_up_col + i]);
    }
    return float_to_bf16_bits(act::apply_activation(s.act.kind, gate, up, alpha, beta, limit));
  }
};

// A bf16 input row in fp32; with the router weight on the input, bf16(float(x) * w).
inline void bf16_input_row(const uint16_t* src, int64_t n, bool scale, float w, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  if (scale) {
    for (int64_t i = 0; i < n; ++i) dst[i] = round_to_bf16(dst[i] * w);
  }
}

// Up to kRowChunk rows of one expert.
struct Rows {
  int64_t n = 0;
  int64_t row[kRowChunk];           // flat row of `hidden` (and of hidden_scale) holding the input
  float in_scale[kRowChunk];        // router weight applied to the input, if scale_input
  const uint16_t* lora[kRowChunk];  // LoRA delta rows [lora_cols] bf16, or null
  uint16_t* act_out[kRowChunk];     // gemm1_activation_output rows [I] bf16, or null
  uint16_t* y[kRowChunk];           // gemm2_out rows [H] bf16
  bool scale_input = false;
};

// Routing weight of one expanded index as given (fp32, bf16 or packed bf16).
inline float routing_weight(const ExpertsInputs& in, int64_t x) {
  if (!in.topk_weights.defined()) {
    const uint32_t v = static_cast<uint32_t>(in.topk_ids.ptr<const int32_t>()[x]);
    return bf16_to_float(static_cast<uint16_t>(v & 0xFFFFu));
  }
  if (in.topk_weights.dtype == DType::BF16) {
    return bf16_to_float(in.topk_weights.ptr<const uint16_t>()[x]);
  }
  return in.topk_weights.ptr<const float>()[x];
}

// Standard format: permutation, per-expert chunks of permuted rows, finalize.
template <class RunChunk>
void run_standard(const ExpertsInputs& in, const StageCommon& s, const ExpertMap& map,
                  const ExpertsOptions& options, const ExpertsOutputs& out,
                  RunChunk&& run_chunk) {
  const int64_t M = in.hidden.size(0), H = s.hidden, I = s.inter;
  const int k = static_cast<int>(in.topk_ids.size(1));
  const int num_local = map.num_local_experts;
  const bool packed = !in.topk_weights.defined();

  // Permutation metadata: into the caller's views when given, else into scratch.
  std::vector<int64_t> offsets_scratch;
  std::vector<int32_t> e2p_scratch;
  int64_t* offsets;
  if (out.expert_first_token_offset.defined()) {
    offsets = out.expert_first_token_offset.ptr<int64_t>();
  } else {
    offsets_scratch.resize(static_cast<size_t>(num_local + 1));
    offsets = offsets_scratch.data();
  }
  int32_t* e2p;
  if (out.expanded_idx_to_permuted_idx.defined()) {
    e2p = out.expanded_idx_to_permuted_idx.ptr<int32_t>();
  } else {
    e2p_scratch.resize(static_cast<size_t>(M * k));
    e2p = e2p_scratch.data();
  }
  std::vector<int32_t> p2e(static_cast<size_t>(M * k));  // [M*k] permuted -> expanded index
  build_permutation(in.topk_ids.ptr<const int32_t>(), packed, M, k, map, offsets, e2p,
                    p2e.data());
  const int64_t P = offsets[num_local];

  // Routing weights: `in_w` as given (bf16-rounded on request), `fin_w` as finalize applies
  // them: 1 when the weight went to the input, 0 where not local.
  std::vector<float> in_w(static_cast<size_t>(M * k)), fin_w(static_cast<size_t>(M * k));
  for (int64_t x = 0; x < M * k; ++x) {
    float w = routing_weight(in, x);
    if (options.bf16_routing_weights) w = round_to_bf16(w);
    in_w[x] = w;
    fin_w[x] = e2p[x] < 0 ? 0.0f : (options.apply_router_weight_on_input ? 1.0f : w);
  }
  if (out.expert_weights.defined()) {
    std::copy(fin_w.begin(), fin_w.end(), out.expert_weights.ptr<float>());
  }

  std::vector<uint16_t> g2_scratch;
  uint16_t* g2;  // [>= P, H] bf16
  if (out.gemm2_out.defined()) {
    g2 = out.gemm2_out.ptr<uint16_t>();
  } else {
    g2_scratch.resize(static_cast<size_t>(P * H));
    g2 = g2_scratch.data();
  }

  const auto* lora_base =
      in.gemm1_lora_delta.defined() ? in.gemm1_lora_delta.ptr<const uint16_t>() : nullptr;
  uint16_t* act_base = out.gemm1_activation_output.defined()
                           ? out.gemm1_activation_output.ptr<uint16_t>()
                           : nullptr;
  Rows rows;
  rows.scale_input = options.apply_router_weight_on_input;
  for (int e = 0; e < num_local; ++e) {
    for (int64_t p0 = offsets[e]; p0 < offsets[e + 1]; p0 += kRowChunk) {
      rows.n = std::min(kRowChunk, offsets[e + 1] - p0);
      for (int64_t r = 0; r < rows.n; ++r) {
        const int64_t p = p0 + r, x = p2e[p];
        rows.row[r] = x / k;
        rows.in_scale[r] = in_w[x];
        rows.lora[r] = lora_base ? lora_base + x * s.lora_cols : nullptr;
        rows.act_out[r] = act_base ? act_base + p * I : nullptr;
        rows.y[r] = g2 + p * H;
      }
      run_chunk(e, static_cast<const Rows&>(rows));
    }
  }

  if (options.do_finalize) {
    finalize_rows(g2, fin_w.data(), e2p, M, k, H, out.out.ptr<uint16_t>());
  }
}

// Batched format: hidden and gemm2_out are [E_local, max_m, H]; expert e's first
// expert_num_tokens[e] rows carry tokens, the rest of its gemm2_out rows are written as zero.
template <class RunChunk>
void run_batched(const ExpertsInputs& in, const StageCommon& s, const ExpertMap& map,
                 const ExpertsOutputs& out, RunChunk&& run_chunk) {
  const int64_t max_m = in.hidden.size(1), H = s.hidden;
  const auto* counts = in.expert_num_tokens.ptr<const int32_t>();  // [E_local]
  auto* y_base = out.gemm2_out.ptr<uint16_t>();                     // [E_local, max_m, H]
  Rows rows;
  for (int e = 0; e < map.num_local_experts; ++e) {
    const int64_t n = counts[e];
    for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
      rows.n = std::min(kRowChunk, n - r0);
      for (int64_t r = 0; r < rows.n; ++r) {
        const int64_t row = e * max_m + r0 + r;
        rows.row[r] = row;
        rows.in_scale[r] = 1.0f;  // unused: no router weight on the batched input
        rows.lora[r] = nullptr;
        rows.act_out[r] = nullptr;
        rows.y[r] = y_base + row * H;
      }
      run_chunk(e, static_cast<const Rows&>(rows));
    }
    std::fill(y_base + (e * max_m + n) * H, y_base + (e + 1) * max_m * H, uint16_t{0});
  }
}

// Either format. check_counts: validate expert_num_tokens against max_m first (the entry
// points whose checks in src/api do not).
template <class RunChunk>
void run_experts(const ExpertsDesc& desc, const ExpertsInputs& in, const StageCommon& s,
                 const ExpertMap& map, const ExpertsOptions& options, const ExpertsOutputs& out,
                 bool check_counts, RunChunk&& run_chunk) {
  if (desc.format != InputFormat::Batched) {
    run_standard(in, s, map, options, out, run_chunk);
    return;
  }
  if (check_counts) {
    const auto* counts = in.expert_num_tokens.ptr<const int32_t>();
    for (int e = 0; e < map.num_local_experts; ++e) {
      MODMOE_CHECK(counts[e] >= 0 && counts[e] <= desc.num_tokens, "argument ",
                   "'expert_num_tokens'[", e, "] = ", counts[e], ": expected in [0, max_m = ",
                   desc.num_tokens, "] (hidden.size(1))");
    }
  }
  run_batched(in, s, map, out, run_chunk);
}

}  // namespace modmoe::reference::detail
