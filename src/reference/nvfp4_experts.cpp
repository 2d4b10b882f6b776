// CPU reference of the W4A16 experts stage: NVFP4 weights, bf16 activations. The oracle the
// Hopper decode kernel and the Blackwell block-scaled kernel will be compared to, bit for bit
// where the fp32 sums are exact. docs/nvfp4.md, "Experts":
//   w'[n][k] = e2m1[n][k] * e4m3_scale[n][k/16]        exact (and exact in bf16)
//   GEMM1:  dot(x, w'[n]) in fp32 (the bf16 stage's dot), * w13_global[e] (one fp32 multiply)
//           + w13_bias + LoRA delta -> activation (fp32) -> bf16
//   GEMM2:  dot(a, w2'[h]) * w2_global[e] + w2_bias -> bf16 = gemm2_out
//   finalize: as bf16 (fp32 sum over j in order of w_j * row, cast once).
// With power-of-two global scales this is bitwise the bf16 reference run on the bf16 weights
// w' * global (tests/cpu/test_nvfp4_experts.cpp checks it).
#include <algorithm>
#include <vector>

#include "api/nvfp4_check.h"
// NOTE: activation_math.h before nvfp4.h: it defines MODMOE_HD unguarded (fp8.h's guard keeps it).
#include "core/activation_math.h"
#include "core/nvfp4.h"
#include "modmoe/error.h"
#include "reference/experts_common.h"
#include "reference/nvfp4.h"

namespace modmoe::reference {
namespace {

using detail::bf16_to_float;
constexpr int64_t kRowChunk = 32;

// The bf16 reference's dot (src/reference/experts.cpp), term for term: 8 independent partial
// sums combined pairwise. n is a multiple of 64 (validated).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t i = 0; i < n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// rows x k values of one expert: w'[r][c] = e2m1 * scale, exact.
//   q: [rows, k/2] E2M1x2; s: [rows, k/16] E4M3; out: [rows, k] fp32
void decode_rows(const uint8_t* q, const uint8_t* s, int64_t rows, int64_t k, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < k; c += 2) {
      const uint8_t byte = q[(r * k + c) / 2];
      const uint8_t sc = s[(r * k + c) / nvfp4::kBlock];
      out[r * k + c] = nvfp4::block_value(nvfp4::e2m1x2_first(byte), sc);
      out[r * k + c + 1] = nvfp4::block_value(nvfp4::e2m1x2_second(byte), sc);
    }
  }
}

struct Stage {
  int64_t hidden = 0, inter = 0, w13_rows = 0;
  bool gated = true;
  const uint8_t* w13 = nullptr;        // [E_local, w13_rows, H/2] E2M1x2
  const uint8_t* w2 = nullptr;         // [E_local, H, I/2] E2M1x2
  const uint8_t* w13_scale = nullptr;  // [E_local, w13_rows, H/16] E4M3
  const uint8_t* w2_scale = nullptr;   // [E_local, H, I/16] E4M3
  const float* w13_global = nullptr;   // [E_local]
  const float* w2_global = nullptr;    // [E_local]
  const float* w13_bias = nullptr;     // [E_local, w13_rows] or null
  const float* w2_bias = nullptr;      // [E_local, H] or null
  std::vector<int64_t> gate_rows, up_rows;  // [I] w13 row of gate / up column i
  int64_t lora_cols = 0, lora_gate_col = 0, lora_up_col = 0;
  ActivationParams act;
  const float *alpha = nullptr, *beta = nullptr, *limit = nullptr;
};

