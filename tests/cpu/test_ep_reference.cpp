// The in-process expert-parallel simulation: dispatch/combine semantics and the EP layer
// against the single-rank experts stage; with FP8 weights, quantize before dispatch (each rank
// quantizes its own tokens, e4m3 rows and their scales travel, combine stays bf16) against the
// single-rank FP8 fused_moe (docs/fp8.md, "Quantize before dispatch"); with NVFP4 weights, the
// tokens travel as NVFP4 (packed rows, e4m3 block scales, one fp32 global per token) and are
// dequantized to bf16 on arrival for the W4A16 experts (docs/nvfp4.md, "Quantize before
// dispatch"): identity experts exact, real experts against the single-rank layer on the same
// dequantized rows, the W4A16 layer on bf16 rows and the bf16 layer.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "common/test_util.h"
#include "cpu/fp8_weights.h"
#include "modmoe/modmoe.h"
#include "reference/ep_sim.h"
#include "reference/quantize_weights.h"

namespace modmoe {
namespace {

using reference::EpRankTokens;

struct RankData {
  HostTensor hidden, ids, weights;
  EpRankTokens view() const { return {hidden, ids, weights}; }
};

// T tokens per rank with k distinct random expert ids each, hidden stamped with the rank.
std::vector<RankData> make_ranks(int ep, const std::vector<int>& tokens, int e, int k, int64_t h,
                                 std::mt19937_64& rng, bool stamp) {
  std::vector<RankData> out(static_cast<size_t>(ep));
  for (int r = 0; r < ep; ++r) {
    RankData& d = out[r];
    d.hidden.reset(DType::BF16, {tokens[r], h});
    d.ids.reset(DType::I32, {tokens[r], k});
    d.weights.reset(DType::F32, {tokens[r], k});
    if (stamp) {
      for (int64_t i = 0; i < d.hidden.numel(); ++i) {
        // rank + token/1024 + col/8: exact in bf16 and distinct per rank
        d.hidden.data<uint16_t>()[i] = float_to_bf16_bits(static_cast<float>(r + 1) + (i % h % 8) * 0.125f);
      }
    } else {
      test::fill_normal(d.hidden, rng, 0.1f);
    }
    std::vector<int> perm(static_cast<size_t>(e));
    for (int t = 0; t < tokens[r]; ++t) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      float sum = 0;
      for (int j = 0; j < k; ++j) {
        d.ids.data<int32_t>()[t * k + j] = perm[j];
        d.weights.data<float>()[t * k + j] = 0.5f + static_cast<float>(rng() % 1000) / 1000.0f;
        sum += d.weights.data<float>()[t * k + j];
      }
      for (int j = 0; j < k; ++j) d.weights.data<float>()[t * k + j] /= sum;
    }
  }
  return out;
}

std::vector<EpRankTokens> views(const std::vector<RankData>& d) {
  std::vector<EpRankTokens> v;
  for (const auto& r : d) v.push_back(r.view());
  return v;
}

TEST(EpReference, RankStampedRoundTripWithExactCounts) {
  std::mt19937_64 rng(test::seed(1));
  const int ep = 4, e = 32, k = 4, h = 64;
  const auto data = make_ranks(ep, {5, 0, 9, 3}, e, k, h, rng, true);
  const auto ranks = views(data);
  const auto plan = reference::ep_plan(ranks, e, ep, 16);
  const auto rx = reference::ep_dispatch(plan, ranks);
  for (int r = 0; r < ep; ++r) {
    for (int s = 0; s < ep; ++s) {
      int expected = 0;
      for (int64_t t = 0; t < data[s].ids.view().size(0); ++t) {
        bool any = false;
        for (int j = 0; j < k; ++j) any |= data[s].ids.data<int32_t>()[t * k + j] / (e / ep) == r;
        expected += any;
      }
      ASSERT_EQ(rx[r].recv_counts[s], expected) << "rank " << r << " from " << s;
      int64_t prev = -1;
      for (int i = 0; i < 16; ++i) {
        const int32_t* ids = rx[r].topk_ids.data<int32_t>() + (s * 16 + i) * k;
        if (i >= expected) {
          for (int j = 0; j < k; ++j) ASSERT_EQ(ids[j], -1) << "padding row " << i;
          continue;
        }
        // Rows arrive in source-token order and carry the sender's stamp.
        const int64_t t = plan.sent[s][r][i];
        ASSERT_GT(t, prev);
        prev = t;
        const float stamp = bf16_bits_to_float(rx[r].hidden.data<uint16_t>()[(s * 16 + i) * h]);
        ASSERT_EQ(stamp, static_cast<float>(s + 1));
      }
    }
  }
  // Identity experts: every rank returns what it received; combine sums once per rank sent to.
  std::vector<HostTensor> payloads;
  for (int r = 0; r < ep; ++r) {
    payloads.emplace_back(DType::BF16, std::vector<int64_t>{ep, 16, h});
    std::memcpy(payloads.back().view().data, rx[r].hidden.view().data, rx[r].hidden.nbytes());
  }
  const auto back = reference::ep_combine(plan, ranks, payloads);
  for (int s = 0; s < ep; ++s) {
    for (int64_t t = 0; t < data[s].hidden.view().size(0); ++t) {
      int dests = 0;
      for (int r = 0; r < ep; ++r) dests += plan.slot[s][r][t] >= 0;
      for (int64_t c = 0; c < h; ++c) {
        const float x = bf16_bits_to_float(data[s].hidden.data<uint16_t>()[t * h + c]);
        ASSERT_EQ(bf16_bits_to_float(back[s].data<uint16_t>()[t * h + c]), round_to_bf16(dests * x))
            << "rank " << s << " token " << t << " col " << c;
      }
    }
  }
}

TEST(EpReference, OverflowIsAnErrorNamingRanksAndLimit) {
  std::mt19937_64 rng(test::seed(2));
  const auto data = make_ranks(2, {9, 2}, 8, 2, 16, rng, true);
  try {
    reference::ep_plan(views(data), 8, 2, 4);
    FAIL() << "no error";
  } catch (const Error& err) {
    EXPECT_THAT(err.what(), ::testing::HasSubstr("all-to-all overflow: rank 0 sends"));
    EXPECT_THAT(err.what(), ::testing::HasSubstr("expected at most max_tokens = 4"));
  }
}

TEST(EpReference, LayerMatchesSingleRankWithinTolerance) {
  std::mt19937_64 rng(test::seed(3));
  const int e = 16, k = 4;
  const int64_t h = 128, inter = 64;
  HostTensor w13(DType::BF16, {e, 2 * inter, h}), w2(DType::BF16, {e, h, inter});
  test::fill_normal(w13, rng, 1.0f / std::sqrt(static_cast<float>(h)));
  test::fill_normal(w2, rng, 1.0f / std::sqrt(static_cast<float>(inter)));
  ExpertWeights weights;
  weights.w13 = w13;
  weights.w2 = w2;
  for (int ep : {2, 4}) {
    // Rank 1 has no tokens; every other rank has a few, some of whose experts are all remote.
    std::vector<int> tokens(static_cast<size_t>(ep), 6);
    tokens[1] = 0;
    const auto data = make_ranks(ep, tokens, e, k, h, rng, false);
    const auto outs = reference::ep_moe_layer(views(data), weights, e, ep, 8, ExpertsOptions{});
    for (int s = 0; s < ep; ++s) {
      const int64_t t_count = data[s].hidden.view().size(0);
      HostTensor single(DType::BF16, {t_count, h});
      ExpertsInputs in;
      in.hidden = data[s].hidden;
      in.topk_ids = data[s].ids;
      in.topk_weights = data[s].weights;
      ExpertsOutputs o;
      o.out = single;
      experts(in, weights, ExpertMap::single(e), ExpertsOptions{}, o);
      const double err = test::rel_l2(test::to_double(outs[s]), test::to_double(single));
      EXPECT_LT(err, 5e-3) << "ep " << ep << " rank " << s;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Quantize before dispatch (FP8)
// ---------------------------------------------------------------------------------------

constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kTen = QuantScheme::Fp8PerTensor;

// [first, first + count) rows of a host tensor.
TensorView rows_of(const HostTensor& t, int64_t first, int64_t count) {
  TensorView v = t.view();
  v.data = static_cast<char*>(v.data) + first * v.strides[0] * static_cast<int64_t>(dtype_bytes(v.dtype));
  v.shape[0] = count;
  return v;
}

// One global batch of ep * T tokens routed by modmoe::route, rank r holding rows
// [r*T, (r+1)*T), and canonical FP8 weights of all E experts quantized from float masters.
// Rank r's tokens are scaled by 1 + 0.37 r, so that per-tensor scales differ between ranks by
// factors that are not powers of two (a power of two would keep the e4m3 grid).
struct Fp8Layer {
  int ep = 4, E = 16, k = 4;
  int64_t T = 12, H = 256, I = 256;
  QuantScheme scheme = kBlk;
  HostTensor hidden, logits, ids, wts;  // [ep*T, H] bf16, [ep*T, E] fp32, [ep*T, k] x2
  HostTensor w13, w2, s13, s2;          // e4m3 [E, 2I, H], [E, H, I]; scales
  RoutingParams rp;

  ExpertWeights weights() const {
    ExpertWeights w;
    w.scheme = scheme;
    w.w13 = w13;
    w.w2 = w2;
    w.w13_scale = s13;
    w.w2_scale = s2;
    return w;
  }
  std::vector<EpRankTokens> ranks() const {
    std::vector<EpRankTokens> v;
    for (int r = 0; r < ep; ++r) {
      v.push_back({rows_of(hidden, r * T, T), rows_of(ids, r * T, T), rows_of(wts, r * T, T), {}});
    }
    return v;
  }
  // fused_moe over the global batch on one rank: out [ep*T, H] bf16.
  HostTensor fused() const {
    const ExpertMap map = ExpertMap::single(E);
    ExpertsOptions opt;
    const size_t ws_bytes = fused_moe_workspace_size(ep * T, weights(), rp, map, opt);
    HostTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)}), out(DType::BF16, {ep * T, H});
    test::poison(out);
    fused_moe(logits, {}, hidden, weights(), rp, map, opt, out, {ws.view().data, ws_bytes});
    return out;
  }
};

// The quantized layers' tokens: ep * T rows of H bf16 values (rank r's scaled by 1 + 0.37 r, so
// the ranks' quantization scales differ), logits over E experts, routed top-k (Renormalize).
template <class Layer>
void make_tokens(Layer& L, std::mt19937_64& rng) {
  const int64_t M = L.ep * L.T;
  L.hidden.reset(DType::BF16, {M, L.H});
  test::fill_normal(L.hidden, rng, 1.0f);
  for (int64_t i = 0; i < L.hidden.numel(); ++i) {
    const float f = 1.0f + 0.37f * static_cast<float>(i / (L.T * L.H));
    auto& b = L.hidden.template data<uint16_t>()[i];
    b = float_to_bf16_bits(bf16_bits_to_float(b) * f);
  }
  L.logits.reset(DType::F32, {M, L.E});
  test::fill_normal(L.logits, rng, 1.0f);
  L.rp.method = RoutingMethod::Renormalize;
  L.rp.num_experts = L.E;
  L.rp.top_k = L.k;
  L.ids.reset(DType::I32, {M, L.k});
  L.wts.reset(DType::F32, {M, L.k});
  route(L.logits, {}, L.rp, L.ids, L.wts);
}

Fp8Layer make_fp8_layer(QuantScheme scheme, int ep, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Fp8Layer L;
  L.scheme = scheme;
  L.ep = ep;
  make_tokens(L, rng);
  const auto w13 = test::block_varied(rng, L.E, 2 * L.I, L.H, 1.0f / std::sqrt(float(L.H)));
  const auto w2 = test::block_varied(rng, L.E, L.H, L.I, 1.0f / std::sqrt(float(L.I)));
  test::quantize_weights(w13, L.E, 2 * L.I, L.H, scheme, L.w13, L.s13);
  test::quantize_weights(w2, L.E, L.H, L.I, scheme, L.w2, L.s2);
  return L;
}

// Relative L2 of rank r's EP output against rows [r*T, (r+1)*T) of a global [ep*T, H] result.
double rank_rel_l2(const Fp8Layer& L, const HostTensor& ep_out, const HostTensor& global, int r) {
  HostTensor want(DType::BF16, {L.T, L.H});
  std::memcpy(want.view().data, rows_of(global, r * L.T, L.T).data, want.nbytes());
  return test::rel_l2(test::to_double(ep_out), test::to_double(want));
}

TEST(EpReference, Fp8PayloadBytesPerToken) {
  // DeepSeek-V3: H = 7168, k = 8. bf16 hidden 2H; e4m3 hidden H plus its fp32 scales.
  const int64_t h = 7168;
  EXPECT_EQ(reference::ep_payload_bytes_per_token(QuantScheme::None, h, 8), 2 * 7168 + 32u);
  EXPECT_EQ(reference::ep_payload_bytes_per_token(kBlk, h, 8), 7168 + 4 * 56 + 32u);
  EXPECT_EQ(reference::ep_payload_bytes_per_token(kTen, h, 8), 7168 + 4 + 32u);
  EXPECT_MODMOE_ERROR(reference::ep_payload_bytes_per_token(QuantScheme::Mxfp8, h, 8),
                      "not supported yet", "mxfp8");
  // What the simulated dispatch carries per token is exactly that: hidden + scales + weights.
  for (QuantScheme scheme : {QuantScheme::None, kBlk, kTen}) {
    SCOPED_TRACE(quant_scheme_name(scheme));
    const Fp8Layer L = make_fp8_layer(kBlk, 2, 40);
    std::vector<EpRankTokens> ranks = L.ranks();
    std::vector<reference::EpQuantized> q;
    for (auto& r : ranks) {
      if (scheme == QuantScheme::None) continue;
      q.push_back(reference::ep_quantize(r.hidden, scheme));
      r.hidden = q.back().hidden;
      r.hidden_scale = q.back().hidden_scale;
    }
    const auto rx = reference::ep_dispatch(reference::ep_plan(ranks, L.E, L.ep, L.T), ranks);
    const int64_t rows = L.ep * L.T;
    const size_t per_token = (rx[0].hidden.nbytes() + rx[0].hidden_scale.nbytes() +
                              rx[0].topk_weights.nbytes()) / static_cast<size_t>(rows);
    EXPECT_EQ(per_token, reference::ep_payload_bytes_per_token(scheme, L.H, L.k));
  }
}

// Every rank quantizes its own tokens; the e4m3 rows and their scales arrive unchanged, in
// source order, padding rows zero. Per 1x128 group the rank-local quantization is the global
// one, bit for bit; per tensor each rank has its own scale, written once per token.
TEST(EpReference, Fp8RowsAndScalesTravelUnchanged) {
  for (QuantScheme scheme : {kBlk, kTen}) {
    SCOPED_TRACE(quant_scheme_name(scheme));
    const Fp8Layer L = make_fp8_layer(scheme, 4, 41);
    const reference::EpQuantized global = reference::ep_quantize(L.hidden, scheme);
    std::vector<EpRankTokens> ranks = L.ranks();
    std::vector<reference::EpQuantized> q;
    for (int r = 0; r < L.ep; ++r) q.push_back(reference::ep_quantize(ranks[r].hidden, scheme));
    for (int r = 0; r < L.ep; ++r) {
      ranks[r].hidden = q[r].hidden;
      ranks[r].hidden_scale = q[r].hidden_scale;
      const float* s = q[r].hidden_scale.data<float>();
      if (scheme == kBlk) {
        EXPECT_EQ(std::memcmp(q[r].hidden.view().data, rows_of(global.hidden, r * L.T, L.T).data, q[r].hidden.nbytes()), 0);
        EXPECT_EQ(std::memcmp(s, rows_of(global.hidden_scale, r * L.T, L.T).data, q[r].hidden_scale.nbytes()), 0);
      } else {
        for (int64_t t = 0; t < L.T; ++t) ASSERT_EQ(s[t], s[0]);
        if (r > 0) EXPECT_NE(s[0], q[r - 1].hidden_scale.data<float>()[0]) << "rank " << r;
      }
    }
    const auto plan = reference::ep_plan(ranks, L.E, L.ep, L.T);
    const auto rx = reference::ep_dispatch(plan, ranks);
    const int64_t sc = reference::ep_scales_per_token(scheme, L.H);
    for (int r = 0; r < L.ep; ++r) {
      for (int s = 0; s < L.ep; ++s) {
        for (int64_t i = 0; i < L.T; ++i) {
          const int64_t row = s * L.T + i;
          const uint8_t* got = rx[r].hidden.data<uint8_t>() + row * L.H;
          const float* got_s = rx[r].hidden_scale.data<float>() + row * sc;
          if (i >= rx[r].recv_counts[s]) {
            for (int64_t c = 0; c < L.H; ++c) ASSERT_EQ(got[c], 0) << "padding row " << row;
            for (int64_t c = 0; c < sc; ++c) ASSERT_EQ(got_s[c], 0.0f) << "padding row " << row;
            continue;
          }
          const int64_t t = plan.sent[s][r][i];
          ASSERT_EQ(std::memcmp(got, q[s].hidden.data<uint8_t>() + t * L.H, L.H), 0) << "rank " << r << " row " << row;
          ASSERT_EQ(std::memcmp(got_s, q[s].hidden_scale.data<float>() + t * sc, sc * 4), 0) << "rank " << r << " row " << row;
        }
      }
    }
  }
}

// Fp8Block128: the 1x128 groups belong to one token, so every rank quantizes its rows exactly
// as fused_moe quantizes the global batch; the GEMM rows are the same too. What differs is the
// combine: each rank's partial sum is rounded to bf16 (2^-8 / sqrt(3) = 0.0023 relative RMS),
// then the sum once more. Bound 5e-3, as docs/fp8.md "Measured through the API" (EP = 4 slices
// summed: 0.0021 to 0.0030).
TEST(EpReference, Fp8BlockLayerMatchesSingleRankFusedMoe) {
  for (int ep : {2, 4}) {
    SCOPED_TRACE(::testing::Message() << "ep " << ep);
    const Fp8Layer L = make_fp8_layer(kBlk, ep, 42);
    const auto outs = reference::ep_moe_layer(L.ranks(), L.weights(), L.E, ep, L.T, ExpertsOptions{});
    const HostTensor fused = L.fused();
    for (int r = 0; r < ep; ++r) {
      const double err = rank_rel_l2(L, outs[r], fused, r);
      std::printf("[ rel_l2   ] fp8-block ep %d rank %d: vs fused_moe %.6f\n", ep, r, err);
      EXPECT_LT(err, 5e-3) << "rank " << r;
    }
  }
}

// Fp8PerTensor: each rank's dynamic scale is over its own tokens (s_r = amax_r / 448), while
// fused_moe on one rank uses one scale over the whole global batch (s = max_r s_r). So:
//  - against experts() on one rank fed with the same rows and per-row scales (the ranks'
//    quantized tokens concatenated, hidden_scale [M]), only the bf16 combine rounding differs:
//    bound 5e-3 as for Fp8Block128;
//  - against fused_moe the rows of a rank with s_r != s (ratio not a power of two) are
//    another e4m3 rounding of the same bf16 hidden: two roundings, each up to u/sqrt(3) =
//    0.036 relative RMS (u = 2^-4), are at most sqrt(2) x 0.036 = 0.051 apart; that
//    difference goes through GEMM1 and re-rounds the intermediate to e4m3 differently (up to
//    sqrt(2) x 0.036 more), about sqrt(0.051^2 + 0.051^2) = 0.072 in all. The rank holding
//    the global amax has s_r = s and differs only by the combine rounding. Bound 0.1, the
//    bound of the FP8 layer against the bf16 layer (test_fp8_api), also four e4m3 roundings.
TEST(EpReference, Fp8TensorLayerMatchesSameRowsAndFusedMoeWithinTheScaleDifference) {
  for (int ep : {2, 4}) {
    SCOPED_TRACE(::testing::Message() << "ep " << ep);
    const Fp8Layer L = make_fp8_layer(kTen, ep, 43);
    const std::vector<EpRankTokens> ranks = L.ranks();
    const auto outs = reference::ep_moe_layer(ranks, L.weights(), L.E, ep, L.T, ExpertsOptions{});
    const HostTensor fused = L.fused();

    // The same rows on one rank: every rank's quantized tokens with a scale per row.
    const int64_t M = ep * L.T;
    HostTensor q(DType::E4M3, {M, L.H}), s(DType::F32, {M}), single(DType::BF16, {M, L.H});
    float global_amax_rank_scale = 0.0f;
    for (int r = 0; r < ep; ++r) {
      const reference::EpQuantized x = reference::ep_quantize(ranks[r].hidden, kTen);
      std::memcpy(rows_of(q, r * L.T, L.T).data, x.hidden.view().data, x.hidden.nbytes());
      std::memcpy(rows_of(s, r * L.T, L.T).data, x.hidden_scale.view().data, x.hidden_scale.nbytes());
      global_amax_rank_scale = std::max(global_amax_rank_scale, x.hidden_scale.data<float>()[0]);
    }
    ExpertsInputs in;
    in.hidden = q;
    in.hidden_scale = s;
    in.topk_ids = L.ids;
    in.topk_weights = L.wts;
    ExpertsOutputs o;
    o.out = single;
    experts(in, L.weights(), ExpertMap::single(L.E), ExpertsOptions{}, o);

    for (int r = 0; r < ep; ++r) {
      const double same_rows = rank_rel_l2(L, outs[r], single, r);
      const double vs_fused = rank_rel_l2(L, outs[r], fused, r);
      const bool own_scale_is_global = s.data<float>()[r * L.T] == global_amax_rank_scale;
      std::printf("[ rel_l2   ] fp8-tensor ep %d rank %d: vs the same rows %.6f, vs fused_moe %.6f%s\n",
                  ep, r, same_rows, vs_fused, own_scale_is_global ? " (holds the global amax)" : "");
      EXPECT_LT(same_rows, 5e-3) << "rank " << r;
      EXPECT_LT(vs_fused, own_scale_is_global ? 5e-3 : 0.1) << "rank " << r;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Quantize before dispatch (NVFP4)
// ---------------------------------------------------------------------------------------

constexpr auto kFp4 = QuantScheme::Nvfp4;

// One global batch as Fp8Layer's (rank r's tokens scaled by 1 + 0.37 r, routed by
// modmoe::route), with bf16 master weights and the NVFP4 weights quantized from them
// (reference::quantize_expert_weights: one dynamic global per expert, as a ModelOpt checkpoint).
struct Nvfp4Layer {
  int ep = 4, E = 16, k = 4;
  int64_t T = 12, H = 256, I = 128;
  HostTensor hidden, logits, ids, wts;  // [ep*T, H] bf16, [ep*T, E] fp32, [ep*T, k] x2
  HostTensor m13, m2;                   // bf16 masters [E, 2I, H], [E, H, I]
  std::vector<HostTensor> keep;         // the NVFP4 tensors
  ExpertWeights fp4;                    // canonical NVFP4 weights of all E experts
  RoutingParams rp;

  ExpertWeights masters() const {
    ExpertWeights w;
    w.w13 = m13;
    w.w2 = m2;
    return w;
  }
  std::vector<EpRankTokens> ranks() const {
    std::vector<EpRankTokens> v;
    for (int r = 0; r < ep; ++r) {
      v.push_back({rows_of(hidden, r * T, T), rows_of(ids, r * T, T), rows_of(wts, r * T, T), {}, {}});
    }
    return v;
  }
  // experts() on one rank with all E experts over `x` [ep*T, H] bf16 and the batch's routing.
  HostTensor single(const ExpertWeights& w, const TensorView& x) const {
    HostTensor out(DType::BF16, {ep * T, H});
    test::poison(out);
    ExpertsInputs in;
    in.hidden = x;
    in.topk_ids = ids;
    in.topk_weights = wts;
    ExpertsOutputs o;
    o.out = out;
    experts(in, w, ExpertMap::single(E), ExpertsOptions{}, o);
    return out;
  }
};

Nvfp4Layer make_nvfp4_layer(int ep, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Nvfp4Layer L;
  L.ep = ep;
  make_tokens(L, rng);
  L.m13.reset(DType::BF16, {L.E, 2 * L.I, L.H});
  L.m2.reset(DType::BF16, {L.E, L.H, L.I});
  test::fill_normal(L.m13, rng, 1.0f / std::sqrt(static_cast<float>(L.H)));
  test::fill_normal(L.m2, rng, 1.0f / std::sqrt(static_cast<float>(L.I)));
  L.fp4 = reference::quantize_expert_weights(L.masters(), kFp4, L.keep);
  return L;
}

// The global batch quantized per row and dequantized: [ep*T, H] bf16, what every receiver
// hands its experts for these tokens.
HostTensor dequantized_batch(const Nvfp4Layer& L) {
  const reference::EpQuantized q = reference::ep_quantize(L.hidden, kFp4);
  HostTensor out(DType::BF16, {L.ep * L.T, L.H});
  dequantize_nvfp4(q.hidden, q.hidden_scale, q.hidden_global, out);
  return out;
}

double rank_rel_l2(const Nvfp4Layer& L, const HostTensor& ep_out, const HostTensor& global, int r) {
  HostTensor want(DType::BF16, {L.T, L.H});
  std::memcpy(want.view().data, rows_of(global, r * L.T, L.T).data, want.nbytes());
  return test::rel_l2(test::to_double(ep_out), test::to_double(want));
}

// DeepSeek-V3 (H = 7168, k = 8): packed e2m1 H/2 = 3584, e4m3 block scales H/16 = 448, the
// token's fp32 global 4, topk_weights 32: 4068 bytes (+ 32 for topk_ids: 4100), 0.283x the
// bf16 dispatch's 14368 (14400). The simulated dispatch carries exactly that per token.
TEST(EpReference, Nvfp4PayloadBytesPerToken) {
  EXPECT_EQ(reference::ep_scales_per_token(kFp4, 7168), 448);
  EXPECT_EQ(reference::ep_payload_bytes_per_token(kFp4, 7168, 8), 3584 + 448 + 4 + 32u);
  EXPECT_EQ(reference::ep_payload_bytes_per_token(kFp4, 2880, 4), 1440 + 180 + 4 + 16u);  // gpt-oss H
  const Nvfp4Layer L = make_nvfp4_layer(2, 50);
  std::vector<EpRankTokens> ranks = L.ranks();
  std::vector<reference::EpQuantized> q;
  for (auto& r : ranks) {
    q.push_back(reference::ep_quantize(r.hidden, kFp4));
    r.hidden = q.back().hidden;
    r.hidden_scale = q.back().hidden_scale;
    r.hidden_global = q.back().hidden_global;
  }
  const auto rx = reference::ep_dispatch(reference::ep_plan(ranks, L.E, L.ep, L.T), ranks);
  const int64_t rows = L.ep * L.T;
  const size_t per_token = (rx[0].hidden.nbytes() + rx[0].hidden_scale.nbytes() + rx[0].hidden_global.nbytes() +
                            rx[0].topk_weights.nbytes()) / static_cast<size_t>(rows);
  EXPECT_EQ(per_token, reference::ep_payload_bytes_per_token(kFp4, L.H, L.k));
  EXPECT_EQ(rx[0].hidden.view().dtype, DType::E2M1x2);
  EXPECT_EQ(rx[0].hidden_scale.view().dtype, DType::E4M3);
  // A rank that sends globals and one that does not: refused, naming the rank.
  std::vector<EpRankTokens> mixed = ranks;
  mixed[1].hidden_global = {};
  EXPECT_MODMOE_ERROR(reference::ep_dispatch(reference::ep_plan(mixed, L.E, L.ep, L.T), mixed), "rank 1",
                      "per-token globals", "as rank 0");
}

// Every rank quantizes its own tokens with one global per token: its bytes, scales and globals
// are the rows of the global batch quantized per row, bit for bit (a token's quantization does
// not depend on its batch), and the ranks' globals differ (their tokens' magnitudes do, by
// factors that are not powers of two). They arrive unchanged, in source order; padding rows
// are zero codes, zero scales and zero globals.
TEST(EpReference, Nvfp4RowsScalesAndGlobalsTravelUnchanged) {
  const Nvfp4Layer L = make_nvfp4_layer(4, 51);
  const reference::EpQuantized global = reference::ep_quantize(L.hidden, kFp4);
  std::vector<EpRankTokens> ranks = L.ranks();
  std::vector<reference::EpQuantized> q;
  for (int r = 0; r < L.ep; ++r) q.push_back(reference::ep_quantize(ranks[r].hidden, kFp4));
  const int64_t hb = L.H / 2, sc = L.H / kNvfp4BlockSize;
  for (int r = 0; r < L.ep; ++r) {
    ranks[r].hidden = q[r].hidden;
    ranks[r].hidden_scale = q[r].hidden_scale;
    ranks[r].hidden_global = q[r].hidden_global;
    EXPECT_EQ(std::memcmp(q[r].hidden.view().data, rows_of(global.hidden, r * L.T, L.T).data, q[r].hidden.nbytes()), 0);
    EXPECT_EQ(std::memcmp(q[r].hidden_scale.view().data, rows_of(global.hidden_scale, r * L.T, L.T).data,
                          q[r].hidden_scale.nbytes()), 0);
    EXPECT_EQ(std::memcmp(q[r].hidden_global.view().data, rows_of(global.hidden_global, r * L.T, L.T).data,
                          q[r].hidden_global.nbytes()), 0);
    if (r > 0) EXPECT_NE(q[r].hidden_global.data<float>()[0], q[r - 1].hidden_global.data<float>()[0]);
  }
  const auto plan = reference::ep_plan(ranks, L.E, L.ep, L.T);
  const auto rx = reference::ep_dispatch(plan, ranks);
  int64_t received = 0;
  for (int r = 0; r < L.ep; ++r) {
    for (int s = 0; s < L.ep; ++s) {
      for (int64_t i = 0; i < L.T; ++i) {
        const int64_t row = s * L.T + i;
        const uint8_t* got = rx[r].hidden.data<uint8_t>() + row * hb;
        const uint8_t* got_s = rx[r].hidden_scale.data<uint8_t>() + row * sc;
        const float got_g = rx[r].hidden_global.data<float>()[row];
        if (i >= rx[r].recv_counts[s]) {
          for (int64_t c = 0; c < hb; ++c) ASSERT_EQ(got[c], 0) << "padding row " << row;
          for (int64_t c = 0; c < sc; ++c) ASSERT_EQ(got_s[c], 0) << "padding row " << row;
          ASSERT_EQ(got_g, 0.0f) << "padding row " << row;
          continue;
        }
        ++received;
        const int64_t t = plan.sent[s][r][i];
        ASSERT_EQ(std::memcmp(got, q[s].hidden.data<uint8_t>() + t * hb, hb), 0) << "rank " << r << " row " << row;
        ASSERT_EQ(std::memcmp(got_s, q[s].hidden_scale.data<uint8_t>() + t * sc, sc), 0) << "rank " << r << " row " << row;
        ASSERT_EQ(got_g, q[s].hidden_global.data<float>()[t]) << "rank " << r << " row " << row;
      }
    }
  }
  EXPECT_GT(received, L.ep * L.T);  // top-4 of 16 experts over 4 ranks: most tokens go to several ranks
}

// Identity experts (each rank returns its dequantized input rows, unweighted): every token comes
// back as bf16(#destinations x its dequantized row), bit for bit (a decoded -0 comes back +0:
// the combine's fp32 sum starts from +0). The dequantized row is the
// token quantized alone ([1, H], its own global) and decoded: the round trip does not depend on
// the batch, the rank or the other tokens. And the round trip's error against the bf16 token is
// the e2m1 grid's: per element within max(d, amax_b - 6d) of its block (docs/nvfp4.md), about
// 0.1 relative RMS on normal rows.
TEST(EpReference, Nvfp4IdentityRoundTripIsExact) {
  for (int ep : {2, 4}) {
    SCOPED_TRACE(::testing::Message() << "ep " << ep);
    const Nvfp4Layer L = make_nvfp4_layer(ep, 52);
    const auto outs = reference::ep_moe_layer(L.ranks(), L.fp4, L.E, ep, L.T, ExpertsOptions{}, true);
    const std::vector<EpRankTokens> ranks = L.ranks();
    const auto plan = reference::ep_plan(ranks, L.E, ep, L.T);
    double e2 = 0, r2 = 0;
    for (int r = 0; r < ep; ++r) {
      for (int64_t t = 0; t < L.T; ++t) {
        int dests = 0;
        for (int d = 0; d < ep; ++d) dests += plan.slot[r][d][t] >= 0;
        ASSERT_GE(dests, 1);
        const TensorView x = rows_of(L.hidden, r * L.T + t, 1);
        HostTensor q(DType::E2M1x2, {1, L.H / 2}), s(DType::E4M3, {1, L.H / kNvfp4BlockSize}), g(DType::F32, {1});
        HostTensor back(DType::BF16, {1, L.H});
        quantize_nvfp4(x, q, s, g);
        dequantize_nvfp4(q, s, g, back);
        for (int64_t c = 0; c < L.H; ++c) {
          const float xh = bf16_bits_to_float(back.data<uint16_t>()[c]);
          // The combine's fp32 sum from +0: dests x xh exactly (xh has 8 significant bits),
          // and +0 for a decoded -0.
          float acc = 0.0f;
          for (int d = 0; d < dests; ++d) acc += xh;
          const uint16_t want = float_to_bf16_bits(acc);
          ASSERT_EQ(outs[r].data<uint16_t>()[t * L.H + c], want) << "rank " << r << " token " << t << " col " << c;
          const double xv = bf16_bits_to_float(x.ptr<uint16_t>()[c]);
          e2 += (xh - xv) * (xh - xv);
          r2 += xv * xv;
        }
      }
    }
    const double rt = std::sqrt(e2 / r2);
    std::printf("[ rel_l2   ] nvfp4 ep %d: round trip vs the bf16 tokens %.4f\n", ep, rt);
    EXPECT_GT(rt, 0.05);  // it is quantized
    EXPECT_LT(rt, 0.13);  // e2m1's ~0.10 (docs/nvfp4.md, "Error")
  }
}

// Real experts (W4A16 on the dequantized rows). Three references, from tight to loose:
//  - experts() on one rank over the dequantized global batch (what fused_moe on one GPU
//    computes from the same NVFP4 rows): the GEMM rows are the same bit for bit (a token's
//    quantization does not depend on its rank), only the combine differs: each rank's partial
//    sum is rounded to bf16 before the fp32 sum (2^-8/sqrt(3) = 0.0023 relative RMS). Bound 5e-3,
//    as for FP8 1x128 blocks. fused_moe itself (route + experts on the dequantized hidden) is
//    bitwise that single run.
//  - the W4A16 layer on the bf16 tokens (fused_moe, which does not quantize hidden): the only
//    difference is the e2m1 rounding of the hidden, u = 0.10 relative RMS per element
//    (docs/nvfp4.md, "Error"). It enters GEMM1 through gate and up, each with independent
//    weights: relative error u in each, and act = silu(gate) * up carries both, about
//    sqrt(2) u = 0.14. Bound 0.2.
//  - the bf16 layer (bf16 masters, bf16 tokens): the W4A16 layer is 0.16-0.175 from it
//    (test_nvfp4_api: three e2m1 roundings, w13 gate, up and w2, sqrt(3) u = 0.17); the hidden's
//    rounding adds two more independent ones (gate and up): sqrt(5) u = 0.22. Bound 0.3 (the
//    same 1.4x margin as test_nvfp4_api's 0.25 over 0.175).
TEST(EpReference, Nvfp4LayerMatchesTheDequantizedRowsAndTheBf16LayerWithinTheE2m1Bound) {
  for (int ep : {2, 4}) {
    SCOPED_TRACE(::testing::Message() << "ep " << ep);
    const Nvfp4Layer L = make_nvfp4_layer(ep, 53);
    const auto outs = reference::ep_moe_layer(L.ranks(), L.fp4, L.E, ep, L.T, ExpertsOptions{});
    const HostTensor xq = dequantized_batch(L);
    const HostTensor same_rows = L.single(L.fp4, xq);
    const HostTensor w4a16 = L.single(L.fp4, L.hidden);
    const HostTensor bf16 = L.single(L.masters(), L.hidden);
    {  // fused_moe on the dequantized batch == that single run, bit for bit
      const ExpertMap map = ExpertMap::single(L.E);
      ExpertsOptions opt;
      const size_t ws_bytes = fused_moe_workspace_size(ep * L.T, L.fp4, L.rp, map, opt);
      HostTensor ws(DType::U8, {static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))}), out(DType::BF16, {ep * L.T, L.H});
      test::poison(out);
      fused_moe(L.logits, {}, xq, L.fp4, L.rp, map, opt, out, {ws.view().data, ws_bytes});
      EXPECT_TRUE(test::bitwise_equal(out, same_rows));
    }
    for (int r = 0; r < ep; ++r) {
      const double a = rank_rel_l2(L, outs[r], same_rows, r);
      const double b = rank_rel_l2(L, outs[r], w4a16, r);
      const double c = rank_rel_l2(L, outs[r], bf16, r);
      std::printf("[ rel_l2   ] nvfp4 ep %d rank %d: vs the same rows %.6f, vs W4A16 on bf16 rows %.4f, "
                  "vs the bf16 layer %.4f\n", ep, r, a, b, c);
      EXPECT_LT(a, 5e-3) << "rank " << r;
      EXPECT_GT(b, 5e-3) << "rank " << r << ": the hidden is quantized";
      EXPECT_LT(b, 0.2) << "rank " << r;
      EXPECT_LT(c, 0.3) << "rank " << r;
    }
  }
}

}  // namespace
}  // namespace modmoe
