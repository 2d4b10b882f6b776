// The W4A16 experts oracle (reference::experts_nvfp4, docs/nvfp4.md "Experts"): NVFP4 weights
// made by the public quantizer (one expert at a time), bf16 activations.
//   - Against a float64 dense computation over the decoded weights (e2m1 * e4m3 * global in
//     double), written here independently: relative L2 within 6e-3, the contract's bound for a
//     bf16 pipeline. The decoded weights are the same numbers on both sides (exact up to one
//     fp32 rounding of the global multiply per dot product), so what is left is the bf16
//     pipeline's own error: the activation rounded to bf16 (the GEMM2 input, unit roundoff
//     2^-9, RMS 2^-9 / sqrt(3) = 0.0011 relative per element), the bf16 gemm2 rows and the
//     bf16 output (0.0011 each) and fp32 accumulation (~1e-6); together about 0.002 to 0.003.
//     With the activation rounded in the float64 computation too, only the two output
//     roundings are left: within 4e-3.
//   - With power-of-two global scales, the decoded weights w' * global are exact in bf16 and
//     multiplying a dot product by the global is exact, so the oracle must equal the bf16 CPU
//     reference (modmoe::experts on those bf16 weights) bit for bit, and reference::
//     dense_moe_f64 on them within 6e-3.
// Plus: prepared layouts (G = 8, 32) give the same bits, do_finalize=false + finalize ==
// do_finalize=true, batched rows == standard rows, the router weight on the input, and bad
// arguments. A scale read from the wrong row shows up as an O(1) error (checked by mutation).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "api/nvfp4_check.h"
#include "common/test_util.h"
#include "core/fp8.h"
#include "modmoe/modmoe.h"
#include "reference/dense.h"
#include "reference/nvfp4.h"

namespace modmoe {
namespace {

// The e2m1 values of codes 0..15, written out (decode is tested in test_nvfp4.cpp).
constexpr double kE2m1[16] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0};

struct Spec {
  int64_t M = 24, H = 256, I = 128;
  int num_experts = 8, top_k = 2;
  ExpertMap map = ExpertMap::single(8);
  Activation act = Activation::Swiglu;
  GateUpOrder order = GateUpOrder::GateUp;
  bool biases = false, lora = false;
  double junk = 0.0;  // fraction of non-local ids
};

std::string spec_name(const Spec& s) {
  return std::string(activation_name(s.act)) +
         (s.order == GateUpOrder::GateUp ? "_GateUp" : "_UpGate") + "_H" + std::to_string(s.H) +
         "_I" + std::to_string(s.I) + (s.biases ? "_bias" : "") + (s.lora ? "_lora" : "") +
         (s.map.num_local_experts != s.num_experts ? "_ep" : "");
}

void PrintTo(const Spec& s, std::ostream* os) { *os << spec_name(s); }

// NVFP4 weights of E experts, [E, R, K] logical: packed codes, scales, one global per expert.
struct Quant {
  HostTensor q, s, g;  // [E, R, K/2] E2M1x2, [E, R, K/16] E4M3, [E] fp32
  int64_t R = 0, K = 0;
  double value(int64_t e, int64_t r, int64_t k) const {
    const uint8_t b = q.data<uint8_t>()[((e * R + r) * K + k) / 2];
    const uint8_t code = k % 2 ? b >> 4 : b & 0xf;
    const uint8_t sc = s.data<uint8_t>()[(e * R + r) * (K / 16) + k / 16];
    return kE2m1[code] * double(fp8::e4m3_to_float(sc)) * double(g.data<float>()[e]);
  }
};

// Random bf16 weights N(0, std^2) whose 16-blocks vary by 2^[-2, 2], quantized per expert by
// quantize_nvfp4: dynamic global, or (pow2) a static power-of-two global at or above the
// dynamic one.
Quant quantize_weights(std::mt19937_64& rng, int64_t E, int64_t R, int64_t K, float std,
                       bool pow2) {
  Quant w;
  w.R = R;
  w.K = K;
  w.q.reset(DType::E2M1x2, {E, R, K / 2});
  w.s.reset(DType::E4M3, {E, R, K / 16});
  w.g.reset(DType::F32, {E});
  std::normal_distribution<float> nd(0.0f, std);
  std::uniform_int_distribution<int> ex(-2, 2);
  HostTensor x(DType::BF16, {R, K}), g(DType::F32, {1});
  for (int64_t e = 0; e < E; ++e) {
    float amax = 0.0f;
    for (int64_t b = 0; b < R * K / 16; ++b) {
      const float f = std::ldexp(1.0f, ex(rng));
      for (int64_t i = b * 16; i < b * 16 + 16; ++i) {
        float v = nd(rng) * f;
        if (v == 0.0f) v = std * 1e-3f;
        x.data<uint16_t>()[i] = float_to_bf16_bits(v);
        amax = std::max(amax, std::fabs(round_to_bf16(v)));
      }
    }
    Nvfp4QuantizeOptions opt;
    if (pow2) {
      opt.static_global_scale = true;
      g.data<float>()[0] = std::ldexp(1.0f, static_cast<int>(std::ceil(std::log2(amax / 2688.0f))));
    }
    quantize_nvfp4(x, w.q.view().select0(e), w.s.view().select0(e), g, opt);
    w.g.data<float>()[e] = g.data<float>()[0];
  }
  return w;
}

struct Problem {
  Spec spec;
  HostTensor hidden, ids, wts;  // [M, H] bf16; [M, k] int32 / fp32
  Quant w13, w2;
  HostTensor b13, b2, lora;  // optional
  int64_t rows13() const { return is_gated(spec.act) ? 2 * spec.I : spec.I; }

