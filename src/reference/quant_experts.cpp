// CPU reference of the FP8 experts stage (Fp8PerTensor, Fp8Block128): the oracle the FP8
// grouped GEMMs will be compared to, bit for bit on inputs whose products and sums are exact.
// docs/fp8.md, "Experts", step by step:
//   GEMM1: per 128-wide K block kb, part = dot(x_q, w_q) over the block in fp32;
//          acc = fma(part, sx[kb] * sw[kb], acc)          (scales applied every 128 of K)
//          + w13_bias + LoRA delta -> activation (fp32) -> bf16
//   the bf16 row re-quantized to e4m3 with 1x128 scales (= quantize_activations, Fp8Block128)
//   GEMM2: the same block loop over I with the intermediate's scales -> + w2_bias -> bf16
//   finalize: as bf16 (fp32 sum over j in order, cast once).
// Per-tensor scales are the same loop with one scale for every block.
#include <algorithm>
#include <cmath>
#include <vector>

#include "api/quant_check.h"
// NOTE: activation_math.h before fp8.h: it defines MODMOE_HD unguarded (fp8.h's guard keeps it).
#include "core/activation_math.h"
#include "core/fp8.h"
#include "modmoe/error.h"
#include "reference/experts_common.h"
#include "reference/quant.h"

namespace modmoe::reference {
namespace {

using detail::bf16_to_float;
constexpr int64_t kBlock = fp8::kBlock;
constexpr int64_t kRowChunk = 32;

void decode_row(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp8::e4m3_to_float(src[i]);
}

// fp32 dot product of one 128-wide block: 8 independent partial sums, combined pairwise.
float dot_block(const float* a, const float* b) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t i = 0; i < kBlock; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum over blocks kb of dot_block * (sa[kb * sa_step] * sb[kb * sb_step]), fused per block.
float scaled_dot(const float* a, const float* b, int64_t k, const float* sa, int64_t sa_step,
                 const float* sb, int64_t sb_step) {
  float acc = 0.0f;
  for (int64_t kb = 0; kb < k / kBlock; ++kb) {
    const float part = dot_block(a + kb * kBlock, b + kb * kBlock);
    acc = std::fma(part, sa[kb * sa_step] * sb[kb * sb_step], acc);
  }
  return acc;
}

struct Stage {
  int64_t hidden = 0, inter = 0, w13_rows = 0;
  bool gated = true, block = true;
  const uint8_t* w13 = nullptr;        // [E_local, w13_rows, H] e4m3
  const uint8_t* w2 = nullptr;         // [E_local, H, I] e4m3
  const float* w13_scale = nullptr;    // [E_local] or [E_local, w13_rows/128, H/128]
  const float* w2_scale = nullptr;     // [E_local] or [E_local, H/128, I/128]
  const float* w13_bias = nullptr;     // [E_local, w13_rows] or null
  const float* w2_bias = nullptr;      // [E_local, H] or null
  std::vector<int64_t> gate_rows, up_rows;          // [I] w13 row of gate / up column i
  std::vector<int64_t> gate_blocks, up_blocks;      // [I] their w13_scale block rows
  int64_t lora_cols = 0, lora_gate_col = 0, lora_up_col = 0;
  ActivationParams act;
  const float *alpha = nullptr, *beta = nullptr, *limit = nullptr;

