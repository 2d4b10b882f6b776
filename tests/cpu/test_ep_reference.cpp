// The in-process expert-parallel simulation: dispatch/combine semantics and the EP layer
// against the single-rank experts stage.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "common/test_util.h"
#include "modmoe/modmoe.h"
#include "reference/ep_sim.h"

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

}  // namespace
}  // namespace modmoe