  ExpertWeights weights() const {
    ExpertWeights w;
    w.scheme = QuantScheme::Nvfp4;
    w.order = spec.order;
    w.w13 = w13.q;
    w.w2 = w2.q;
    w.w13_scale = w13.s;
    w.w2_scale = w2.s;
    w.w13_global_scale = w13.g;
    w.w2_global_scale = w2.g;
    if (spec.biases) {
      w.w13_bias = b13;
      w.w2_bias = b2;
    }
    return w;
  }
  ExpertsInputs inputs() const {
    ExpertsInputs in;
    in.hidden = hidden;
    in.topk_ids = ids;
    in.topk_weights = wts;
    if (spec.lora) in.gemm1_lora_delta = lora;
    return in;
  }
  ExpertsOptions options(bool do_finalize = true) const {
    ExpertsOptions o;
    o.activation.kind = spec.act;
    o.activation.limit = 0.5f;  // SwigluOai: inside the GEMM1 output range, so it clamps
    o.do_finalize = do_finalize;
    return o;
  }
  // The decoded weights as canonical bf16 tensors; only exact with power-of-two globals
  // (checked element by element).
  ExpertWeights bf16_weights(HostTensor& w13b, HostTensor& w2b) const {
    const int64_t E = spec.map.num_local_experts, H = spec.H, I = spec.I, R = rows13();
    w13b.reset(DType::BF16, {E, R, H});
    w2b.reset(DType::BF16, {E, H, I});
    for (const auto& [q, t] : {std::pair{&w13, &w13b}, std::pair{&w2, &w2b}}) {
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t r = 0; r < q->R; ++r) {
          for (int64_t k = 0; k < q->K; ++k) {
            const double v = q->value(e, r, k);
            const uint16_t b = float_to_bf16_bits(static_cast<float>(v));
            EXPECT_EQ(double(bf16_bits_to_float(b)), v) << "not exact in bf16";
            t->data<uint16_t>()[(e * q->R + r) * q->K + k] = b;
          }
        }
      }
    }
    ExpertWeights w;
    w.order = spec.order;
    w.w13 = w13b;
    w.w2 = w2b;
    if (spec.biases) {
      w.w13_bias = b13;
      w.w2_bias = b2;
    }
    return w;
  }
};