Stage make_stage(const ExpertWeights& w, const ActivationParams& act) {
  Stage s;
  s.hidden = w.hidden();
  s.inter = w.intermediate();
  s.gated = is_gated(act.kind);
  s.w13_rows = s.gated ? 2 * s.inter : s.inter;
  s.w13 = w.w13.ptr<const uint8_t>();
  s.w2 = w.w2.ptr<const uint8_t>();
  s.w13_scale = w.w13_scale.ptr<const uint8_t>();
  s.w2_scale = w.w2_scale.ptr<const uint8_t>();
  s.w13_global = w.w13_global_scale.ptr<const float>();
  s.w2_global = w.w2_global_scale.ptr<const float>();
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

// The decoded weights of one expert, and the rows in flight.
struct Scratch {
  int decoded = -1;       // the expert held in w13 / w2
  std::vector<float> w13;  // [w13_rows, H] w'
  std::vector<float> w2;   // [H, I] w'
  std::vector<float> x;    // [kRowChunk, H] fp32 inputs
  std::vector<float> act;  // [kRowChunk, I] activations, bf16-rounded
  Scratch(const Stage& s)
      : w13(static_cast<size_t>(s.w13_rows * s.hidden)),
        w2(static_cast<size_t>(s.hidden * s.inter)),
        x(static_cast<size_t>(kRowChunk * s.hidden)),
        act(static_cast<size_t>(kRowChunk * s.inter)) {}

  void decode(const Stage& s, int e) {
    if (decoded == e) return;
    const int64_t H = s.hidden, I = s.inter;
    decode_rows(s.w13 + e * s.w13_rows * (H / 2), s.w13_scale + e * s.w13_rows * (H / 16),
                s.w13_rows, H, w13.data());
    decode_rows(s.w2 + e * H * (I / 2), s.w2_scale + e * H * (I / 16), H, I, w2.data());
    decoded = e;
  }
};

// Up to kRowChunk rows of one expert.
struct Rows {
  int64_t n = 0;
  const uint16_t* x[kRowChunk];     // input rows [H] bf16
  float in_scale[kRowChunk];        // router weight applied to the input, if scale_input
  const uint16_t* lora[kRowChunk];  // [lora_cols] bf16 or null
  uint16_t* act_out[kRowChunk];     // [I] bf16 or null
  uint16_t* y[kRowChunk];           // [H] bf16
  bool scale_input = false;
};

void run_rows(const Stage& s, int e, const Rows& rows, Scratch& scr) {
  const int64_t H = s.hidden, I = s.inter;
  const float alpha = s.alpha ? s.alpha[e] : s.act.alpha;
  const float beta = s.beta ? s.beta[e] : s.act.beta;
  const float limit = s.limit ? s.limit[e] : s.act.limit;
  const float g13 = s.w13_global[e], g2 = s.w2_global[e];
  scr.decode(s, e);

  // GEMM1 input: bf16 -> fp32; with the router weight on the input, bf16(float(x) * w).
  for (int64_t r = 0; r < rows.n; ++r) {
    float* xr = scr.x.data() + r * H;
    for (int64_t h = 0; h < H; ++h) xr[h] = bf16_to_float(rows.x[r][h]);
    if (rows.scale_input) {
      for (int64_t h = 0; h < H; ++h) xr[h] = round_to_bf16(xr[h] * rows.in_scale[r]);
    }
  }

  // GEMM1 (* global) + bias + LoRA + activation -> bf16.
  const float* b13e = s.w13_bias ? s.w13_bias + e * s.w13_rows : nullptr;
  for (int64_t i = 0; i < I; ++i) {
    const float* wg = scr.w13.data() + s.gate_rows[i] * H;
    const float* wu = scr.w13.data() + s.up_rows[i] * H;
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* xr = scr.x.data() + r * H;
      float gate = dot(xr, wg, H) * g13;
      float up = s.gated ? dot(xr, wu, H) * g13 : 0.0f;
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

  // GEMM2 (* global) + bias -> bf16.
  const float* b2e = s.w2_bias ? s.w2_bias + e * H : nullptr;
  for (int64_t h = 0; h < H; ++h) {
    const float* w = scr.w2.data() + h * I;
    for (int64_t r = 0; r < rows.n; ++r) {
      float y = dot(scr.act.data() + r * I, w, I) * g2;
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

  // in_w: the weights as given (bf16-rounded on request); fin_w: as finalize applies them.
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

  const auto* x_base = in.hidden.ptr<const uint16_t>();
  const auto* lora_base =
      in.gemm1_lora_delta.defined() ? in.gemm1_lora_delta.ptr<const uint16_t>() : nullptr;
  uint16_t* act_base = out.gemm1_activation_output.defined()
                           ? out.gemm1_activation_output.ptr<uint16_t>()
                           : nullptr;
  Scratch scr(s);
  Rows rows;
  rows.scale_input = options.apply_router_weight_on_input;
  for (int e = 0; e < num_local; ++e) {
    for (int64_t p0 = offsets[e]; p0 < offsets[e + 1]; p0 += kRowChunk) {
      rows.n = std::min(kRowChunk, offsets[e + 1] - p0);
      for (int64_t r = 0; r < rows.n; ++r) {
        const int64_t p = p0 + r, x = p2e[p];
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
  const int64_t max_m = in.hidden.size(1), H = s.hidden;
  const auto* counts = in.expert_num_tokens.ptr<const int32_t>();  // [E_local]
  const auto* x_base = in.hidden.ptr<const uint16_t>();             // [E_local, max_m, H]
  auto* y_base = out.gemm2_out.ptr<uint16_t>();                     // [E_local, max_m, H]
  Scratch scr(s);
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

void experts_nvfp4(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                   const ExpertsOptions& options, const ExpertsOutputs& out) {
  const ExpertsDesc desc = api::check_nvfp4_experts(in, weights, map, options, out);
  MODMOE_CHECK(!in.hidden.device.is_cuda(), "reference::experts_nvfp4: the tensors are on ",
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
