// The FP8 experts oracle (reference::experts_fp8, docs/fp8.md "Experts") against float64
// dense computations over the dequantized weights and inputs, written here independently:
//   - pure float64 (no intermediate rounding): relative L2 within 0.04. Bound: the GEMM2
//     input is re-quantized to e4m3 (3 mantissa bits, unit roundoff u = 2^-4). A rounding
//     error uniform in [-u, u] relative has RMS u / sqrt(3) = 0.036, and an output that is a
//     sum of many such inputs with independent random weights carries about the same relative
//     L2 error; the bf16 roundings add well under 0.01 of that. Measured: 0.016 to 0.028.
//   - float64 with the intermediate rounded exactly as the oracle defines it (bf16, then e4m3
//     with 1x128 scales): within 5e-3. What is left is the two bf16 roundings of the output
//     (the gemm2 rows, then the finalized sum; unit roundoff 2^-8, RMS 2^-8 / sqrt(3) = 0.0023
//     each, about 0.003 together), fp32-vs-float64 GEMM differences (~1e-6) and the rare
//     intermediate value that lands across a rounding boundary. Measured: 0.0020 to 0.0026.
// A scale read from the wrong block shows up as an O(1) error in both (checked by mutation).
// Plus the layout, mode and format invariants: Canonical == prepared (G = 8, 128) bitwise,
// do_finalize=false + finalize == do_finalize=true, batched rows == standard rows, per-row
// per-tensor scales, non-local ids, router weight on the input, and bad arguments; and
// ExpertsOptions::fp8_fast_accum (fp8-tensor's GEMM1 as one scale multiply of the full-K sum)
// bit for bit against integer sums, the default still the block loop.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "api/quant_check.h"
#include "common/test_util.h"
#include "core/fp8.h"
#include "cpu/fp8_weights.h"
#include "modmoe/modmoe.h"
#include "reference/quant.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kFp8BlockSize;

struct Spec {
  QuantScheme scheme = QuantScheme::Fp8Block128;
  int64_t M = 24, H = 256, I = 256;
  int num_experts = 8, top_k = 2;
  ExpertMap map = ExpertMap::single(8);
  Activation act = Activation::Swiglu;
  GateUpOrder order = GateUpOrder::GateUp;
  bool biases = false, lora = false;
  double junk = 0.0;  // fraction of non-local ids
};

std::string spec_name(const Spec& s) {
  return std::string(s.scheme == QuantScheme::Fp8Block128 ? "Block" : "Tensor") + "_" +
         activation_name(s.act) + (s.order == GateUpOrder::GateUp ? "_GateUp" : "_UpGate") +
         "_H" + std::to_string(s.H) + "_I" + std::to_string(s.I) + (s.biases ? "_bias" : "") +
         (s.lora ? "_lora" : "") + (s.map.num_local_experts != s.num_experts ? "_ep" : "");
}

void PrintTo(const Spec& s, std::ostream* os) { *os << spec_name(s); }

using test::block_varied;
using test::quantize_weights;

struct Problem {
  Spec spec;
  HostTensor hidden_bf16;           // [M, H] bf16 before quantization
  HostTensor hidden, hidden_scale;  // [M, H] e4m3; [M, H/128] or [1] fp32
  HostTensor ids, wts;              // [M, k] int32 / fp32
  HostTensor w13, w2, s13, s2;      // canonical FP8 weights and scales
  HostTensor b13, b2, lora;         // optional
  int64_t rows13() const { return is_gated(spec.act) ? 2 * spec.I : spec.I; }