Problem make_problem(const Spec& spec, uint64_t salt, bool pow2 = false) {
  std::mt19937_64 rng(test::seed(salt));
  Problem p;
  p.spec = spec;
  const int64_t M = spec.M, H = spec.H, I = spec.I, E = spec.map.num_local_experts;
  const int k = spec.top_k;
  p.hidden.reset(DType::BF16, {M, H});
  test::fill_normal(p.hidden, rng, 0.5f);
  p.ids.reset(DType::I32, {M, k});
  p.wts.reset(DType::F32, {M, k});
  std::uniform_real_distribution<float> uw(0.2f, 1.0f);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<int> perm(static_cast<size_t>(spec.num_experts));
  for (int64_t m = 0; m < M; ++m) {
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int>(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) {
      int id = perm[j];
      if (u01(rng) < spec.junk) id = (rng() % 2) ? -1 : spec.num_experts;
      p.ids.data<int32_t>()[m * k + j] = id;
      p.wts.data<float>()[m * k + j] = uw(rng);
    }
  }
  p.w13 = quantize_weights(rng, E, p.rows13(), H, 1.0f / std::sqrt(float(H)), pow2);
  p.w2 = quantize_weights(rng, E, H, I, 1.0f / std::sqrt(float(I)), pow2);
  if (spec.biases) {
    p.b13.reset(DType::F32, {E, p.rows13()});
    test::fill_normal(p.b13, rng, 0.05f);
    p.b2.reset(DType::F32, {E, H});
    test::fill_normal(p.b2, rng, 0.05f);
  }
  if (spec.lora) {
    p.lora.reset(DType::BF16, {M, k, p.rows13()});
    test::fill_normal(p.lora, rng, 0.05f);
  }
  return p;
}

// ---- the float64 dense oracle over the decoded weights, independent of src/ ----

double act_f64(Activation kind, double g, double u, double limit) {
  switch (kind) {
    case Activation::Swiglu: return g / (1.0 + std::exp(-g)) * u;
    case Activation::SwigluOai: {
      const double gg = std::min(g, limit), uu = std::max(-limit, std::min(u, limit));
      return gg / (1.0 + std::exp(-1.702 * gg)) * (uu + 1.0);
    }
    case Activation::Geglu: return 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0))) * u;
    case Activation::Relu2: return g > 0 ? g * g : 0.0;
  }
  return NAN;
}

// out [M, H]. `round`: the activation (and, with weight_on_input, the scaled input) rounded
// to bf16 where the stage rounds them; float64 otherwise.
std::vector<double> dense_f64(const Problem& p, bool round, bool weight_on_input = false) {
  const Spec& s = p.spec;
  const int64_t M = s.M, H = s.H, I = s.I, rows = p.rows13();
  const int k = s.top_k;
  const bool gated = is_gated(s.act), gate_first = s.order == GateUpOrder::GateUp;
  std::vector<double> out(static_cast<size_t>(M * H), 0.0), x(H), a(I);
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < k; ++j) {
      const int id = p.ids.data<int32_t>()[m * k + j];
      if (!s.map.is_local(id)) continue;
      const int64_t e = id - s.map.local_expert_offset;
      const double wj = p.wts.data<float>()[m * k + j];
      for (int64_t c = 0; c < H; ++c) {
        const float xc = bf16_bits_to_float(p.hidden.data<uint16_t>()[m * H + c]);
        x[c] = !weight_on_input ? xc
               : round          ? double(round_to_bf16(xc * static_cast<float>(wj)))
                                : xc * wj;
      }
      for (int64_t i = 0; i < I; ++i) {
        const int64_t gr = (gated && !gate_first) ? I + i : i;
        const int64_t ur = gate_first ? I + i : i;
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; ++c) {
          g += x[c] * p.w13.value(e, gr, c);
          if (gated) u += x[c] * p.w13.value(e, ur, c);
        }
        if (s.biases) {
          g += p.b13.data<float>()[e * rows + gr];
          u += p.b13.data<float>()[e * rows + ur];
        }
        if (s.lora) {
          g += bf16_bits_to_float(p.lora.data<uint16_t>()[(m * k + j) * rows + gr]);
          u += bf16_bits_to_float(p.lora.data<uint16_t>()[(m * k + j) * rows + ur]);
        }
        a[i] = act_f64(s.act, g, u, 0.5);
        if (round) a[i] = round_to_bf16(static_cast<float>(a[i]));
      }
      const double scale_out = weight_on_input ? 1.0 : wj;
      for (int64_t h = 0; h < H; ++h) {
        double y = s.biases ? p.b2.data<float>()[e * H + h] : 0.0;
        for (int64_t i = 0; i < I; ++i) y += a[i] * p.w2.value(e, h, i);
        out[m * H + h] += scale_out * y;
      }
    }
  }
  return out;
}

