// reference::dense_moe_f64 on quantized weights (FP8, NVFP4) and e4m3 hidden: the float64
// check `modmoe bench experts` validates the quantized cells with.
//   - exact: with power-of-two scales every dequantized value is a bf16 value, so the
//     quantized reference equals the bf16 reference on those values, bit for bit;
//   - the CPU oracles (through modmoe::experts) stand within the bounds the benchmark uses
//     (app bench_dtype.h: FP8 0.04 pure and 5e-3 with the intermediate rounded as the kernels
//     do; W4A16 1e-2), and a wrong hidden scale or a swapped weight block fails both.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "core/nvfp4.h"
#include "cpu/fp8_weights.h"
#include "modmoe/modmoe.h"
#include "reference/dense.h"
#include "reference/quantize_weights.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kFp8BlockSize;
constexpr int64_t M = 16, H = 256, I = 256;
constexpr int E = 4, K = 2;

// One layer's inputs: bf16 hidden, routing, and quantized weights of the same masters.
struct Problem {
  HostTensor hidden, ids, wts;  // [M, H] bf16, [M, K] int32, [M, K] fp32
  std::vector<float> w13, w2;   // [E, 2I, H], [E, H, I] float masters
  ExpertsOptions options;
};

Problem make_problem(uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Problem p;
  p.hidden.reset(DType::BF16, {M, H});
  test::fill_normal(p.hidden, rng, 1.0f);
  p.ids.reset(DType::I32, {M, K});
  p.wts.reset(DType::F32, {M, K});
  std::uniform_real_distribution<float> uw(0.2f, 1.0f);
  for (int64_t m = 0; m < M; ++m) {
    const int first = static_cast<int>(rng() % E);
    for (int j = 0; j < K; ++j) {
      p.ids.data<int32_t>()[m * K + j] = (first + j) % E;
      p.wts.data<float>()[m * K + j] = uw(rng);
    }
  }
  p.w13 = test::block_varied(rng, E, 2 * I, H, 1.0f / std::sqrt(float(H)));
  p.w2 = test::block_varied(rng, E, H, I, 1.0f / std::sqrt(float(I)));
  p.options.activation.kind = Activation::Swiglu;
  return p;
}

std::vector<int64_t> shape_of(const TensorView& t) {
  return std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim);
}

float pow2_near(float s) { return std::ldexp(1.0f, static_cast<int>(std::lround(std::log2(s)))); }

// Quantized weights and activations of one scheme, canonical, and their bf16 twin: the same
// dequantized values, exact in bf16 when `pow2` made every scale a power of two.
struct Quantized {
  std::vector<HostTensor> keep;
  ExpertWeights w;                   // the scheme's weights
  HostTensor hq, hs;                 // FP8: e4m3 hidden and its scales
  HostTensor w13_bf16, w2_bf16, x_bf16;  // dequantized, rounded to bf16
  ExpertsInputs in(const Problem& p) const {
    ExpertsInputs r;
    r.hidden = hq.numel() ? TensorView(hq) : TensorView(p.hidden);
    if (hs.numel()) r.hidden_scale = hs;
    r.topk_ids = p.ids;
    r.topk_weights = p.wts;
    return r;
  }
};