  // Scales of w13 row block `rb` (Fp8Block128) of expert e, and the step between K blocks.
  const float* w13_scales(int e, int64_t rb, int64_t* step) const {
    *step = block ? 1 : 0;
    if (!block) return w13_scale + e;
    return w13_scale + (e * (w13_rows / kBlock) + rb) * (hidden / kBlock);
  }
  const float* w2_scales(int e, int64_t h, int64_t* step) const {
    *step = block ? 1 : 0;
    if (!block) return w2_scale + e;
    return w2_scale + (e * (hidden / kBlock) + h / kBlock) * (inter / kBlock);
  }
};

Stage make_stage(const ExpertWeights& w, const ActivationParams& act) {
  Stage s;
  s.hidden = w.hidden();
  s.inter = w.intermediate();
  s.gated = is_gated(act.kind);
  s.block = w.scheme == QuantScheme::Fp8Block128;
  s.w13_rows = s.gated ? 2 * s.inter : s.inter;
  s.w13 = w.w13.ptr<const uint8_t>();
  s.w2 = w.w2.ptr<const uint8_t>();
  s.w13_scale = w.w13_scale.ptr<const float>();
  s.w2_scale = w.w2_scale.ptr<const float>();
  s.w13_bias = w.w13_bias.defined() ? w.w13_bias.ptr<const float>() : nullptr;
  s.w2_bias = w.w2_bias.defined() ? w.w2_bias.ptr<const float>() : nullptr;
  const auto n = static_cast<size_t>(s.inter);
  s.gate_rows.resize(n);
  s.up_rows.resize(n);
  s.gate_blocks.resize(n);
  s.up_blocks.resize(n);
  for (int64_t i = 0; i < s.inter; ++i) {
    s.gate_rows[i] = s.gated ? w.gate_row(i) : i;
    s.up_rows[i] = s.gated ? w.up_row(i) : i;
    s.gate_blocks[i] = s.block ? w13_scale_row_block(w, s.gate_rows[i]) : 0;
    s.up_blocks[i] = s.block ? w13_scale_row_block(w, s.up_rows[i]) : 0;
  }
  s.lora_cols = s.w13_rows;
  const bool gate_first = w.order == GateUpOrder::GateUp;
  s.lora_gate_col = (s.gated && !gate_first) ? s.inter : 0;
  s.lora_up_col = gate_first ? s.inter : 0;
  s.act = act;
  s.alpha = act.alpha_per_expert.defined() ? act.alpha_per_expert.ptr<const float>() : nullptr;
  s.beta = act.beta_per_expert.defined() ? act.beta_per_expert.ptr<const float>() : nullptr;
  s.limit = act.limit_per_expert.defined() ? act.limit_per_expert.ptr<const float>() : nullptr;
  return s;
}

// Up to kRowChunk rows of one expert.
struct Rows {
  int64_t n = 0;
  const uint8_t* x[kRowChunk];       // input rows [H] e4m3
  const float* x_scale[kRowChunk];   // [H/128] (step 1) or one scale (step 0)
  int64_t x_scale_step = 1;
  float in_scale[kRowChunk];         // router weight folded into the input scales, if scale_input
  const uint16_t* lora[kRowChunk];   // [lora_cols] bf16 or null
  uint16_t* act_out[kRowChunk];      // [I] bf16 or null
  uint16_t* y[kRowChunk];            // [H] bf16
  bool scale_input = false;
};

struct Scratch {
  std::vector<float> x;          // [kRowChunk, H] decoded inputs
  std::vector<float> x_scale;    // [kRowChunk, H/128] input scales (router weight folded in)
  std::vector<uint16_t> act;     // [kRowChunk, I] bf16 activations
  std::vector<float> act_q;      // [kRowChunk, I] decoded re-quantized activations
  std::vector<float> act_scale;  // [kRowChunk, I/128]
  std::vector<uint8_t> q_tmp;    // [128]
  std::vector<float> w_a, w_b;   // [max(H, I)] decoded weight rows
  Scratch(int64_t H, int64_t I)
      : x(static_cast<size_t>(kRowChunk * H)),
        x_scale(static_cast<size_t>(kRowChunk * (H / kBlock))),
        act(static_cast<size_t>(kRowChunk * I)),
        act_q(static_cast<size_t>(kRowChunk * I)),
        act_scale(static_cast<size_t>(kRowChunk * (I / kBlock))),
        q_tmp(static_cast<size_t>(kBlock)),
        w_a(static_cast<size_t>(std::max(H, I))),
        w_b(static_cast<size_t>(std::max(H, I))) {}
};

void run_rows(const Stage& s, int e, const Rows& rows, Scratch& scr) {
  const int64_t H = s.hidden, I = s.inter, HB = H / kBlock, IB = I / kBlock;
  const float alpha = s.alpha ? s.alpha[e] : s.act.alpha;
  const float beta = s.beta ? s.beta[e] : s.act.beta;
  const float limit = s.limit ? s.limit[e] : s.act.limit;

  // Inputs: decoded e4m3 and their per-block scales; apply_router_weight_on_input multiplies
  // the scales by the weight (fp32), which is the input x * w without re-quantizing it.
  for (int64_t r = 0; r < rows.n; ++r) {
    decode_row(rows.x[r], H, scr.x.data() + r * H);
    for (int64_t kb = 0; kb < HB; ++kb) {
      const float sx = rows.x_scale[r][kb * rows.x_scale_step];
      scr.x_scale[r * HB + kb] = rows.scale_input ? sx * rows.in_scale[r] : sx;
    }
  }

  // GEMM1 + bias + LoRA + activation -> bf16.
  const uint8_t* w13e = s.w13 + e * s.w13_rows * H;
  const float* b13e = s.w13_bias ? s.w13_bias + e * s.w13_rows : nullptr;
  for (int64_t i = 0; i < I; ++i) {
    int64_t gstep = 0, ustep = 0;
    const float* gs = s.w13_scales(e, s.gate_blocks[i], &gstep);
    const float* us = s.w13_scales(e, s.up_blocks[i], &ustep);
    decode_row(w13e + s.gate_rows[i] * H, H, scr.w_a.data());
    if (s.gated) decode_row(w13e + s.up_rows[i] * H, H, scr.w_b.data());
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* xr = scr.x.data() + r * H;
      const float* sx = scr.x_scale.data() + r * HB;
      float gate = scaled_dot(xr, scr.w_a.data(), H, sx, 1, gs, gstep);
      float up = s.gated ? scaled_dot(xr, scr.w_b.data(), H, sx, 1, us, ustep) : 0.0f;
      if (b13e) {
        gate += b13e[s.gate_rows[i]];
        if (s.gated) up += b13e[s.up_rows[i]];
      }
      if (rows.lora[r]) {
        gate += bf16_to_float(rows.lora[r][s.lora_gate_col + i]);
        if (s.gated) up += bf16_to_float(rows.lora[r][s.lora_up_col + i]);
      }
      const uint16_t a =
          float_to_bf16_bits(act::apply_activation(s.act.kind, gate, up, alpha, beta, limit));
      scr.act[r * I + i] = a;
      if (rows.act_out[r]) rows.act_out[r][i] = a;
    }
  }

