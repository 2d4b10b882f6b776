// The CPU reference of the experts stage against the independent float64 dense reference,
// plus the bitwise identities every backend must keep (packed/unpacked, batched/standard,
// do_finalize modes, weight layouts, gate/up order, EP masking, fused vs stages, repeats).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "cpu/experts_problem.h"

namespace modmoe {
namespace {

using test::bitwise_equal;
using test::make_problem;
using test::poison;
using test::Problem;
using test::ProblemSpec;
using test::rel_l2;
using test::run_experts;
using test::to_double;

constexpr double kTol = 6e-3;  // contract: ~4e-3..6e-3 for a bf16 pipeline vs float64

std::vector<double> dense(const Problem& p, const ExpertsInputs& in, const ExpertsOptions& opt,
                          bool round = false) {
  reference::DenseOptions d;
  d.round_intermediate = round;
  return reference::dense_moe_f64(in, p.weights(), p.spec.map, opt, d).out;
}

// ---------------------------------------------------------------------------------------
// Accuracy against float64
// ---------------------------------------------------------------------------------------

class ActivationTest : public ::testing::TestWithParam<Activation> {};

TEST_P(ActivationTest, MatchesDenseFloat64) {
  ProblemSpec s;
  s.act = GetParam();
  s.num_tokens = 32;
  s.top_k = 3;
  const Problem p = make_problem(s, 100 + static_cast<int>(s.act));
  const auto o = run_experts(p, p.options());
  const double err = rel_l2(to_double(o.out), dense(p, p.inputs(), p.options()));
  const double err_rounded = rel_l2(to_double(o.out), dense(p, p.inputs(), p.options(), true));
  std::printf("[ rel_l2   ] %s: %.3e vs float64, %.3e vs float64 with bf16 activation\n",
              activation_name(s.act), err, err_rounded);
  EXPECT_LT(err, kTol);
  EXPECT_LT(err_rounded, kTol);
}

INSTANTIATE_TEST_SUITE_P(All, ActivationTest,
                         ::testing::Values(Activation::Swiglu, Activation::SwigluOai,
                                           Activation::Geglu, Activation::Relu2),
                         [](const auto& info) { return std::string(activation_name(info.param)); });

struct Variant {
  const char* name;
  Activation act;
  bool biases, lora, per_expert, up_gate;
};

class VariantTest : public ::testing::TestWithParam<Variant> {};

TEST_P(VariantTest, MatchesDenseFloat64) {
  const Variant v = GetParam();
  ProblemSpec s;
  s.act = v.act;
  s.biases = v.biases;
  s.lora = v.lora;
  s.per_expert_act = v.per_expert;
  s.order = v.up_gate ? GateUpOrder::UpGate : GateUpOrder::GateUp;
  s.num_tokens = 20;
  s.top_k = 2;
  const Problem p = make_problem(s, 200);
  const auto o = run_experts(p, p.options());
  const double err = rel_l2(to_double(o.out), dense(p, p.inputs(), p.options()));
  std::printf("[ rel_l2   ] %s: %.3e\n", v.name, err);
  EXPECT_LT(err, kTol);
}

INSTANTIATE_TEST_SUITE_P(
    All, VariantTest,
    ::testing::Values(Variant{"swiglu_bias", Activation::Swiglu, true, false, false, false},
                      Variant{"swiglu_lora", Activation::Swiglu, false, true, false, false},
                      Variant{"swiglu_lora_upgate", Activation::Swiglu, true, true, false, true},
                      Variant{"oai_per_expert", Activation::SwigluOai, true, false, true, false},
                      Variant{"oai_lora_upgate", Activation::SwigluOai, true, true, true, true},
                      Variant{"geglu_lora_bias", Activation::Geglu, true, true, false, false},
                      Variant{"relu2_lora_bias", Activation::Relu2, true, true, false, false}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(ExpertsReference, ActivationOutputFeedsGemm2) {
  ProblemSpec s;
  s.lora = true;
  s.biases = true;
  const Problem p = make_problem(s, 300);
  const auto o = run_experts(p, p.options(false), /*with_act=*/true);
  const int64_t H = s.hidden, I = s.inter;
  const int64_t P = o.offsets.data<int64_t>()[s.map.num_local_experts];
  // gemm2_out[p] = act[p] @ w2[e]^T + b2[e], up to the one bf16 rounding of the output.
  std::vector<double> got, want;
  for (int e = 0; e < s.map.num_local_experts; ++e) {
    for (int64_t r = o.offsets.data<int64_t>()[e]; r < o.offsets.data<int64_t>()[e + 1]; ++r) {
      for (int64_t h = 0; h < H; ++h) {
        double acc = p.w2_bias.data<float>()[e * H + h];
        for (int64_t i = 0; i < I; ++i) {
          acc += bf16_bits_to_float(o.act.data<uint16_t>()[r * I + i]) *
                 bf16_bits_to_float(p.w2.data<uint16_t>()[(e * H + h) * I + i]);
        }
        want.push_back(acc);
        got.push_back(bf16_bits_to_float(o.gemm2_out.data<uint16_t>()[r * H + h]));
      }
    }
  }
  ASSERT_GT(P, 0);
  EXPECT_LT(rel_l2(got, want), 3e-3);
}

TEST(ExpertsReference, RouterWeightOnInput) {
  ProblemSpec s;
  s.top_k = 1;
  s.num_tokens = 40;
  const Problem p = make_problem(s, 400);
  ExpertsOptions opt = p.options();
  opt.apply_router_weight_on_input = true;
  // Weights well away from 1 so that applying them to the output instead would show.
  for (int64_t m = 0; m < s.num_tokens; ++m) p.wts.data<float>()[m] = 0.3f + 0.01f * (m % 50);
  const auto o = run_experts(p, opt);
  const double err = rel_l2(to_double(o.out), dense(p, p.inputs(), opt));
  EXPECT_LT(err, kTol);
  ExpertsOptions on_output = p.options();
  EXPECT_GT(rel_l2(to_double(o.out), dense(p, p.inputs(), on_output)), 10 * kTol)
      << "the weight on the input must differ from the weight on the output (non-linear expert)";

  opt.do_finalize = false;
  const auto u = run_experts(p, opt);
  for (int64_t m = 0; m < s.num_tokens; ++m) {
    EXPECT_EQ(u.expert_weights.data<float>()[m], 1.0f) << "token " << m;
  }
}

TEST(ExpertsReference, SmallIntegersRelu2AreExact) {
  // Integer inputs, weights, biases and LoRA deltas in [-2, 2]: GEMM1 and relu^2 are exact
  // integers, the bf16 rounding of the activation (values above 256 lose bits) is the only
  // rounding before GEMM2, and GEMM2 (|sum| < 2^24) is exact in fp32. So gemm2_out must be
  // bitwise the bf16 of the float64 dense result with the activation rounded the same way.
  ProblemSpec s;
  s.act = Activation::Relu2;
  s.hidden = 64;
  s.inter = 64;
  s.top_k = 2;
  s.biases = true;
  s.lora = true;
  s.junk_fraction = 0.1;
  Problem p = make_problem(s, 450);
  std::mt19937_64 rng(test::seed(451));
  for (HostTensor* t : {&p.hidden, &p.w13, &p.w2, &p.w13_bias, &p.w2_bias, &p.lora}) {
    test::fill_small_int(*t, rng, 2);
  }
  const auto o = run_experts(p, p.options(false));
  reference::DenseOptions d;
  d.round_intermediate = true;
  d.per_slot = true;
  const auto ref = reference::dense_moe_f64(p.inputs(), p.weights(), s.map, p.options(), d);
  for (int64_t x = 0; x < s.num_tokens * s.top_k; ++x) {
    const int32_t perm = o.e2p.data<int32_t>()[x];
    if (perm < 0) continue;
    for (int64_t h = 0; h < s.hidden; ++h) {
      const double want = ref.per_slot[x * s.hidden + h];
      ASSERT_EQ(o.gemm2_out.data<uint16_t>()[perm * s.hidden + h],
                float_to_bf16_bits(static_cast<float>(want)))
          << "slot " << x << " (permuted row " << perm << "), col " << h << ": want " << want;
    }
  }
  // Check that some relu^2 exceed 256 (where bf16 rounds): any |gate| > 16 does.
  double max_gate = 0.0;
  for (int64_t m = 0; m < s.num_tokens; ++m) {
    for (int64_t i = 0; i < s.inter; ++i) {
      double g = 0.0;
      for (int64_t h = 0; h < s.hidden; ++h) {
        g += bf16_bits_to_float(p.hidden.data<uint16_t>()[m * s.hidden + h]) *
             bf16_bits_to_float(p.w13.data<uint16_t>()[i * s.hidden + h]);
      }
      max_gate = std::max(max_gate, g);
    }
  }
  EXPECT_GT(max_gate, 17.0) << "inputs too small to exercise the bf16 rounding of relu^2";
}

TEST(ExpertsReference, ZeroTokens) {
  ProblemSpec s;
  s.num_tokens = 0;
  const Problem p = make_problem(s, 500);
  EXPECT_NO_THROW(run_experts(p, p.options()));
  const auto o = run_experts(p, p.options(false));
  for (int e = 0; e <= s.map.num_local_experts; ++e) EXPECT_EQ(o.offsets.data<int64_t>()[e], 0);
}

// ---------------------------------------------------------------------------------------
// Bitwise identities
// ---------------------------------------------------------------------------------------

TEST(ExpertsReference, PackedEqualsUnpackedBf16Weights) {
  ProblemSpec s;
  s.top_k = 4;
  s.map = ExpertMap::for_rank(8, 2, 1);
  s.junk_fraction = 0.2;
  const Problem p = make_problem(s, 600);
  const int64_t n = s.num_tokens * s.top_k;
  HostTensor wbf(DType::BF16, {s.num_tokens, s.top_k});
  HostTensor packed(DType::I32, {s.num_tokens, s.top_k});
  for (int64_t x = 0; x < n; ++x) {
    const uint16_t bits = float_to_bf16_bits(p.wts.data<float>()[x]);
    wbf.data<uint16_t>()[x] = bits;
    const uint32_t id = static_cast<uint32_t>(p.ids.data<int32_t>()[x]);
    packed.data<int32_t>()[x] = static_cast<int32_t>((id << 16) | bits);
  }
  ExpertsInputs unpacked_in = p.inputs();
  unpacked_in.topk_weights = wbf;
  ExpertsInputs packed_in = p.inputs();
  packed_in.topk_ids = packed;
  packed_in.topk_weights = {};
  ExpertsOptions fp32_rounded = p.options();
  fp32_rounded.bf16_routing_weights = true;

  for (bool fin : {true, false}) {
    SCOPED_TRACE(fin ? "do_finalize" : "unfinalized");
    ExpertsOptions opt = p.options(fin);
    const auto a = run_experts(p, unpacked_in, p.weights(), opt);
    const auto b = run_experts(p, packed_in, p.weights(), opt);
    fp32_rounded.do_finalize = fin;
    const auto c = run_experts(p, p.inputs(), p.weights(), fp32_rounded);
    if (fin) {
      EXPECT_TRUE(bitwise_equal(a.out, b.out));
      EXPECT_TRUE(bitwise_equal(a.out, c.out));
    } else {
      const int64_t P = a.offsets.data<int64_t>()[s.map.num_local_experts];
      ASSERT_EQ(0, std::memcmp(a.gemm2_out.view().data, b.gemm2_out.view().data, P * s.hidden * 2));
      EXPECT_TRUE(bitwise_equal(a.expert_weights, b.expert_weights));
      EXPECT_TRUE(bitwise_equal(a.e2p, b.e2p));
      EXPECT_TRUE(bitwise_equal(a.offsets, b.offsets));
      EXPECT_TRUE(bitwise_equal(a.expert_weights, c.expert_weights));
    }
  }
}

TEST(ExpertsReference, UnfinalizedThenFinalizeEqualsFinalized) {
  ProblemSpec s;
  s.top_k = 3;
  s.map = ExpertMap::for_rank(8, 2, 0);
  s.junk_fraction = 0.25;
  s.biases = true;
  const Problem p = make_problem(s, 700);
  const auto full = run_experts(p, p.options(true));
  const auto split = run_experts(p, p.options(false));
  HostTensor out(DType::BF16, {s.num_tokens, s.hidden});
  poison(out);
  finalize(split.gemm2_out, split.expert_weights, split.e2p, out);
  EXPECT_TRUE(bitwise_equal(full.out, out));

  // The metadata is what permute() computes.
  HostTensor offsets(DType::I64, {s.map.num_local_experts + 1});
  HostTensor e2p(DType::I32, {s.num_tokens, s.top_k});
  HostTensor p2e(DType::I32, {s.num_tokens * s.top_k});
  poison(offsets);
  poison(e2p);
  poison(p2e);
  permute(p.ids, false, s.map, {offsets, e2p, p2e});
  EXPECT_TRUE(bitwise_equal(split.offsets, offsets));
  EXPECT_TRUE(bitwise_equal(split.e2p, e2p));

  // do_finalize = true fills the metadata views when given, with the same values.
  test::Outputs both;
  both.out.reset(DType::BF16, {s.num_tokens, s.hidden});
  both.gemm2_out.reset(DType::BF16, {s.num_tokens * s.top_k, s.hidden});
  both.expert_weights.reset(DType::F32, {s.num_tokens, s.top_k});
  both.e2p.reset(DType::I32, {s.num_tokens, s.top_k});
  both.offsets.reset(DType::I64, {s.map.num_local_experts + 1});
  poison(both.out);
  poison(both.gemm2_out);
  poison(both.expert_weights);
  poison(both.e2p);
  poison(both.offsets);
  experts(p.inputs(), p.weights(), s.map, p.options(true), both.views());
  EXPECT_TRUE(bitwise_equal(full.out, both.out));
  EXPECT_TRUE(bitwise_equal(split.expert_weights, both.expert_weights));
  EXPECT_TRUE(bitwise_equal(split.e2p, both.e2p));
  EXPECT_TRUE(bitwise_equal(split.offsets, both.offsets));
  const int64_t P = split.offsets.data<int64_t>()[s.map.num_local_experts];
  EXPECT_EQ(0, std::memcmp(split.gemm2_out.view().data, both.gemm2_out.view().data,
                           P * s.hidden * 2));
}

TEST(ExpertsReference, BatchedMatchesStandard) {
  ProblemSpec s;
  s.num_tokens = 40;
  s.top_k = 2;
  s.map = ExpertMap::for_rank(8, 2, 1);
  s.junk_fraction = 0.1;
  s.biases = true;
  const Problem p = make_problem(s, 800);
  const auto std_out = run_experts(p, p.options(false));
  const int64_t H = s.hidden;
  const int num_local = s.map.num_local_experts;
  const auto* off = std_out.offsets.data<int64_t>();
  int64_t max_m = 0;
  for (int e = 0; e < num_local; ++e) max_m = std::max(max_m, off[e + 1] - off[e]);
  max_m += 3;  // padding rows past every count

  // Batched rows of expert e: the tokens of its permuted segment, in order.
  std::vector<int32_t> p2e(static_cast<size_t>(s.num_tokens * s.top_k), -1);
  for (int64_t x = 0; x < s.num_tokens * s.top_k; ++x) {
    if (std_out.e2p.data<int32_t>()[x] >= 0) p2e[std_out.e2p.data<int32_t>()[x]] = static_cast<int32_t>(x);
  }
  HostTensor hidden_b(DType::BF16, {num_local, max_m, H});
  HostTensor counts(DType::I32, {num_local});
  std::mt19937_64 rng(test::seed(850));
  test::fill_normal(hidden_b, rng, 0.1f);  // the padding rows hold junk, never read
  for (int e = 0; e < num_local; ++e) {
    counts.data<int32_t>()[e] = static_cast<int32_t>(off[e + 1] - off[e]);
    for (int64_t r = 0; r < off[e + 1] - off[e]; ++r) {
      const int64_t token = p2e[off[e] + r] / s.top_k;
      std::memcpy(hidden_b.data<uint16_t>() + (e * max_m + r) * H,
                  p.hidden.data<uint16_t>() + token * H, H * 2);
    }
  }
  ExpertsInputs in;
  in.hidden = hidden_b;
  in.expert_num_tokens = counts;
  HostTensor g2(DType::BF16, {num_local, max_m, H});
  poison(g2);
  ExpertsOutputs out;
  out.gemm2_out = g2;
  experts(in, p.weights(), s.map, p.options(false), out);

  for (int e = 0; e < num_local; ++e) {
    for (int64_t r = 0; r < max_m; ++r) {
      const uint16_t* got = g2.data<uint16_t>() + (e * max_m + r) * H;
      if (r < off[e + 1] - off[e]) {
        const uint16_t* want = std_out.gemm2_out.data<uint16_t>() + (off[e] + r) * H;
        ASSERT_EQ(0, std::memcmp(got, want, H * 2)) << "expert " << e << " row " << r;
      } else {
        for (int64_t h = 0; h < H; ++h) ASSERT_EQ(got[h], 0) << "padding row " << e << "," << r;
      }
    }
  }
  const auto ref = reference::dense_moe_f64(in, p.weights(), s.map, p.options(false)).out;
  EXPECT_LT(rel_l2(to_double(g2), ref), kTol);
}

// Canonical w13 (and its bias) with the gate and up halves swapped.
void swap_halves(const HostTensor& src, HostTensor& dst, int64_t outer, int64_t rows,
                 int64_t row_elems) {
  const size_t esize = dtype_bytes(src.view().dtype);
  dst.reset(src.view().dtype, std::vector<int64_t>(src.view().shape.begin(),
                                                   src.view().shape.begin() + src.view().ndim));
  const int64_t half = rows / 2;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(static_cast<char*>(dst.view().data) + ((o * rows + r) * row_elems) * esize,
                  static_cast<const char*>(src.view().data) +
                      ((o * rows + (r + half) % rows) * row_elems) * esize,
                  row_elems * esize);
    }
  }
}

TEST(ExpertsReference, UpGateEqualsGateUpWithSwappedRows) {
  ProblemSpec s;
  s.biases = true;
  s.lora = true;
  for (Activation act : {Activation::Swiglu, Activation::SwigluOai}) {
    SCOPED_TRACE(activation_name(act));
    s.act = act;
    const Problem p = make_problem(s, 900);
    const int64_t E = s.map.num_local_experts, R = p.rows13();
    HostTensor w13u, b13u, lora_u;
    swap_halves(p.w13, w13u, E, R, s.hidden);
    swap_halves(p.w13_bias, b13u, E, R, 1);
    // LoRA columns follow the canonical order of the weights: swap them too.
    swap_halves(p.lora, lora_u, s.num_tokens * s.top_k, R, 1);
    ExpertWeights wu = p.weights();
    wu.order = GateUpOrder::UpGate;
    wu.w13 = w13u;
    wu.w13_bias = b13u;
    ExpertsInputs in_u = p.inputs();
    in_u.gemm1_lora_delta = lora_u;
    const auto a = run_experts(p, p.options());
    const auto b = run_experts(p, in_u, wu, p.options());
    EXPECT_TRUE(bitwise_equal(a.out, b.out));
  }
}

TEST(ExpertsReference, InterleavedPreparedEqualsCanonical) {
  for (GateUpOrder order : {GateUpOrder::GateUp, GateUpOrder::UpGate}) {
    for (int g : {8, 16, 64}) {
      SCOPED_TRACE(::testing::Message() << "order " << static_cast<int>(order) << " G " << g);
      ProblemSpec s;
      s.biases = true;
      s.lora = true;
      s.order = order;
      s.act = g == 16 ? Activation::SwigluOai : Activation::Swiglu;
      s.per_expert_act = g == 16;
      const Problem p = make_problem(s, 1000 + g);
      const ExpertWeights src = p.weights();
      HostTensor w13(src.w13.dtype, {src.w13.shape[0], src.w13.shape[1], src.w13.shape[2]});
      HostTensor w2(src.w2.dtype, {src.w2.shape[0], src.w2.shape[1], src.w2.shape[2]});
      HostTensor b13(DType::F32, {src.w13_bias.shape[0], src.w13_bias.shape[1]});
      HostTensor b2(DType::F32, {src.w2_bias.shape[0], src.w2_bias.shape[1]});
      for (HostTensor* t : {&w13, &w2, &b13, &b2}) poison(*t);
      ExpertWeights dst;
      dst.w13 = w13;
      dst.w2 = w2;
      dst.w13_bias = b13;
      dst.w2_bias = b2;
      prepare_weights(src, dst, {WeightLayout::GateUpInterleaved, g});
      ASSERT_EQ(dst.layout, WeightLayout::GateUpInterleaved);
      ASSERT_EQ(dst.interleave_rows, g);
      ASSERT_EQ(dst.order, order);
      // Every prepared row holds the canonical row the layout promises.
      for (int64_t e = 0; e < s.map.num_local_experts; ++e) {
        for (int64_t i = 0; i < s.inter; ++i) {
          for (bool gate : {true, false}) {
            const int64_t d = gate ? dst.gate_row(i) : dst.up_row(i);
            const int64_t c = gate ? src.gate_row(i) : src.up_row(i);
            ASSERT_EQ(0, std::memcmp(w13.data<uint16_t>() + (e * p.rows13() + d) * s.hidden,
                                     p.w13.data<uint16_t>() + (e * p.rows13() + c) * s.hidden,
                                     s.hidden * 2))
                << "expert " << e << (gate ? " gate " : " up ") << i;
          }
        }
      }
      for (bool fin : {true, false}) {
        const auto a = run_experts(p, p.inputs(), src, p.options(fin), true);
        const auto b = run_experts(p, p.inputs(), dst, p.options(fin), true);
        if (fin) {
          EXPECT_TRUE(bitwise_equal(a.out, b.out));
        } else {
          EXPECT_TRUE(bitwise_equal(a.gemm2_out, b.gemm2_out));
          EXPECT_TRUE(bitwise_equal(a.act, b.act));
        }
      }
    }
  }
}

TEST(ExpertsReference, PrepareNonGatedIsACopy) {
  ProblemSpec s;
  s.act = Activation::Relu2;
  const Problem p = make_problem(s, 1100);
  const ExpertWeights src = p.weights();
  HostTensor w13(DType::BF16, {src.w13.shape[0], src.w13.shape[1], src.w13.shape[2]});
  HostTensor w2(DType::BF16, {src.w2.shape[0], src.w2.shape[1], src.w2.shape[2]});
  poison(w13);
  poison(w2);
  ExpertWeights dst;
  dst.w13 = w13;
  dst.w2 = w2;
  prepare_weights(src, dst);
  EXPECT_EQ(dst.layout, WeightLayout::Canonical);
  EXPECT_TRUE(bitwise_equal(w13, p.w13));
  EXPECT_TRUE(bitwise_equal(w2, p.w2));
  EXPECT_TRUE(bitwise_equal(run_experts(p, p.inputs(), dst, p.options()).out,
                            run_experts(p, p.options()).out));
}

TEST(ExpertsReference, ExpertParallelSlices) {
  const int E = 8, ep = 4;
  ProblemSpec s;
  s.num_experts = E;
  s.top_k = 3;
  s.num_tokens = 32;
  s.junk_fraction = 0.15;  // -1 and num_experts padding ids
  s.biases = true;
  const Problem p = make_problem(s, 1200);
  const auto single = run_experts(p, p.options());
  const int64_t M = s.num_tokens, H = s.hidden, k = s.top_k, n = M * k;

  std::vector<float> sum(static_cast<size_t>(M * H), 0.0f);
  for (int r = 0; r < ep; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    const ExpertMap map = ExpertMap::for_rank(E, ep, r);
    const int64_t first = map.local_expert_offset, count = map.num_local_experts;
    ExpertWeights w = p.weights();
    w.w13 = make_view(p.w13.data<uint16_t>() + first * p.rows13() * H, DType::BF16,
                      {count, p.rows13(), H});
    w.w2 = make_view(p.w2.data<uint16_t>() + first * H * s.inter, DType::BF16,
                     {count, H, s.inter});
    w.w13_bias = make_view(p.w13_bias.data<float>() + first * p.rows13(), DType::F32,
                           {count, p.rows13()});
    w.w2_bias = make_view(p.w2_bias.data<float>() + first * H, DType::F32, {count, H});
    Problem pr_spec_only;
    pr_spec_only.spec = s;
    pr_spec_only.spec.map = map;
    const auto o = run_experts(pr_spec_only, p.inputs(), w, p.options());
    for (int64_t i = 0; i < M * H; ++i) sum[i] += bf16_bits_to_float(o.out.data<uint16_t>()[i]);

    // Non-local ids contribute exactly nothing: rewriting them (other ranks' ids -> -1 or E)
    // and giving them NaN weights changes no bit; rows with no local id are exact zeros.
    HostTensor ids2(DType::I32, {M, k}), wts2(DType::F32, {M, k});
    for (int64_t x = 0; x < n; ++x) {
      const int32_t id = p.ids.data<int32_t>()[x];
      const bool local = map.is_local(id);
      ids2.data<int32_t>()[x] = local ? id : (x % 2 ? -1 : E);
      wts2.data<float>()[x] = local ? p.wts.data<float>()[x] : std::nanf("");
    }
    ExpertsInputs in2 = p.inputs();
    in2.topk_ids = ids2;
    in2.topk_weights = wts2;
    const auto o2 = run_experts(pr_spec_only, in2, w, p.options());
    EXPECT_TRUE(bitwise_equal(o.out, o2.out));
    for (int64_t m = 0; m < M; ++m) {
      bool any_local = false;
      for (int64_t j = 0; j < k; ++j) any_local |= map.is_local(p.ids.data<int32_t>()[m * k + j]);
      if (any_local) continue;
      for (int64_t h = 0; h < H; ++h) {
        ASSERT_EQ(o.out.data<uint16_t>()[m * H + h], 0) << "token " << m << " has no local expert";
      }
    }
  }
  std::vector<double> combined(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) combined[i] = round_to_bf16(sum[i]);
  EXPECT_LT(rel_l2(combined, to_double(single.out)), kTol);
  EXPECT_LT(rel_l2(combined, dense(p, p.inputs(), p.options())), kTol);
}

TEST(ExpertsReference, FusedEqualsRouteThenExperts) {
  struct Case {
    RoutingMethod method;
    int top_k;
    ExpertMap map;
    bool on_input;
  };
  const Case cases[] = {{RoutingMethod::Renormalize, 2, ExpertMap::single(8), false},
                        {RoutingMethod::Default, 3, ExpertMap::for_rank(8, 2, 1), false},
                        {RoutingMethod::Llama4, 1, ExpertMap::single(8), true}};
  int salt = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(routing_method_name(c.method));
    ProblemSpec s;
    s.top_k = c.top_k;
    s.map = c.map;
    const Problem p = make_problem(s, 1300 + salt++);
    std::mt19937_64 rng(test::seed(1350));
    HostTensor logits(DType::F32, {s.num_tokens, s.num_experts});
    test::fill_normal(logits, rng, 1.0f);
    RoutingParams rp;
    rp.method = c.method;
    rp.num_experts = s.num_experts;
    rp.top_k = c.top_k;
    ExpertsOptions opt = p.options();
    opt.apply_router_weight_on_input = c.on_input;

    HostTensor ids(DType::I32, {s.num_tokens, c.top_k}), wts(DType::F32, {s.num_tokens, c.top_k});
    poison(ids);
    poison(wts);
    route(logits, {}, rp, ids, wts);
    ExpertsInputs in = p.inputs();
    in.topk_ids = ids;
    in.topk_weights = wts;
    const auto staged = run_experts(p, in, p.weights(), opt);

    const size_t ws_bytes = fused_moe_workspace_size(s.num_tokens, p.weights(), rp, s.map, opt);
    HostTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
    poison(ws);
    HostTensor out1(DType::BF16, {s.num_tokens, s.hidden}), out2(DType::BF16, {s.num_tokens, s.hidden});
    HostTensor ids1(DType::I32, {s.num_tokens, c.top_k}), wts1(DType::F32, {s.num_tokens, c.top_k});
    for (HostTensor* t : {&out1, &out2, &ids1, &wts1}) poison(*t);
    fused_moe(logits, {}, p.hidden, p.weights(), rp, s.map, opt, out1,
              {ws.view().data, ws_bytes}, nullptr, ids1, wts1);
    fused_moe(logits, {}, p.hidden, p.weights(), rp, s.map, opt, out2);  // CPU scratch
    EXPECT_TRUE(bitwise_equal(staged.out, out1));
    EXPECT_TRUE(bitwise_equal(staged.out, out2));
    EXPECT_TRUE(bitwise_equal(ids, ids1));
    EXPECT_TRUE(bitwise_equal(wts, wts1));
  }
}

TEST(ExpertsReference, RepeatRunsAreBitwiseEqual) {
  ProblemSpec s;
  s.act = Activation::SwigluOai;
  s.biases = true;
  s.lora = true;
  s.junk_fraction = 0.1;
  const Problem p = make_problem(s, 1400);
  const auto first = run_experts(p, p.options(false), true);
  const auto first_out = run_experts(p, p.options(true));
  for (int rep = 0; rep < 3; ++rep) {
    const auto again = run_experts(p, p.options(false), true);
    EXPECT_TRUE(bitwise_equal(first.gemm2_out, again.gemm2_out)) << "repeat " << rep;
    EXPECT_TRUE(bitwise_equal(first.act, again.act)) << "repeat " << rep;
    EXPECT_TRUE(bitwise_equal(first_out.out, run_experts(p, p.options(true)).out));
  }
}

}  // namespace
}  // namespace modmoe