// hidden_scales: how many FP8 scales hidden gets: M * H/128 (Block), 1 or M (PerTensor).
Quantized quantize(const Problem& p, QuantScheme scheme, bool pow2, int64_t hidden_scales) {
  Quantized q;
  ExpertWeights bf;
  const HostTensor m13 = test::host_values(p.w13, {E, 2 * I, H}, DType::BF16);
  const HostTensor m2 = test::host_values(p.w2, {E, H, I}, DType::BF16);
  bf.w13 = m13;
  bf.w2 = m2;
  q.w = reference::quantize_expert_weights(bf, scheme, q.keep);
  for (TensorView s : {q.w.w13_scale, q.w.w2_scale, q.w.w13_global_scale, q.w.w2_global_scale}) {
    if (!pow2 || !s.defined() || s.dtype != DType::F32) continue;
    for (int64_t i = 0; i < s.numel(); ++i) s.ptr<float>()[i] = pow2_near(s.ptr<float>()[i]);
  }
  if (scheme != QuantScheme::Nvfp4) {
    q.hq.reset(DType::E4M3, {M, H});
    if (scheme == QuantScheme::Fp8Block128) {
      q.hs.reset(DType::F32, {M, H / kB});
    } else {
      q.hs.reset(DType::F32, {1});
    }
    quantize_activations(p.hidden, scheme, q.hq, q.hs);
    if (hidden_scales == M) {  // one per row: the same scale repeated, as an all-to-all sends it
      const float s = q.hs.data<float>()[0];
      q.hs.reset(DType::F32, {M});
      for (int64_t m = 0; m < M; ++m) q.hs.data<float>()[m] = s;
    }
    if (pow2) {
      for (int64_t i = 0; i < q.hs.numel(); ++i) q.hs.data<float>()[i] = pow2_near(q.hs.data<float>()[i]);
    }
    q.x_bf16.reset(DType::BF16, {M, H});
    for (int64_t i = 0; i < M * H; ++i) {
      const int64_t n = q.hs.numel();
      const float s = q.hs.data<float>()[n == 1 ? 0 : n == M ? i / H : i / kB];
      q.x_bf16.data<uint16_t>()[i] = float_to_bf16_bits(fp8::e4m3_to_float(q.hq.data<uint8_t>()[i]) * s);
    }
  }
  // The dequantized weights through the public dequantizers' formulas, rounded to bf16.
  auto dequant = [&](const TensorView& w, const TensorView& s, const TensorView& g, int64_t R, int64_t C) {
    HostTensor out(DType::BF16, {E, R, C});
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = (e * R + r) * C + c;
          float v;
          if (scheme == QuantScheme::Nvfp4) {
            const uint8_t b = w.ptr<uint8_t>()[i / 2];
            v = nvfp4::dequantize(c % 2 ? nvfp4::e2m1x2_second(b) : nvfp4::e2m1x2_first(b),
                                  s.ptr<uint8_t>()[i / 16], g.ptr<float>()[e]);
          } else {
            const float sc = scheme == QuantScheme::Fp8Block128
                                 ? s.ptr<float>()[(e * (R / kB) + r / kB) * (C / kB) + c / kB]
                                 : s.ptr<float>()[e];
            v = fp8::e4m3_to_float(w.ptr<uint8_t>()[i]) * sc;
          }
          out.data<uint16_t>()[i] = float_to_bf16_bits(v);
        }
      }
    }
    return out;
  };
  q.w13_bf16 = dequant(q.w.w13, q.w.w13_scale, q.w.w13_global_scale, 2 * I, H);
  q.w2_bf16 = dequant(q.w.w2, q.w.w2_scale, q.w.w2_global_scale, H, I);
  return q;
}

std::vector<double> dense(const ExpertsInputs& in, const ExpertWeights& w, const ExpertsOptions& o,
                          bool emulate) {
  reference::DenseOptions d;
  d.round_intermediate = emulate;
  return reference::dense_moe_f64(in, w, ExpertMap::single(E), o, d).out;
}

// The stage through the public API on CPU tensors (the oracles), out [M, H] as float64.
std::vector<double> run_experts(const ExpertsInputs& in, const ExpertWeights& w, const ExpertsOptions& o) {
  HostTensor out(DType::BF16, {M, H});
  test::poison(out);
  ExpertsOutputs outs;
  outs.out = out;
  experts(in, w, ExpertMap::single(E), o, outs);
  return test::to_double(out);
}

struct Case {
  QuantScheme scheme;
  int64_t hidden_scales;  // FP8: how many hidden scales ([M, H/128] = M * H / 128, [1], [M])
};