HostTensor run_nvfp4(const Problem& p, const ExpertsInputs& in, const ExpertWeights& w,
                     const ExpertsOptions& o) {
  HostTensor out(DType::BF16, {p.spec.M, p.spec.H});
  std::memset(out.view().data, 0xFF, out.nbytes());
  ExpertsOutputs outs;
  outs.out = out;
  reference::experts_nvfp4(in, w, p.spec.map, o, outs);
  return out;
}

class Nvfp4Experts : public ::testing::TestWithParam<Spec> {};

TEST_P(Nvfp4Experts, MatchesFloat64Dense) {
  const Problem p = make_problem(GetParam(), 950);
  const std::vector<double> got =
      test::to_double(run_nvfp4(p, p.inputs(), p.weights(), p.options()));
  const double err_pure = test::rel_l2(got, dense_f64(p, false));
  const double err_round = test::rel_l2(got, dense_f64(p, true));
  std::printf("[ rel_l2   ] vs float64 %.5f, vs float64 with the bf16 activation %.5f\n",
              err_pure, err_round);
  EXPECT_LT(err_pure, 6e-3);
  EXPECT_LT(err_round, 4e-3);
}

TEST_P(Nvfp4Experts, PowerOfTwoGlobalsEqualTheBf16Reference) {
  const Problem p = make_problem(GetParam(), 951, /*pow2=*/true);
  const HostTensor got = run_nvfp4(p, p.inputs(), p.weights(), p.options());
  HostTensor w13b, w2b;
  const ExpertWeights wb = p.bf16_weights(w13b, w2b);
  HostTensor want(DType::BF16, {p.spec.M, p.spec.H});
  std::memset(want.view().data, 0xFF, want.nbytes());
  ExpertsOutputs o;
  o.out = want;
  experts(p.inputs(), wb, p.spec.map, p.options(), o);
  EXPECT_TRUE(test::bitwise_equal(got, want));
  const double err = test::rel_l2(
      test::to_double(got),
      reference::dense_moe_f64(p.inputs(), wb, p.spec.map, p.options()).out);
  std::printf("[ rel_l2   ] vs reference::dense_moe_f64 %.5f\n", err);
  EXPECT_LT(err, 6e-3);
}

TEST_P(Nvfp4Experts, PreparedLayoutsGiveTheSameBits) {
  const Problem p = make_problem(GetParam(), 952);
  const HostTensor ref = run_nvfp4(p, p.inputs(), p.weights(), p.options());
  for (int g : {8, 32}) {
    const auto like = [](const HostTensor& t) {
      const TensorView& v = t.view();
      return HostTensor(v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim));
    };
    HostTensor w13 = like(p.w13.q), w2 = like(p.w2.q), s13 = like(p.w13.s), s2 = like(p.w2.s),
               g13 = like(p.w13.g), g2 = like(p.w2.g), b13, b2;
    ExpertWeights dst = p.weights();
    dst.w13 = w13;
    dst.w2 = w2;
    dst.w13_scale = s13;
    dst.w2_scale = s2;
    dst.w13_global_scale = g13;
    dst.w2_global_scale = g2;
    if (p.spec.biases) {
      b13 = like(p.b13);
      b2 = like(p.b2);
      dst.w13_bias = b13;
      dst.w2_bias = b2;
    }
    PrepareWeightsOptions opt;
    opt.interleave_rows = g;
    prepare_weights(p.weights(), dst, opt);
    EXPECT_TRUE(test::bitwise_equal(run_nvfp4(p, p.inputs(), dst, p.options()), ref))
        << "G = " << g;
  }
}

