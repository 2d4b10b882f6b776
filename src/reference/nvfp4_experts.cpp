// CPU reference of the W4A16 experts stage: NVFP4 weights, bf16 activations. The oracle the
// Hopper decode kernel and the Blackwell block-scaled kernel will be compared to, bit for bit
// where the fp32 sums are exact. docs/nvfp4.md, "Experts":
//   w'[n][k] = e2m1[n][k] * e4m3_scale[n][k/16]        exact (and exact in bf16)
//   GEMM1:  dot(x, w'[n]) in fp32 (the bf16 stage's dot), * w13_global[e] (one fp32 multiply)
//           + w13_bias + LoRA delta -> activation (fp32) -> bf16
//   GEMM2:  dot(a, w2'[h]) * w2_global[e] + w2_bias -> bf16 = gemm2_out
//   finalize: as bf16 (fp32 sum over j in order of w_j * row, cast once).
// With power-of-two global scales this is bitwise the bf16 reference run on the bf16 weights
// w' * global (tests/cpu/test_nvfp4_experts.cpp checks it). The permutation, the chunks of
// rows and finalize are reference/experts_driver.h's.
#include <algorithm>
#include <vector>

#include "api/nvfp4_check.h"
// NOTE: experts_driver.h (activation_math.h) before nvfp4.h: activation_math.h defines
// MODMOE_HD unguarded (fp8.h's guard keeps it).
#include "reference/experts_driver.h"
#include "core/nvfp4.h"
#include "modmoe/error.h"
#include "reference/nvfp4.h"

namespace modmoe::reference {
namespace {

using detail::dot;
using detail::kRowChunk;

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

struct Stage : detail::StageCommon {
  const uint8_t* w13 = nullptr;        // [E_local, w13_rows, H/2] E2M1x2
  const uint8_t* w2 = nullptr;         // [E_local, H, I/2] E2M1x2
  const uint8_t* w13_scale = nullptr;  // [E_local, w13_rows, H/16] E4M3
  const uint8_t* w2_scale = nullptr;   // [E_local, H, I/16] E4M3
  const float* w13_global = nullptr;   // [E_local]
  const float* w2_global = nullptr;    // [E_local]
};

Stage make_stage(const ExpertWeights& w, const ActivationParams& act) {
  Stage s;
  detail::init_stage_common(s, w, act);
  s.w13 = w.w13.ptr<const uint8_t>();
  s.w2 = w.w2.ptr<const uint8_t>();
  s.w13_scale = w.w13_scale.ptr<const uint8_t>();
  s.w2_scale = w.w2_scale.ptr<const uint8_t>();
  s.w13_global = w.w13_global_scale.ptr<const float>();
  s.w2_global = w.w2_global_scale.ptr<const float>();
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

void run_rows(const Stage& s, const uint16_t* x_base, int e, const detail::Rows& rows,
              Scratch& scr) {
  const int64_t H = s.hidden, I = s.inter;
  const detail::ExpertActivation epilogue(s, e);
  const float g13 = s.w13_global[e], g2 = s.w2_global[e];
  scr.decode(s, e);

  // GEMM1 input: bf16 -> fp32; with the router weight on the input, bf16(float(x) * w).
  for (int64_t r = 0; r < rows.n; ++r) {
    detail::bf16_input_row(x_base + rows.row[r] * H, H, rows.scale_input, rows.in_scale[r],
                           scr.x.data() + r * H);
  }

  // GEMM1 (* global) + bias + LoRA + activation -> bf16.
  for (int64_t i = 0; i < I; ++i) {
    const float* wg = scr.w13.data() + s.gate_rows[i] * H;
    const float* wu = scr.w13.data() + s.up_rows[i] * H;
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* xr = scr.x.data() + r * H;
      const float gate = dot(xr, wg, H) * g13;
      const float up = s.gated ? dot(xr, wu, H) * g13 : 0.0f;
      const uint16_t a = epilogue(i, gate, up, rows.lora[r]);
      scr.act[r * I + i] = detail::bf16_to_float(a);
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

}  // namespace

void experts_nvfp4(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                   const ExpertsOptions& options, const ExpertsOutputs& out) {
  const ExpertsDesc desc = api::check_nvfp4_experts(in, weights, map, options, out);
  MODMOE_CHECK(!in.hidden.device.is_cuda(), "reference::experts_nvfp4: the tensors are on ",
               in.hidden.device.to_string(), ": expected CPU tensors");
  const Stage s = make_stage(weights, options.activation);
  const auto* x_base = in.hidden.ptr<const uint16_t>();
  Scratch scr(s);
  detail::run_experts(desc, in, s, map, options, out, /*check_counts=*/true,
                      [&](int e, const detail::Rows& rows) { run_rows(s, x_base, e, rows, scr); });
}

}  // namespace modmoe::reference
