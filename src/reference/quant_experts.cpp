// CPU reference of the FP8 experts stage (Fp8PerTensor, Fp8Block128): the oracle the FP8
// grouped GEMMs will be compared to, bit for bit on inputs whose products and sums are exact.
// docs/fp8.md, "Experts", step by step:
//   GEMM1: per 128-wide K block kb, part = dot(x_q, w_q) over the block in fp32;
//          acc = fma(part, sx[kb] * sw[kb], acc)          (scales applied every 128 of K)
//          ExpertsOptions::fp8_fast_accum (Fp8PerTensor only, docs/fp8.md "FP8 fast
//          accumulation"): acc = dot(x_q, w_q) over all of K in fp32 * (sx * sw), once
//          + w13_bias + LoRA delta -> activation (fp32) -> bf16
//   the bf16 row re-quantized to e4m3 with 1x128 scales (= quantize_activations, Fp8Block128)
//   GEMM2: the same block loop over I with the intermediate's scales -> + w2_bias -> bf16
//   finalize: as bf16 (fp32 sum over j in order, cast once).
// Per-tensor scales are the same loop with one scale for every block. The permutation, the
// chunks of rows and finalize are reference/experts_driver.h's.
#include <algorithm>
#include <cmath>
#include <vector>

#include "api/quant_check.h"
// NOTE: experts_driver.h (activation_math.h) before fp8.h: activation_math.h defines MODMOE_HD
// unguarded (fp8.h's guard keeps it).
#include "reference/experts_driver.h"
#include "core/fp8.h"
#include "modmoe/error.h"
#include "reference/quant.h"