  // The GEMM2 input: each bf16 row re-quantized with 1x128 groups, then decoded.
  for (int64_t r = 0; r < rows.n; ++r) {
    for (int64_t ib = 0; ib < IB; ++ib) {
      scr.act_scale[r * IB + ib] =
          detail::quantize_group_128(scr.act.data() + r * I + ib * kBlock, scr.q_tmp.data());
      decode_row(scr.q_tmp.data(), kBlock, scr.act_q.data() + r * I + ib * kBlock);
    }
  }

  // GEMM2 + bias -> bf16.
  const uint8_t* w2e = s.w2 + e * H * I;
  const float* b2e = s.w2_bias ? s.w2_bias + e * H : nullptr;
  for (int64_t h = 0; h < H; ++h) {
    int64_t step = 0;
    const float* ws = s.w2_scales(e, h, &step);
    decode_row(w2e + h * I, I, scr.w_a.data());
    for (int64_t r = 0; r < rows.n; ++r) {
      float y = scaled_dot(scr.act_q.data() + r * I, scr.w_a.data(), I,
                           scr.act_scale.data() + r * IB, 1, ws, step);
      if (b2e) y += b2e[h];
      rows.y[r][h] = float_to_bf16_bits(y);
    }
  }
}

float routing_weight(const ExpertsInputs& in, int64_t x) {
  if (!in.topk_weights.defined()) {
    const uint32_t v = static_cast<uint32_t>(in.topk_ids.ptr<const int32_t>()[x]);
    return bf16_to_float(static_cast<uint16_t>(v & 0xFFFFu));
  }
  if (in.topk_weights.dtype == DType::BF16) {
    return bf16_to_float(in.topk_weights.ptr<const uint16_t>()[x]);
  }
  return in.topk_weights.ptr<const float>()[x];
}

// The scales of hidden row `row` (a flat row index): a pointer and its step between blocks.
const float* row_scale(const ExpertsInputs& in, bool block, int64_t row, int64_t H,
                       int64_t* step) {
  const float* hs = in.hidden_scale.ptr<const float>();
  if (block) {
    *step = 1;
    return hs + row * (H / kBlock);
  }
  *step = 0;
  const bool single = in.hidden_scale.ndim == 1 && in.hidden_scale.size(0) == 1;
  return single ? hs : hs + row;
}

void run_standard(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                  const ExpertsOptions& options, const ExpertsOutputs& out) {
  const Stage s = make_stage(weights, options.activation);
  const int64_t M = in.hidden.size(0), H = s.hidden, I = s.inter;
  const int k = static_cast<int>(in.topk_ids.size(1));
  const int num_local = map.num_local_experts;
  const bool packed = !in.topk_weights.defined();

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
  std::vector<int32_t> p2e(static_cast<size_t>(M * k));
  detail::build_permutation(in.topk_ids.ptr<const int32_t>(), packed, M, k, map, offsets, e2p,
                            p2e.data());
  const int64_t P = offsets[num_local];

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

  const bool block = s.block;
  const auto* x_base = in.hidden.ptr<const uint8_t>();
  const auto* lora_base =
      in.gemm1_lora_delta.defined() ? in.gemm1_lora_delta.ptr<const uint16_t>() : nullptr;
  uint16_t* act_base = out.gemm1_activation_output.defined()
                           ? out.gemm1_activation_output.ptr<uint16_t>()
                           : nullptr;
  Scratch scr(H, I);
  Rows rows;
  rows.scale_input = options.apply_router_weight_on_input;
  for (int e = 0; e < num_local; ++e) {
    for (int64_t p0 = offsets[e]; p0 < offsets[e + 1]; p0 += kRowChunk) {
      rows.n = std::min(kRowChunk, offsets[e + 1] - p0);
      for (int64_t r = 0; r < rows.n; ++r) {
        const int64_t p = p0 + r, x = p2e[p], m = x / k;
        rows.x[r] = x_base + m * H;
        rows.x_scale[r] = row_scale(in, block, m, H, &rows.x_scale_step);
        rows.in_scale[r] = in_w[x];
        rows.lora[r] = lora_base ? lora_base + x * s.lora_cols : nullptr;
        rows.act_out[r] = act_base ? act_base + p * I : nullptr;
        rows.y[r] = g2 + p * H;
      }
      run_rows(s, e, rows, scr);
    }
  }
  if (options.do_finalize) {
    detail::finalize_rows(g2, fin_w.data(), e2p, M, k, H, out.out.ptr<uint16_t>());
  }
}

void run_batched(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                 const ExpertsOptions& options, const ExpertsOutputs& out) {
  const Stage s = make_stage(weights, options.activation);
  const int64_t max_m = in.hidden.size(1), H = s.hidden;
  const auto* counts = in.expert_num_tokens.ptr<const int32_t>();  // [E_local]
  const auto* x_base = in.hidden.ptr<const uint8_t>();              // [E_local, max_m, H]
  auto* y_base = out.gemm2_out.ptr<uint16_t>();                     // [E_local, max_m, H]
  Scratch scr(H, s.inter);
  Rows rows;
  for (int e = 0; e < map.num_local_experts; ++e) {
    const int64_t n = counts[e];
    for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
      rows.n = std::min(kRowChunk, n - r0);
      for (int64_t r = 0; r < rows.n; ++r) {
        const int64_t row = e * max_m + r0 + r;
        rows.x[r] = x_base + row * H;
        rows.x_scale[r] = row_scale(in, s.block, row, H, &rows.x_scale_step);
        rows.lora[r] = nullptr;
        rows.act_out[r] = nullptr;
        rows.y[r] = y_base + row * H;
      }
      run_rows(s, e, rows, scr);
    }
    std::fill(y_base + (e * max_m + n) * H, y_base + (e + 1) * max_m * H, uint16_t{0});
  }
}

}  // namespace

void experts_fp8(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                 const ExpertsOptions& options, const ExpertsOutputs& out) {
  const ExpertsDesc desc = api::check_fp8_experts(in, weights, map, options, out);
  MODMOE_CHECK(!in.hidden.device.is_cuda(), "reference::experts_fp8: the tensors are on ",
               in.hidden.device.to_string(), ": expected CPU tensors");
  if (desc.format == InputFormat::Batched) {
    const auto* counts = in.expert_num_tokens.ptr<const int32_t>();
    for (int e = 0; e < map.num_local_experts; ++e) {
      MODMOE_CHECK(counts[e] >= 0 && counts[e] <= desc.num_tokens, "argument ",
                   "'expert_num_tokens'[", e, "] = ", counts[e], ": expected in [0, max_m = ",
                   desc.num_tokens, "] (hidden.size(1))");
    }
    run_batched(in, weights, map, options, out);
  } else {
    run_standard(in, weights, map, options, out);
  }
}

}  // namespace modmoe::reference