  ExpertWeights weights() const {
    ExpertWeights w;
    w.scheme = spec.scheme;
    w.order = spec.order;
    w.w13 = w13;
    w.w2 = w2;
    w.w13_scale = s13;
    w.w2_scale = s2;
    if (spec.biases) {
      w.w13_bias = b13;
      w.w2_bias = b2;
    }
    return w;
  }
  ExpertsInputs inputs() const {
    ExpertsInputs in;
    in.hidden = hidden;
    in.hidden_scale = hidden_scale;
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
};

Problem make_problem(const Spec& spec, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Problem p;
  p.spec = spec;
  const int64_t M = spec.M, H = spec.H, I = spec.I, E = spec.map.num_local_experts;
  const int k = spec.top_k;
  p.hidden_bf16.reset(DType::BF16, {M, H});
  test::fill_normal(p.hidden_bf16, rng, 1.0f);
  std::uniform_int_distribution<int> ex(-3, 3);
  for (int64_t g = 0; g < M * H / kB; ++g) {  // 1x128 groups of different magnitudes
    const float f = std::ldexp(1.0f, ex(rng));
    for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
      auto& b = p.hidden_bf16.data<uint16_t>()[i];
      b = float_to_bf16_bits(bf16_bits_to_float(b) * f);
    }
  }
  p.hidden.reset(DType::E4M3, {M, H});
  if (spec.scheme == QuantScheme::Fp8Block128) {
    p.hidden_scale.reset(DType::F32, {M, H / kB});
  } else {
    p.hidden_scale.reset(DType::F32, {1});
  }
  quantize_activations(p.hidden_bf16, spec.scheme, p.hidden, p.hidden_scale);

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

  const int64_t rows = p.rows13();
  quantize_weights(block_varied(rng, E, rows, H, 1.0f / std::sqrt(float(H))), E, rows, H,
                   spec.scheme, p.w13, p.s13);
  quantize_weights(block_varied(rng, E, H, I, 1.0f / std::sqrt(float(I))), E, H, I, spec.scheme,
                   p.w2, p.s2);
  if (spec.biases) {
    p.b13.reset(DType::F32, {E, rows});
    test::fill_normal(p.b13, rng, 0.05f);
    p.b2.reset(DType::F32, {E, H});
    test::fill_normal(p.b2, rng, 0.05f);
  }
  if (spec.lora) {
    p.lora.reset(DType::BF16, {M, k, rows});
    test::fill_normal(p.lora, rng, 0.05f);
  }
  return p;
}

// ---- the float64 dense oracle, independent of src/ ----

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

// out [M, H]; `emulate`: round the activation to bf16 and re-quantize it with 1x128 groups
// exactly as docs/fp8.md defines, in float64 otherwise.
std::vector<double> dense_f64(const Problem& p, bool emulate, bool weight_on_input = false) {
  const Spec& s = p.spec;
  const int64_t M = s.M, H = s.H, I = s.I, rows = p.rows13();
  const int k = s.top_k;
  const bool block = s.scheme == QuantScheme::Fp8Block128;
  const bool gate_first = s.order == GateUpOrder::GateUp;
  auto w13 = [&](int64_t e, int64_t r, int64_t c) {
    const double sc = block ? p.s13.data<float>()[(e * (rows / kB) + r / kB) * (H / kB) + c / kB]
                            : p.s13.data<float>()[e];
    return double(fp8::e4m3_to_float(p.w13.data<uint8_t>()[(e * rows + r) * H + c])) * sc;
  };
  auto w2 = [&](int64_t e, int64_t h, int64_t i) {
    const double sc = block ? p.s2.data<float>()[(e * (H / kB) + h / kB) * (I / kB) + i / kB]
                            : p.s2.data<float>()[e];
    return double(fp8::e4m3_to_float(p.w2.data<uint8_t>()[(e * H + h) * I + i])) * sc;
  };
  std::vector<double> out(static_cast<size_t>(M * H), 0.0), x(H), a(I);
  std::vector<float> af(I);
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < k; ++j) {
      const int id = p.ids.data<int32_t>()[m * k + j];
      if (!s.map.is_local(id)) continue;
      const int64_t e = id - s.map.local_expert_offset;
      const double wj = p.wts.data<float>()[m * k + j];
      for (int64_t c = 0; c < H; ++c) {
        const double sc = block ? p.hidden_scale.data<float>()[m * (H / kB) + c / kB]
                                : p.hidden_scale.data<float>()[0];
        x[c] = double(fp8::e4m3_to_float(p.hidden.data<uint8_t>()[m * H + c])) * sc;
        if (weight_on_input) x[c] *= wj;
      }
      for (int64_t i = 0; i < I; ++i) {
        const int64_t gr = (is_gated(s.act) && !gate_first) ? I + i : i;
        const int64_t ur = gate_first ? I + i : i;
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; ++c) {
          g += x[c] * w13(e, gr, c);
          if (is_gated(s.act)) u += x[c] * w13(e, ur, c);
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
      }
      if (emulate) {
        for (int64_t i = 0; i < I; ++i) af[i] = round_to_bf16(static_cast<float>(a[i]));
        for (int64_t g = 0; g < I / kB; ++g) {
          float amax = 0.0f;
          for (int64_t i = g * kB; i < (g + 1) * kB; ++i) amax = std::max(amax, std::fabs(af[i]));
          const float sc = std::max(amax, 1e-10f) / 448.0f;
          for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
            a[i] = double(fp8::e4m3_to_float(fp8::float_to_e4m3(af[i] / sc, true))) * sc;
          }
        }
      }
      const double scale_out = weight_on_input ? 1.0 : wj;
      for (int64_t h = 0; h < H; ++h) {
        double y = s.biases ? p.b2.data<float>()[e * H + h] : 0.0;
        for (int64_t i = 0; i < I; ++i) y += a[i] * w2(e, h, i);
        out[m * H + h] += scale_out * y;
      }
    }
  }
  return out;
}