namespace modmoe::reference {
namespace {

using detail::bf16_to_float;
using detail::kRowChunk;
constexpr int64_t kBlock = fp8::kBlock;

void decode_row(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp8::e4m3_to_float(src[i]);
}

// sum over blocks kb of dot(128-wide block) * (sa[kb * sa_step] * sb[kb * sb_step]), fused
// per block.
float scaled_dot(const float* a, const float* b, int64_t k, const float* sa, int64_t sa_step,
                 const float* sb, int64_t sb_step) {
  float acc = 0.0f;
  for (int64_t kb = 0; kb < k / kBlock; ++kb) {
    const float part = detail::dot(a + kb * kBlock, b + kb * kBlock, kBlock);
    acc = std::fma(part, sa[kb * sa_step] * sb[kb * sb_step], acc);
  }
  return acc;
}

// FP8 fast accumulation (Fp8PerTensor GEMM1 only: one scale along K for each operand): the
// fp32 dot over all of K, then one multiply by (sa * sb), the product rounded first. The
// kernel's tensor-core sum keeps fewer bits than this fp32 one (docs/fp8.md "FP8 fast
// accumulation"); they agree bit for bit where the sum is exact.
float full_k_scaled_dot(const float* a, const float* b, int64_t k, float sa, float sb) {
  return detail::dot(a, b, k) * (sa * sb);
}

struct Stage : detail::StageCommon {
  bool block = true;
  bool fast_accum = false;  // ExpertsOptions::fp8_fast_accum (Fp8PerTensor only)
  const uint8_t* w13 = nullptr;        // [E_local, w13_rows, H] e4m3
  const uint8_t* w2 = nullptr;         // [E_local, H, I] e4m3
  const float* w13_scale = nullptr;    // [E_local] or [E_local, w13_rows/128, H/128]
  const float* w2_scale = nullptr;     // [E_local] or [E_local, H/128, I/128]
  std::vector<int64_t> gate_blocks, up_blocks;      // [I] w13_scale block rows of gate / up

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
  detail::init_stage_common(s, w, act);
  s.block = w.scheme == QuantScheme::Fp8Block128;
  s.w13 = w.w13.ptr<const uint8_t>();
  s.w2 = w.w2.ptr<const uint8_t>();
  s.w13_scale = w.w13_scale.ptr<const float>();
  s.w2_scale = w.w2_scale.ptr<const float>();
  const auto n = static_cast<size_t>(s.inter);
  s.gate_blocks.resize(n);
  s.up_blocks.resize(n);
  for (int64_t i = 0; i < s.inter; ++i) {
    s.gate_blocks[i] = s.block ? w13_scale_row_block(w, s.gate_rows[i]) : 0;
    s.up_blocks[i] = s.block ? w13_scale_row_block(w, s.up_rows[i]) : 0;
  }
  return s;
}

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

void run_rows(const Stage& s, const ExpertsInputs& in, int e, const detail::Rows& rows,
              Scratch& scr) {
  const int64_t H = s.hidden, I = s.inter, HB = H / kBlock, IB = I / kBlock;
  const detail::ExpertActivation epilogue(s, e);

  // Inputs: decoded e4m3 and their per-block scales; apply_router_weight_on_input multiplies
  // the scales by the weight (fp32), which is the input x * w without re-quantizing it.
  const auto* x_base = in.hidden.ptr<const uint8_t>();
  for (int64_t r = 0; r < rows.n; ++r) {
    decode_row(x_base + rows.row[r] * H, H, scr.x.data() + r * H);
    int64_t step = 0;
    const float* xs = row_scale(in, s.block, rows.row[r], H, &step);
    for (int64_t kb = 0; kb < HB; ++kb) {
      const float sx = xs[kb * step];
      scr.x_scale[r * HB + kb] = rows.scale_input ? sx * rows.in_scale[r] : sx;
    }
  }

  // GEMM1 + bias + LoRA + activation -> bf16.
  const uint8_t* w13e = s.w13 + e * s.w13_rows * H;
  for (int64_t i = 0; i < I; ++i) {
    int64_t gstep = 0, ustep = 0;
    const float* gs = s.w13_scales(e, s.gate_blocks[i], &gstep);
    const float* us = s.w13_scales(e, s.up_blocks[i], &ustep);
    decode_row(w13e + s.gate_rows[i] * H, H, scr.w_a.data());
    if (s.gated) decode_row(w13e + s.up_rows[i] * H, H, scr.w_b.data());
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* xr = scr.x.data() + r * H;
      const float* sx = scr.x_scale.data() + r * HB;
      float gate = 0.0f, up = 0.0f;
      if (s.fast_accum) {
        gate = full_k_scaled_dot(xr, scr.w_a.data(), H, sx[0], gs[0]);
        if (s.gated) up = full_k_scaled_dot(xr, scr.w_b.data(), H, sx[0], us[0]);
      } else {
        gate = scaled_dot(xr, scr.w_a.data(), H, sx, 1, gs, gstep);
        if (s.gated) up = scaled_dot(xr, scr.w_b.data(), H, sx, 1, us, ustep);
      }
      const uint16_t a = epilogue(i, gate, up, rows.lora[r]);
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

}  // namespace

void experts_fp8(const ExpertsInputs& in, const ExpertWeights& weights, const ExpertMap& map,
                 const ExpertsOptions& options, const ExpertsOutputs& out) {
  const ExpertsDesc desc = api::check_fp8_experts(in, weights, map, options, out);
  MODMOE_CHECK(!in.hidden.device.is_cuda(), "reference::experts_fp8: the tensors are on ",
               in.hidden.device.to_string(), ": expected CPU tensors");
  Stage s = make_stage(weights, options.activation);
  s.fast_accum = desc.fp8_fast_accum;  // check_fp8_experts: Fp8PerTensor only
  MODMOE_CHECK(!s.fast_accum || !s.block, "reference::experts_fp8: fp8_fast_accum with ",
               "fp8-block weights: expected fp8-tensor");
  Scratch scr(s.hidden, s.inter);
  detail::run_experts(desc, in, s, map, options, out, /*check_counts=*/true,
                      [&](int e, const detail::Rows& rows) { run_rows(s, in, e, rows, scr); });
}

}  // namespace modmoe::reference
