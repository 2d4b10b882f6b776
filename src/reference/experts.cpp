// CPU reference of the experts stage: the oracle the CUDA kernels are compared to, bit for
// bit on small-integer inputs. Follows docs/HELPERS.md "Numerics" step by step:
//   GEMM1 (fp32 acc) + w13_bias + LoRA delta -> activation (fp32) -> bf16
//   GEMM2 (fp32 acc) + w2_bias -> bf16 = gemm2_out (permuted, unweighted)
//   finalize: fp32 sum over j in order of w_j * row, cast once.
// Arguments were validated by src/api/experts.cpp.
#include <algorithm>
#include <vector>

#include "backend.h"
#include "core/activation_math.h"
#include "core/host_tensor.h"
#include "reference/experts_common.h"

namespace modmoe::reference {
namespace {

using detail::bf16_to_float;

// Rows of one expert computed together: each weight row is converted to fp32 once per chunk
// and then dotted with every row of the chunk (both K-contiguous).
constexpr int64_t kRowChunk = 32;

void bf16_row_to_float(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// fp32 dot product with 8 independent partial sums (vectorisable, fixed order, so the same
// inputs always give the same bits). n is a multiple of 64 (validated).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) acc[i % 8] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// What every row of every expert needs: weight pointers, row maps and activation constants.
struct Stage {
  int64_t hidden = 0;
  int64_t inter = 0;
  int64_t w13_rows = 0;  // 2I (gated) or I
  bool gated = true;
  const uint16_t* w13 = nullptr;    // [E_local, w13_rows, H] bf16
  const uint16_t* w2 = nullptr;     // [E_local, H, I] bf16
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

Stage make_stage(const ExpertWeights& w, const ActivationParams& act) {
  Stage s;
  s.hidden = w.hidden();
  s.inter = w.intermediate();
  s.gated = is_gated(act.kind);
  s.w13_rows = s.gated ? 2 * s.inter : s.inter;
  s.w13 = w.w13.ptr<const uint16_t>();
  s.w2 = w.w2.ptr<const uint16_t>();
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
  return s;
}

// Up to kRowChunk rows of one expert.
struct Rows {
  int64_t n = 0;
  const uint16_t* x[kRowChunk];        // input rows [H] bf16
  float in_scale[kRowChunk];           // router weight applied to the input, if scale_input
  const uint16_t* lora[kRowChunk];     // LoRA delta rows [lora_cols] bf16, or null
  uint16_t* act_out[kRowChunk];        // gemm1_activation_output rows [I] bf16, or null
  uint16_t* y[kRowChunk];              // gemm2_out rows [H] bf16
  bool scale_input = false;
};

// Scratch of one run, sized once.
struct Scratch {
  std::vector<float> x;      // [kRowChunk, H] fp32 inputs
  std::vector<float> act;    // [kRowChunk, I] fp32 activations (already bf16-rounded)
  std::vector<float> w_a;    // [max(H, I)] one weight row in fp32
  std::vector<float> w_b;    // [H] the matching up row
  Scratch(int64_t hidden, int64_t inter)
      : x(static_cast<size_t>(kRowChunk * hidden)),
        act(static_cast<size_t>(kRowChunk * inter)),
        w_a(static_cast<size_t>(std::max(hidden, inter))),
        w_b(static_cast<size_t>(hidden)) {}
};

void run_rows(const Stage& s, int e, const Rows& rows, Scratch& scr) {
  const int64_t H = s.hidden;
  const int64_t I = s.inter;
  const float alpha = s.alpha ? s.alpha[e] : s.act.alpha;
  const float beta = s.beta ? s.beta[e] : s.act.beta;
  const float limit = s.limit ? s.limit[e] : s.act.limit;

  // GEMM1 input: bf16 -> fp32; with the router weight on the input, bf16(float(x) * w).
  for (int64_t r = 0; r < rows.n; ++r) {
    float* xr = scr.x.data() + r * H;
    bf16_row_to_float(rows.x[r], H, xr);
    if (rows.scale_input) {
      for (int64_t h = 0; h < H; ++h) xr[h] = round_to_bf16(xr[h] * rows.in_scale[r]);
    }
  }

  // GEMM1 + bias + LoRA + activation, column by column.
  const uint16_t* w13e = s.w13 + e * s.w13_rows * H;
  const float* b13e = s.w13_bias ? s.w13_bias + e * s.w13_rows : nullptr;
  for (int64_t i = 0; i < I; ++i) {
    bf16_row_to_float(w13e + s.gate_rows[i] * H, H, scr.w_a.data());
    if (s.gated) bf16_row_to_float(w13e + s.up_rows[i] * H, H, scr.w_b.data());
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* xr = scr.x.data() + r * H;
      float gate = dot(xr, scr.w_a.data(), H);
      float up = s.gated ? dot(xr, scr.w_b.data(), H) : 0.0f;
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
      scr.act[r * I + i] = bf16_to_float(a);
      if (rows.act_out[r]) rows.act_out[r][i] = a;
    }
  }

  // GEMM2 + bias -> bf16, row by row of w2.
  const uint16_t* w2e = s.w2 + e * H * I;
  const float* b2e = s.w2_bias ? s.w2_bias + e * H : nullptr;
  for (int64_t h = 0; h < H; ++h) {
    bf16_row_to_float(w2e + h * I, I, scr.w_a.data());
    for (int64_t r = 0; r < rows.n; ++r) {
      float y = dot(scr.act.data() + r * I, scr.w_a.data(), I);
      if (b2e) y += b2e[h];
      rows.y[r][h] = float_to_bf16_bits(y);
    }
  }
}

// Routing weight of one expanded index as given (fp32, bf16 or packed bf16).
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

void run_standard(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                  const ExpertsOptions& options, const ExpertsOutputs& out) {
  const Stage s = make_stage(weights, options.activation);
  const int64_t M = in.hidden.size(0);
  const int k = static_cast<int>(in.topk_ids.size(1));
  const int64_t H = s.hidden;
  const int64_t I = s.inter;
  const int num_local = map.num_local_experts;
  const bool packed = !in.topk_weights.defined();

  // Permutation metadata: into the caller's views when given, else into scratch.
  HostTensor offsets_scratch, e2p_scratch;
  int64_t* offsets;
  if (out.expert_first_token_offset.defined()) {
    offsets = out.expert_first_token_offset.ptr<int64_t>();
  } else {
    offsets_scratch.reset(DType::I64, {num_local + 1});
    offsets = offsets_scratch.data<int64_t>();
  }
  int32_t* e2p;
  if (out.expanded_idx_to_permuted_idx.defined()) {
    e2p = out.expanded_idx_to_permuted_idx.ptr<int32_t>();
  } else {
    e2p_scratch.reset(DType::I32, {M * k});
    e2p = e2p_scratch.data<int32_t>();
  }
  std::vector<int32_t> p2e(static_cast<size_t>(M * k));  // [M*k] permuted -> expanded index
  detail::build_permutation(in.topk_ids.ptr<const int32_t>(), packed, M, k, map, offsets, e2p,
                            p2e.data());
  const int64_t P = offsets[num_local];

  // Routing weights: `in_w` as given (bf16-rounded on request), `fin_w` as finalize applies
  // them: 1 when the weight went to the input, 0 where not local.
  std::vector<float> in_w(static_cast<size_t>(M * k));
  std::vector<float> fin_w(static_cast<size_t>(M * k));
  for (int64_t x = 0; x < M * k; ++x) {
    float w = routing_weight(in, x);
    if (options.bf16_routing_weights) w = round_to_bf16(w);
    in_w[x] = w;
    fin_w[x] = e2p[x] < 0 ? 0.0f : (options.apply_router_weight_on_input ? 1.0f : w);
  }
  if (out.expert_weights.defined()) {
    std::copy(fin_w.begin(), fin_w.end(), out.expert_weights.ptr<float>());
  }

  HostTensor g2_scratch;
  uint16_t* g2;  // [>= P, H] bf16
  if (out.gemm2_out.defined()) {
    g2 = out.gemm2_out.ptr<uint16_t>();
  } else {
    g2_scratch.reset(DType::BF16, {P, H});
    g2 = g2_scratch.data<uint16_t>();
  }

  const uint16_t* x_base = in.hidden.ptr<const uint16_t>();
  const uint16_t* lora_base =
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
        const int64_t p = p0 + r;
        const int64_t x = p2e[p];
        rows.x[r] = x_base + (x / k) * H;
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
  const int64_t max_m = in.hidden.size(1);
  const int64_t H = s.hidden;
  const int32_t* counts = in.expert_num_tokens.ptr<const int32_t>();  // [E_local]
  const uint16_t* x_base = in.hidden.ptr<const uint16_t>();            // [E_local, max_m, H]
  uint16_t* y_base = out.gemm2_out.ptr<uint16_t>();                    // [E_local, max_m, H]
  Scratch scr(H, s.inter);
  Rows rows;
  for (int e = 0; e < map.num_local_experts; ++e) {
    const int64_t n = counts[e];
    for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
      rows.n = std::min(kRowChunk, n - r0);
      for (int64_t r = 0; r < rows.n; ++r) {
        const int64_t row = e * max_m + r0 + r;
        rows.x[r] = x_base + row * H;
        rows.lora[r] = nullptr;
        rows.act_out[r] = nullptr;
        rows.y[r] = y_base + row * H;
      }
      run_rows(s, e, rows, scr);
    }
    // Rows past the count carry no token: written as zero.
    std::fill(y_base + (e * max_m + n) * H, y_base + (e + 1) * max_m * H, uint16_t{0});
  }
}

}  // namespace

size_t experts_workspace_size(const ExpertsDesc& /*desc*/) { return 0; }

void experts(const ExpertsDesc& desc, const ExpertsInputs& in, const ExpertWeights& weights,
             const ExpertMap& map, const ExpertsOptions& options, const ExpertsOutputs& out,
             const Workspace& /*workspace*/, Stream /*stream*/) {
  if (desc.format == InputFormat::Batched) {
    run_batched(in, weights, map, options, out);
  } else {
    run_standard(in, weights, map, options, out);
  }
}

}  // namespace modmoe::reference