TEST_P(Nvfp4Experts, UnfinalizedPlusFinalizeIsFinalized) {
  const Problem p = make_problem(GetParam(), 953);
  const HostTensor ref = run_nvfp4(p, p.inputs(), p.weights(), p.options());
  const int64_t M = p.spec.M, H = p.spec.H;
  const int k = p.spec.top_k;
  HostTensor g2(DType::BF16, {M * k, H}), ew(DType::F32, {M, k}), e2p(DType::I32, {M, k}),
      off(DType::I64, {p.spec.map.num_local_experts + 1}), out(DType::BF16, {M, H});
  ExpertsOutputs o;
  o.gemm2_out = g2;
  o.expert_weights = ew;
  o.expanded_idx_to_permuted_idx = e2p;
  o.expert_first_token_offset = off;
  reference::experts_nvfp4(p.inputs(), p.weights(), p.spec.map, p.options(false), o);
  finalize(g2, ew, e2p, out);
  EXPECT_TRUE(test::bitwise_equal(out, ref));

  // Batched: the rows of each expert, in permuted order, give the same gemm2 rows.
  if (p.spec.lora) return;  // no LoRA in the batched format
  const int num_local = p.spec.map.num_local_experts;
  const int64_t* offs = off.data<int64_t>();
  int64_t max_m = 1;
  for (int e = 0; e < num_local; ++e) max_m = std::max(max_m, offs[e + 1] - offs[e]);
  HostTensor bx(DType::BF16, {num_local, max_m, H}), by(DType::BF16, {num_local, max_m, H}),
      cnt(DType::I32, {num_local});
  std::memset(by.view().data, 0xFF, by.nbytes());
  std::vector<int64_t> slot_of_perm(static_cast<size_t>(M * k), -1);
  for (int64_t x = 0; x < M * k; ++x) {
    if (e2p.data<int32_t>()[x] >= 0) slot_of_perm[e2p.data<int32_t>()[x]] = x;
  }
  for (int e = 0; e < num_local; ++e) {
    cnt.data<int32_t>()[e] = static_cast<int32_t>(offs[e + 1] - offs[e]);
    for (int64_t r = 0; r < offs[e + 1] - offs[e]; ++r) {
      const int64_t m = slot_of_perm[offs[e] + r] / k;
      std::memcpy(bx.data<uint16_t>() + (e * max_m + r) * H, p.hidden.data<uint16_t>() + m * H,
                  H * 2);
    }
  }
  ExpertsInputs bin;
  bin.hidden = bx;
  bin.expert_num_tokens = cnt;
  ExpertsOutputs bo;
  bo.gemm2_out = by;
  reference::experts_nvfp4(bin, p.weights(), p.spec.map, p.options(false), bo);
  for (int e = 0; e < num_local; ++e) {
    for (int64_t r = 0; r < offs[e + 1] - offs[e]; ++r) {
      ASSERT_EQ(std::memcmp(by.data<uint16_t>() + (e * max_m + r) * H,
                            g2.data<uint16_t>() + (offs[e] + r) * H, H * 2),
                0)
          << "expert " << e << " row " << r;
    }
    for (int64_t r = offs[e + 1] - offs[e]; r < max_m; ++r) {
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(by.data<uint16_t>()[(e * max_m + r) * H + h], 0);
    }
  }
}

Spec make_spec(Activation act, GateUpOrder order, bool extras, bool ep) {
  Spec s;
  s.act = act;
  s.order = order;
  s.biases = s.lora = extras;
  if (ep) {
    s.map = ExpertMap::for_rank(8, 2, 1);
    s.junk = 0.2;
  }
  if (act == Activation::Geglu) {
    s.H = 192;
    s.I = 320;
  }
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, Nvfp4Experts,
    ::testing::Values(make_spec(Activation::Swiglu, GateUpOrder::GateUp, false, false),
                      make_spec(Activation::Swiglu, GateUpOrder::UpGate, true, true),
                      make_spec(Activation::SwigluOai, GateUpOrder::UpGate, true, false),
                      make_spec(Activation::Geglu, GateUpOrder::GateUp, false, true),
                      make_spec(Activation::Relu2, GateUpOrder::GateUp, true, false)),
    [](const auto& info) { return spec_name(info.param); });