std::string case_name(const Case& c) {
  return c.scheme == QuantScheme::Fp8Block128 ? "Fp8Block"
         : c.scheme == QuantScheme::Nvfp4     ? "Nvfp4"
         : c.hidden_scales == 1               ? "Fp8TensorScale"
                                              : "Fp8RowScales";
}

void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

class DenseQuant : public ::testing::TestWithParam<Case> {};

TEST_P(DenseQuant, PowerOfTwoScalesEqualTheBf16Reference) {
  const Case c = GetParam();
  const Problem p = make_problem(41);
  const Quantized q = quantize(p, c.scheme, true, c.hidden_scales);
  ExpertWeights bf;
  bf.w13 = q.w13_bf16;
  bf.w2 = q.w2_bf16;
  ExpertsInputs in_bf = q.in(p);
  if (c.scheme != QuantScheme::Nvfp4) {
    in_bf.hidden = q.x_bf16;
    in_bf.hidden_scale = {};
  }
  const std::vector<double> got = dense(q.in(p), q.w, p.options, false);
  const std::vector<double> want = dense(in_bf, bf, p.options, false);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << "element " << i;
}

TEST_P(DenseQuant, OracleWithinTheBenchBoundsAndCorruptionFails) {
  const Case c = GetParam();
  const Problem p = make_problem(42);
  const Quantized q = quantize(p, c.scheme, false, c.hidden_scales);
  const std::vector<double> pure = dense(q.in(p), q.w, p.options, false);
  const bool fp8 = c.scheme != QuantScheme::Nvfp4;
  const std::vector<double> emulated = fp8 ? dense(q.in(p), q.w, p.options, true) : pure;
  const double bound = fp8 ? 0.04 : 1e-2, emulated_bound = fp8 ? 5e-3 : 1e-2;

  const std::vector<double> out = run_experts(q.in(p), q.w, p.options);
  EXPECT_LE(test::rel_l2(out, pure), bound);
  EXPECT_LE(test::rel_l2(out, emulated), emulated_bound);
  if (fp8) {
    EXPECT_LT(test::rel_l2(out, emulated), test::rel_l2(out, pure) / 4);
  }

  // Wrong weight scales: expert 0's w13 scales doubled (FP8: its 128x128 blocks, or its
  // scale; NVFP4: its global).
  std::vector<HostTensor> keep;
  ExpertWeights bad = q.w;
  TensorView& target = fp8 ? bad.w13_scale : bad.w13_global_scale;
  keep.emplace_back(DType::F32, shape_of(target));
  std::memcpy(keep.back().view().data, target.data, target.nbytes());
  target = keep.back();
  for (int64_t i = 0; i < target.numel() / E; ++i) target.ptr<float>()[i] *= 2.0f;
  const std::vector<double> wrong = run_experts(q.in(p), bad, p.options);
  EXPECT_GT(test::rel_l2(wrong, emulated), emulated_bound) << "a wrong weight scale passed";

  if (!fp8) return;
  HostTensor hs(DType::F32, shape_of(q.hs));
  for (int64_t i = 0; i < hs.numel(); ++i) hs.data<float>()[i] = q.hs.data<float>()[i] * 1.25f;
  ExpertsInputs in = q.in(p);
  in.hidden_scale = hs;
  const std::vector<double> scaled = run_experts(in, q.w, p.options);
  EXPECT_GT(test::rel_l2(scaled, pure), bound) << "a wrong hidden scale passed";
  EXPECT_GT(test::rel_l2(scaled, emulated), emulated_bound) << "a wrong hidden scale passed";
}

INSTANTIATE_TEST_SUITE_P(Schemes, DenseQuant,
                         ::testing::Values(Case{QuantScheme::Fp8Block128, M * H / kB},
                                           Case{QuantScheme::Fp8PerTensor, 1},
                                           Case{QuantScheme::Fp8PerTensor, M},
                                           Case{QuantScheme::Nvfp4, 0}),
                         [](const auto& info) { return case_name(info.param); });

}  // namespace
}  // namespace modmoe