HostTensor run_fp8(const Problem& p, const ExpertsInputs& in, const ExpertWeights& w,
                   const ExpertsOptions& o) {
  HostTensor out(DType::BF16, {p.spec.M, p.spec.H});
  std::memset(out.view().data, 0xFF, out.nbytes());
  ExpertsOutputs outs;
  outs.out = out;
  reference::experts_fp8(in, w, p.spec.map, o, outs);
  return out;
}

class Fp8Experts : public ::testing::TestWithParam<Spec> {};

TEST_P(Fp8Experts, MatchesFloat64Dense) {
  const Problem p = make_problem(GetParam(), 900);
  const HostTensor out = run_fp8(p, p.inputs(), p.weights(), p.options());
  const std::vector<double> got = test::to_double(out);
  const double err_pure = test::rel_l2(got, dense_f64(p, false));
  const double err_emul = test::rel_l2(got, dense_f64(p, true));
  std::printf("[ rel_l2   ] vs float64 %.5f, vs float64 with the intermediate re-quantized %.6f\n",
              err_pure, err_emul);
  EXPECT_LT(err_pure, 0.04);
  EXPECT_LT(err_emul, 5e-3);
}

TEST_P(Fp8Experts, PreparedLayoutsGiveTheSameBits) {
  const Problem p = make_problem(GetParam(), 901);
  const HostTensor ref = run_fp8(p, p.inputs(), p.weights(), p.options());
  for (int g : {8, 128}) {
    HostTensor w13(DType::E4M3, {p.w13.view().shape[0], p.w13.view().shape[1], p.spec.H});
    HostTensor w2(DType::E4M3, {p.w2.view().shape[0], p.spec.H, p.spec.I});
    HostTensor s13(DType::F32,
                   std::vector<int64_t>(p.s13.view().shape.begin(),
                                        p.s13.view().shape.begin() + p.s13.view().ndim));
    HostTensor s2(DType::F32, std::vector<int64_t>(p.s2.view().shape.begin(),
                                                   p.s2.view().shape.begin() + p.s2.view().ndim));
    HostTensor b13, b2;
    ExpertWeights dst = p.weights();
    dst.w13 = w13;
    dst.w2 = w2;
    dst.w13_scale = s13;
    dst.w2_scale = s2;
    if (p.spec.biases) {
      b13.reset(DType::F32, {p.b13.view().shape[0], p.b13.view().shape[1]});
      b2.reset(DType::F32, {p.b2.view().shape[0], p.b2.view().shape[1]});
      dst.w13_bias = b13;
      dst.w2_bias = b2;
    }
    PrepareWeightsOptions opt;
    opt.interleave_rows = g;
    prepare_weights(p.weights(), dst, opt);
    EXPECT_TRUE(test::bitwise_equal(run_fp8(p, p.inputs(), dst, p.options()), ref)) << "G = " << g;
  }
}

