// CPU reference of the experts stage: the oracle the CUDA kernels are compared to, bit for
// bit on small-integer inputs. Follows docs/HELPERS.md "Numerics" step by step:
//   GEMM1 (fp32 acc) + w13_bias + LoRA delta -> activation (fp32) -> bf16
//   GEMM2 (fp32 acc) + w2_bias -> bf16 = gemm2_out (permuted, unweighted)
//   finalize: fp32 sum over j in order of w_j * row, cast once.
// Arguments were validated by src/api/experts.cpp. The permutation, the chunks of rows and
// finalize are reference/experts_driver.h's; this file holds the bf16 GEMMs of one chunk.
#include <algorithm>
#include <vector>

#include "backend.h"
#include "reference/experts_driver.h"

namespace modmoe::reference {
namespace {

using detail::bf16_to_float;
using detail::dot;
using detail::kRowChunk;

void bf16_row_to_float(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// What every row of every expert needs: the common fields and the bf16 weights.
struct Stage : detail::StageCommon {
  const uint16_t* w13 = nullptr;  // [E_local, w13_rows, H] bf16
  const uint16_t* w2 = nullptr;   // [E_local, H, I] bf16
};

Stage make_stage(const ExpertWeights& w, const ActivationParams& act) {
  Stage s;
  detail::init_stage_common(s, w, act);
  s.w13 = w.w13.ptr<const uint16_t>();
  s.w2 = w.w2.ptr<const uint16_t>();
  return s;
}

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

// Each weight row is converted to fp32 once per chunk and then dotted with every row of the
// chunk (both K-contiguous).
void run_rows(const Stage& s, const uint16_t* x_base, int e, const detail::Rows& rows,
              Scratch& scr) {
  const int64_t H = s.hidden;
  const int64_t I = s.inter;
  const detail::ExpertActivation epilogue(s, e);

  // GEMM1 input: bf16 -> fp32; with the router weight on the input, bf16(float(x) * w).
  for (int64_t r = 0; r < rows.n; ++r) {
    detail::bf16_input_row(x_base + rows.row[r] * H, H, rows.scale_input, rows.in_scale[r],
                           scr.x.data() + r * H);
  }

  // GEMM1 + bias + LoRA + activation, column by column.
  const uint16_t* w13e = s.w13 + e * s.w13_rows * H;
  for (int64_t i = 0; i < I; ++i) {
    bf16_row_to_float(w13e + s.gate_rows[i] * H, H, scr.w_a.data());
    if (s.gated) bf16_row_to_float(w13e + s.up_rows[i] * H, H, scr.w_b.data());
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* xr = scr.x.data() + r * H;
      const float gate = dot(xr, scr.w_a.data(), H);
      const float up = s.gated ? dot(xr, scr.w_b.data(), H) : 0.0f;
      const uint16_t a = epilogue(i, gate, up, rows.lora[r]);
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

}  // namespace

size_t experts_workspace_size(const ExpertsDesc& /*desc*/) { return 0; }

void experts(const ExpertsDesc& desc, const ExpertsInputs& in, const ExpertWeights& weights,
             const ExpertMap& map, const ExpertsOptions& options, const ExpertsOutputs& out,
             const Workspace& /*workspace*/, Stream /*stream*/) {
  const Stage s = make_stage(weights, options.activation);
  const auto* x_base = in.hidden.ptr<const uint16_t>();
  Scratch scr(s.hidden, s.inter);
  detail::run_experts(desc, in, s, map, options, out, /*check_counts=*/false,
                      [&](int e, const detail::Rows& rows) { run_rows(s, x_base, e, rows, scr); });
}

}  // namespace modmoe::reference