TEST(Nvfp4ExpertsExtra, RouterWeightOnInput) {
  Spec s;
  s.top_k = 1;
  const Problem p = make_problem(s, 954);
  ExpertsOptions o = p.options();
  o.apply_router_weight_on_input = true;
  const std::vector<double> got = test::to_double(run_nvfp4(p, p.inputs(), p.weights(), o));
  EXPECT_LT(test::rel_l2(got, dense_f64(p, true, true)), 4e-3);
  EXPECT_LT(test::rel_l2(got, dense_f64(p, false, true)), 6e-3);
}

// ---- bad arguments ----

class Nvfp4ExpertsBad : public ::testing::Test {
 protected:
  void SetUp() override {
    p = make_problem(Spec{}, 955);
    in = p.inputs();
    w = p.weights();
    out_buf.reset(DType::BF16, {p.spec.M, p.spec.H});
    out.out = out_buf;
  }
  void run() { reference::experts_nvfp4(in, w, p.spec.map, p.options(), out); }
  Problem p;
  ExpertsInputs in;
  ExpertWeights w;
  ExpertsOutputs out;
  HostTensor out_buf, extra;
};

TEST_F(Nvfp4ExpertsBad, ValidCallPasses) { EXPECT_NO_THROW(run()); }

TEST_F(Nvfp4ExpertsBad, Nvfp4ActivationsAreNotSupportedYet) {
  extra.reset(DType::E2M1x2, {p.spec.M, p.spec.H / 2});
  in.hidden = extra;
  EXPECT_MODMOE_ERROR(run(), "not supported yet", "W4A4");
}

TEST_F(Nvfp4ExpertsBad, HiddenScaleGiven) {
  extra.reset(DType::F32, {p.spec.M, p.spec.H / 16});
  in.hidden_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' of shape [24, 16] is given", "W4A16");
}

TEST_F(Nvfp4ExpertsBad, SchemeNone) {
  w.scheme = QuantScheme::None;
  EXPECT_MODMOE_ERROR(run(), "'weights.scheme' = none", "expected Nvfp4");
}

TEST_F(Nvfp4ExpertsBad, GlobalScaleMissing) {
  w.w2_global_scale = {};
  EXPECT_MODMOE_ERROR(run(), "'weights.w2_global_scale' is missing");
}

TEST_F(Nvfp4ExpertsBad, W13RowsForTheActivation) {
  ExpertsOptions o = p.options();
  o.activation.kind = Activation::Relu2;  // non-gated: w13 must have I rows
  EXPECT_MODMOE_ERROR(reference::experts_nvfp4(in, w, p.spec.map, o, out),
                      "'weights.w13' has shape [8, 256, 128]", "[E_local, I, H/2] = [8, 128, 128]");
}

TEST_F(Nvfp4ExpertsBad, SharedChecksStillRun) {
  // The checks W4A16 shares with bf16, through the bf16 shadow of the call.
  extra.reset(DType::I32, {p.spec.M, 3});
  in.topk_ids = extra;
  EXPECT_MODMOE_ERROR(run(), "'topk_weights'");
  in = p.inputs();
  extra.reset(DType::BF16, {p.spec.M, 128});
  out.out = extra;
  EXPECT_MODMOE_ERROR(run(), "'out' has shape [24, 128]");
  out.out = out_buf;
  w.layout = WeightLayout::GateUpInterleaved;
  w.interleave_rows = 12;
  EXPECT_MODMOE_ERROR(run(), "'weights.interleave_rows' = 12");
}

TEST_F(Nvfp4ExpertsBad, ExpertsEntryPointRunsTheOracle) {
  // modmoe::experts runs this oracle on CPU tensors (more in tests/cpu/test_nvfp4_api.cpp).
  HostTensor want(DType::BF16, {p.spec.M, p.spec.H});
  ExpertsOutputs o;
  o.out = want;
  reference::experts_nvfp4(in, w, p.spec.map, p.options(), o);
  std::memset(out_buf.view().data, 0xFF, out_buf.nbytes());
  experts(in, w, p.spec.map, p.options(), out);
  EXPECT_TRUE(test::bitwise_equal(out_buf, want));
}

}  // namespace
}  // namespace modmoe