TEST_P(Fp8Experts, UnfinalizedPlusFinalizeIsFinalized) {
  const Problem p = make_problem(GetParam(), 902);
  const HostTensor ref = run_fp8(p, p.inputs(), p.weights(), p.options());
  const int64_t M = p.spec.M, H = p.spec.H;
  const int k = p.spec.top_k;
  HostTensor g2(DType::BF16, {M * k, H}), ew(DType::F32, {M, k}), e2p(DType::I32, {M, k}),
      off(DType::I64, {p.spec.map.num_local_experts + 1}), out(DType::BF16, {M, H});
  ExpertsOutputs o;
  o.gemm2_out = g2;
  o.expert_weights = ew;
  o.expanded_idx_to_permuted_idx = e2p;
  o.expert_first_token_offset = off;
  reference::experts_fp8(p.inputs(), p.weights(), p.spec.map, p.options(false), o);
  finalize(g2, ew, e2p, out);
  EXPECT_TRUE(test::bitwise_equal(out, ref));

  // Batched: the rows of each expert, in permuted order, give the same gemm2 rows.
  if (p.spec.lora) return;  // no LoRA in the batched format
  const int num_local = p.spec.map.num_local_experts;
  const int64_t* offs = off.data<int64_t>();
  int64_t max_m = 1;
  for (int e = 0; e < num_local; ++e) max_m = std::max(max_m, offs[e + 1] - offs[e]);
  HostTensor bx(DType::E4M3, {num_local, max_m, H}), by(DType::BF16, {num_local, max_m, H}),
      cnt(DType::I32, {num_local});
  HostTensor bs = p.spec.scheme == QuantScheme::Fp8Block128
                      ? HostTensor(DType::F32, {num_local, max_m, H / kB})
                      : HostTensor(DType::F32, {1});
  if (p.spec.scheme != QuantScheme::Fp8Block128) {
    bs.data<float>()[0] = p.hidden_scale.data<float>()[0];
  }
  std::vector<int64_t> slot_of_perm(static_cast<size_t>(M * k), -1);
  for (int64_t x = 0; x < M * k; ++x) {
    if (e2p.data<int32_t>()[x] >= 0) slot_of_perm[e2p.data<int32_t>()[x]] = x;
  }
  for (int e = 0; e < num_local; ++e) {
    cnt.data<int32_t>()[e] = static_cast<int32_t>(offs[e + 1] - offs[e]);
    for (int64_t r = 0; r < offs[e + 1] - offs[e]; ++r) {
      const int64_t m = slot_of_perm[offs[e] + r] / k;
      std::memcpy(bx.data<uint8_t>() + (e * max_m + r) * H, p.hidden.data<uint8_t>() + m * H, H);
      if (p.spec.scheme == QuantScheme::Fp8Block128) {
        std::memcpy(bs.data<float>() + (e * max_m + r) * (H / kB),
                    p.hidden_scale.data<float>() + m * (H / kB), H / kB * sizeof(float));
      }
    }
  }
  ExpertsInputs bin;
  bin.hidden = bx;
  bin.hidden_scale = bs;
  bin.expert_num_tokens = cnt;
  ExpertsOutputs bo;
  bo.gemm2_out = by;
  reference::experts_fp8(bin, p.weights(), p.spec.map, p.options(false), bo);
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

Spec make_spec(QuantScheme scheme, Activation act, GateUpOrder order, bool extras, bool ep) {
  Spec s;
  s.scheme = scheme;
  s.act = act;
  s.order = order;
  s.biases = s.lora = extras;
  if (ep) {
    s.map = ExpertMap::for_rank(8, 2, 1);
    s.junk = 0.2;
  }
  if (act == Activation::Geglu) {
    s.H = 384;
    s.I = 128;
  }
  return s;
}

constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kTen = QuantScheme::Fp8PerTensor;

INSTANTIATE_TEST_SUITE_P(
    Cases, Fp8Experts,
    ::testing::Values(make_spec(kBlk, Activation::Swiglu, GateUpOrder::GateUp, false, false),
                      make_spec(kBlk, Activation::Swiglu, GateUpOrder::UpGate, true, true),
                      make_spec(kBlk, Activation::SwigluOai, GateUpOrder::UpGate, true, false),
                      make_spec(kBlk, Activation::Geglu, GateUpOrder::GateUp, false, true),
                      make_spec(kBlk, Activation::Relu2, GateUpOrder::GateUp, true, false),
                      make_spec(kTen, Activation::Swiglu, GateUpOrder::GateUp, false, false),
                      make_spec(kTen, Activation::Swiglu, GateUpOrder::UpGate, true, true),
                      make_spec(kTen, Activation::Relu2, GateUpOrder::GateUp, false, false)),
    [](const auto& info) { return spec_name(info.param); });

TEST(Fp8ExpertsExtra, RouterWeightOnInput) {
  for (QuantScheme scheme : {kBlk, kTen}) {
    Spec s;
    s.scheme = scheme;
    s.top_k = 1;
    const Problem p = make_problem(s, 903);
    ExpertsOptions o = p.options();
    o.apply_router_weight_on_input = true;
    const HostTensor out = run_fp8(p, p.inputs(), p.weights(), o);
    const double err = test::rel_l2(test::to_double(out), dense_f64(p, true, true));
    EXPECT_LT(err, 5e-3) << quant_scheme_name(scheme);
  }
}

TEST(Fp8ExpertsExtra, PerRowPerTensorScales) {
  Spec s;
  s.scheme = kTen;
  const Problem p = make_problem(s, 904);
  const HostTensor ref = run_fp8(p, p.inputs(), p.weights(), p.options());
  HostTensor rows(DType::F32, {s.M});
  for (int64_t m = 0; m < s.M; ++m) rows.data<float>()[m] = p.hidden_scale.data<float>()[0];
  ExpertsInputs in = p.inputs();
  in.hidden_scale = rows;
  EXPECT_TRUE(test::bitwise_equal(run_fp8(p, in, p.weights(), p.options()), ref));
  // A different scale on one row changes that row only.
  rows.data<float>()[3] *= 2.0f;
  const HostTensor other = run_fp8(p, in, p.weights(), p.options());
  for (int64_t m = 0; m < s.M; ++m) {
    const bool same = std::memcmp(other.data<uint16_t>() + m * s.H, ref.data<uint16_t>() + m * s.H,
                                  s.H * 2) == 0;
    EXPECT_EQ(same, m != 3) << "row " << m;
  }
}

// ExpertsOptions::fp8_fast_accum (docs/fp8.md "FP8 fast accumulation"): under Fp8PerTensor,
// GEMM1 is then the fp32 sum over all of K times (sx * sw), not a fused multiply-add per
// 128-wide block; without the option it stays the block loop. Small integers make every sum
// exact, so each definition gives each gemm1_activation_output element exactly (computed here
// from integer dot products); the scales are not powers of two, so the two definitions round
// differently, and row 0 is built so that they differ after the bf16 rounding too (block sums
// 193 and 99, found by a search over the scales): the test tells them apart both ways.
TEST(Fp8FastAccum, PerTensorGemm1ScalesTheFullSumOnce) {
  constexpr int64_t H = 256, I = 128;
  const float sx = 0.042420532554388046f, sw = 0.04000921547412872f;
  std::mt19937_64 rng(test::seed(906));
  std::uniform_int_distribution<int> small(-3, 3);
  auto code = [](int v) { return fp8::float_to_e4m3(static_cast<float>(v), true); };
  HostTensor x(DType::E4M3, {1, H}), xs(DType::F32, {1});
  for (int64_t h = 0; h < H; ++h) x.data<uint8_t>()[h] = code(1);
  xs.data<float>()[0] = sx;
  // w13 [1, I, H] (Relu2: no gate/up pair); row 0: 64 threes and a one (193), then 33 threes (99).
  HostTensor w13(DType::E4M3, {1, I, H}), w2(DType::E4M3, {1, H, I});
  std::vector<int> w13_int(static_cast<size_t>(I * H));
  for (int64_t i = 0; i < I * H; ++i) {
    const int64_t r = i / H, c = i % H;
    w13_int[i] = r > 0 ? small(rng) : c < 64 ? 3 : c == 64 ? 1 : (c >= 128 && c < 161) ? 3 : 0;
    w13.data<uint8_t>()[i] = code(w13_int[i]);
  }
  for (int64_t i = 0; i < H * I; ++i) w2.data<uint8_t>()[i] = code(small(rng));
  HostTensor s13(DType::F32, {1}), s2(DType::F32, {1});
  s13.data<float>()[0] = sw;
  s2.data<float>()[0] = 1.0f;
  ExpertWeights w;
  w.scheme = kTen;
  w.w13 = w13;
  w.w2 = w2;
  w.w13_scale = s13;
  w.w2_scale = s2;
  HostTensor ids(DType::I32, {1, 1}), wts(DType::F32, {1, 1});
  ids.data<int32_t>()[0] = 0;
  wts.data<float>()[0] = 1.0f;
  ExpertsInputs in;
  in.hidden = x;
  in.hidden_scale = xs;
  in.topk_ids = ids;
  in.topk_weights = wts;

  const float s = sx * sw;
  auto relu2_bf16 = [](float y) {
    const float r = y < 0.0f ? 0.0f : y;
    return float_to_bf16_bits(r * r);
  };
  // Row 0 under the promoted definition: fma(99, s, 193 * s) rounds to another bf16 square.
  const float promoted = std::fma(99.0f, s, 193.0f * s);
  ASSERT_NE(relu2_bf16(promoted), relu2_bf16(292.0f * s));
  for (bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fp8_fast_accum" : "default (promoted)");
    ExpertsOptions o;
    o.activation.kind = Activation::Relu2;
    o.fp8_fast_accum = fast;
    HostTensor out_buf(DType::BF16, {1, H}), act(DType::BF16, {1, I});
    test::poison(act);
    ExpertsOutputs out;
    out.out = out_buf;
    out.gemm1_activation_output = act;
    reference::experts_fp8(in, w, ExpertMap::single(1), o, out);
    for (int64_t i = 0; i < I; ++i) {
      int64_t b0 = 0, b1 = 0;  // x = 1: the integer sums of the two K blocks
      for (int64_t h = 0; h < H; ++h) (h < kB ? b0 : b1) += w13_int[i * H + h];
      const float y = fast ? static_cast<float>(b0 + b1) * s
                           : std::fma(static_cast<float>(b1), s, static_cast<float>(b0) * s);
      EXPECT_EQ(act.data<uint16_t>()[i], relu2_bf16(y)) << "intermediate column " << i;
    }
    EXPECT_EQ(act.data<uint16_t>()[0], relu2_bf16(fast ? 292.0f * s : promoted));
  }
}

// The option is refused with Fp8Block128 (the oracle's own entry point too).
TEST(Fp8FastAccum, RefusedWithFp8Block) {
  Spec spec;
  spec.scheme = kBlk;
  const Problem p = make_problem(spec, 907);
  ExpertsOptions o = p.options();
  o.fp8_fast_accum = true;
  HostTensor out(DType::BF16, {spec.M, spec.H});
  ExpertsOutputs outs;
  outs.out = out;
  EXPECT_MODMOE_ERROR(reference::experts_fp8(p.inputs(), p.weights(), spec.map, o, outs),
                      "'fp8_fast_accum' = true", "quant scheme fp8-block",
                      "expected quant scheme fp8-tensor");
}

// Random fp8-tensor problems with the option: the float64 bounds of the default hold (the
// oracle's full-K sum is fp32 too), and the default and fast oracles are within those bounds
// of each other's accuracy.
TEST(Fp8FastAccum, MatchesFloat64Dense) {
  for (Activation act : {Activation::Swiglu, Activation::Relu2}) {
    Spec spec = make_spec(kTen, act, GateUpOrder::UpGate, act == Activation::Swiglu, false);
    spec.H = 1024;
    const Problem p = make_problem(spec, 908);
    ExpertsOptions o = p.options();
    o.fp8_fast_accum = true;
    const std::vector<double> fast = test::to_double(run_fp8(p, p.inputs(), p.weights(), o));
    const std::vector<double> def =
        test::to_double(run_fp8(p, p.inputs(), p.weights(), p.options()));
    const double pure = test::rel_l2(fast, dense_f64(p, false));
    const double emul = test::rel_l2(fast, dense_f64(p, true));
    const double pure_def = test::rel_l2(def, dense_f64(p, false));
    std::printf("[ rel_l2   ] %s fp8_fast_accum: vs float64 %.5f (default %.5f), emulated "
                "%.6f\n", activation_name(act), pure, pure_def, emul);
    EXPECT_LT(pure, 0.04);
    EXPECT_LT(emul, 5e-3);
    EXPECT_LT(std::fabs(pure - pure_def), 1e-3);
  }
}

// ---- bad arguments ----


class Fp8ExpertsBad : public ::testing::Test {
 protected:
  void SetUp() override {
    p = make_problem(Spec{}, 905);
    in = p.inputs();
    w = p.weights();
    out_buf.reset(DType::BF16, {p.spec.M, p.spec.H});
    out.out = out_buf;
  }
  void run() { reference::experts_fp8(in, w, p.spec.map, p.options(), out); }
  Problem p;
  ExpertsInputs in;
  ExpertWeights w;
  ExpertsOutputs out;
  HostTensor out_buf, extra;
};

TEST_F(Fp8ExpertsBad, ValidCallPasses) { EXPECT_NO_THROW(run()); }

TEST_F(Fp8ExpertsBad, HiddenBf16) {
  in.hidden = p.hidden_bf16;
  EXPECT_MODMOE_ERROR(run(), "'hidden' has dtype bf16", "expected e4m3");
}

TEST_F(Fp8ExpertsBad, HiddenScaleTransposed) {
  extra.reset(DType::F32, {p.spec.H / kB, p.spec.M});
  in.hidden_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' has shape [2, 24]", "[T, H/128] = [24, 2]");
}

TEST_F(Fp8ExpertsBad, HiddenScaleMissing) {
  in.hidden_scale = {};
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' is missing");
}

TEST_F(Fp8ExpertsBad, WeightScaleMissing) {
  w.w2_scale = {};
  EXPECT_MODMOE_ERROR(run(), "'weights.w2_scale' is missing");
}

TEST_F(Fp8ExpertsBad, SchemeNone) {
  w.scheme = QuantScheme::None;
  EXPECT_MODMOE_ERROR(run(), "'weights.scheme' = none");
}

TEST_F(Fp8ExpertsBad, InterleaveTooCoarse) {
  w.layout = WeightLayout::GateUpInterleaved;
  w.interleave_rows = 256;
  EXPECT_MODMOE_ERROR(run(), "'weights.interleave_rows' = 256");
}

TEST_F(Fp8ExpertsBad, SharedChecksStillRun) {
  // The shape checks FP8 shares with bf16 (through the bf16 shadow of the call).
  extra.reset(DType::I32, {p.spec.M, 3});
  in.topk_ids = extra;
  EXPECT_MODMOE_ERROR(run(), "'topk_weights'");
  in = p.inputs();
  extra.reset(DType::BF16, {p.spec.M, 128});
  out.out = extra;
  EXPECT_MODMOE_ERROR(run(), "'out' has shape [24, 128]");
}

}  // namespace
}  // namespace modmoe
