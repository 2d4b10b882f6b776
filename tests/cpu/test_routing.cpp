// Stage 1, routing, on the CPU: the golden data of tests/data/routing/ (every case of the six
// methods, fp32 and bf16 inputs), invariants on seeded random tie-free logits against an
// independent float64 evaluation of each definition, T = 0, and argument validation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/routing_golden.h"
#include "common/test_util.h"
#include "core/host_tensor.h"
#include "modmoe/error.h"
#include "modmoe/routing.h"

namespace modmoe {
namespace {

using ::testing::HasSubstr;

constexpr float kPoisonWeight = std::numeric_limits<float>::quiet_NaN();
constexpr int32_t kPoisonId = -77;

// Outputs of one route() call, poisoned so that an unwritten slot fails.
struct RouteOutputs {
  HostTensor ids;      // [T, k] int32
  HostTensor weights;  // [T, k] fp32

  RouteOutputs(int64_t num_tokens, int top_k)
      : ids(DType::I32, {num_tokens, top_k}), weights(DType::F32, {num_tokens, top_k}) {
    std::fill_n(ids.data<int32_t>(), ids.numel(), kPoisonId);
    std::fill_n(weights.data<float>(), weights.numel(), kPoisonWeight);
  }
  bool untouched() const {
    for (int64_t i = 0; i < ids.numel(); ++i) {
      if (ids.data<int32_t>()[i] != kPoisonId || !std::isnan(weights.data<float>()[i])) {
        return false;
      }
    }
    return true;
  }
};

HostTensor to_tensor(const std::vector<float>& values, std::initializer_list<int64_t> shape,
                     DType dtype) {
  return test::host_values(values, std::vector<int64_t>(shape), dtype);
}

RoutingParams golden_params(const test::RoutingGolden& g, const test::RoutingGoldenCase& c) {
  RoutingParams p;
  p.method = static_cast<RoutingMethod>(g.method);
  p.num_experts = c.num_experts;
  p.top_k = c.top_k;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.routed_scaling_factor = c.routed_scaling_factor;
  p.norm_topk_prob = true;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Golden data

class RoutingGoldenTest : public ::testing::TestWithParam<std::string> {};

void run_golden(const std::string& file) {
  const test::RoutingGolden g = test::load_routing_golden(file);
  ASSERT_FALSE(g.cases.empty()) << g.path;
  for (const auto& c : g.cases) {
    const RoutingParams p = golden_params(g, c);
    std::vector<DType> dtypes = {DType::F32};
    if (c.bf16_exact()) dtypes.push_back(DType::BF16);
    for (DType dt : dtypes) {
      SCOPED_TRACE(g.name + " case '" + c.label + "' with " + dtype_name(dt) + " logits");
      if (dt == DType::BF16) {  // the README promises the values are exact in bf16
        for (float v : c.logits) ASSERT_EQ(round_to_bf16(v), v);
        for (float v : c.bias) ASSERT_EQ(round_to_bf16(v), v);
      }
      HostTensor logits = to_tensor(c.logits, {c.num_tokens, c.num_experts}, dt);
      HostTensor bias;
      if (!c.bias.empty()) bias = to_tensor(c.bias, {c.num_experts}, dt);
      RouteOutputs out(c.num_tokens, c.top_k);
      route(logits, bias.view(), p, out.ids, out.weights);
      EXPECT_TRUE(test::compare_routing_to_golden(g, c, out.ids.data<int32_t>(),
                                                  out.weights.data<float>()));
    }
  }
}

TEST_P(RoutingGoldenTest, MatchesEveryCase) { run_golden(GetParam()); }

INSTANTIATE_TEST_SUITE_P(AllMethods, RoutingGoldenTest,
                         ::testing::ValuesIn(test::routing_golden_files()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string n = info.param.substr(0, info.param.find('.'));
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// The comparator must reject what it exists to catch.
TEST(RoutingGoldenLoader, ComparatorCatchesMistakes) {
  const test::RoutingGolden g = test::load_routing_golden("routing_m0_default.json");
  const auto& c = g.cases.at(1);  // e64
  std::vector<int32_t> ids = c.topk_ids;
  std::vector<float> w = c.topk_weights;
  EXPECT_TRUE(test::compare_routing_to_golden(g, c, ids.data(), w.data()));
  // Any row order passes: reverse row 0.
  std::reverse(ids.begin(), ids.begin() + c.top_k);
  std::reverse(w.begin(), w.begin() + c.top_k);
  EXPECT_TRUE(test::compare_routing_to_golden(g, c, ids.data(), w.data()));
  // A weight off by 1e-5 relative fails and names the row.
  w = c.topk_weights;
  ids = c.topk_ids;
  w[3 * c.top_k + 2] *= 1.00001f;
  auto r = test::compare_routing_to_golden(g, c, ids.data(), w.data());
  EXPECT_FALSE(r);
  EXPECT_THAT(r.message(), HasSubstr("row 3"));
  EXPECT_THAT(r.message(), HasSubstr("case 'e64'"));
  // A wrong id fails.
  w = c.topk_weights;
  ids[5 * c.top_k + 1] = (ids[5 * c.top_k + 1] + 1) % c.num_experts;
  r = test::compare_routing_to_golden(g, c, ids.data(), w.data());
  EXPECT_FALSE(r);
  EXPECT_THAT(r.message(), HasSubstr("row 5"));
  // A poisoned (NaN) weight fails.
  ids = c.topk_ids;
  w[0] = kPoisonWeight;
  EXPECT_FALSE(test::compare_routing_to_golden(g, c, ids.data(), w.data()));
}

// ---------------------------------------------------------------------------------------------
// Invariants on random tie-free logits, against an independent float64 evaluation

struct Shape {
  int num_tokens, num_experts, top_k, n_group, topk_group;
};

struct Expected {
  std::vector<int> ids;          // [k], in output order: descending selection score, then id
  std::vector<double> weights;   // [k]
  std::vector<double> sel;       // [E] selection score of every expert
};

// Float64 definitions, written independently of src/reference/routing.cpp: full sorts instead
// of partial ones, log-sum-exp softmax.
Expected expected_row(const RoutingParams& p, const double* l, const double* bias) {
  const int e_count = p.num_experts, k = p.top_k;
  Expected x;
  x.sel.assign(l, l + e_count);
  std::vector<bool> allowed(e_count, true);
  std::vector<double> sig(e_count);
  for (int e = 0; e < e_count; ++e) sig[e] = 1.0 / (1.0 + std::exp(-l[e]));
  const double mx = *std::max_element(l, l + e_count);
  double lse = 0.0;
  for (int e = 0; e < e_count; ++e) lse += std::exp(l[e] - mx);
  lse = mx + std::log(lse);
  if (p.method == RoutingMethod::Default || p.method == RoutingMethod::RenormalizeNaive) {
    for (int e = 0; e < e_count; ++e) x.sel[e] = std::exp(l[e] - lse);
  }
  if (p.method == RoutingMethod::DeepSeekV3) {
    const int gs = e_count / p.n_group;
    std::vector<std::pair<double, int>> gscore;
    for (int e = 0; e < e_count; ++e) x.sel[e] = sig[e] + (bias ? bias[e] : 0.0);
    for (int g = 0; g < p.n_group; ++g) {
      std::vector<double> b(x.sel.begin() + g * gs, x.sel.begin() + (g + 1) * gs);
      std::sort(b.rbegin(), b.rend());
      gscore.push_back({-(b[0] + b[1]), g});
    }
    std::sort(gscore.begin(), gscore.end());
    std::fill(allowed.begin(), allowed.end(), false);
    for (int i = 0; i < p.topk_group; ++i) {
      const int g = gscore[i].second;
      for (int e = g * gs; e < (g + 1) * gs; ++e) allowed[e] = true;
    }
  }
  std::vector<std::pair<double, int>> order;
  for (int e = 0; e < e_count; ++e) {
    if (allowed[e]) order.push_back({-x.sel[e], e});
  }
  std::sort(order.begin(), order.end());
  for (int j = 0; j < k; ++j) x.ids.push_back(order[j].second);
  double sum = 0.0;
  for (int id : x.ids) {
    double w = 0.0;
    switch (p.method) {
      case RoutingMethod::Default:
      case RoutingMethod::RenormalizeNaive: w = x.sel[id]; break;
      case RoutingMethod::Renormalize: w = std::exp(l[id] - l[x.ids[0]]); break;
      case RoutingMethod::DeepSeekV3: w = sig[id]; break;
      case RoutingMethod::Llama4: w = sig[id]; break;
      case RoutingMethod::TopK: w = l[id]; break;
    }
    x.weights.push_back(w);
    sum += w;
  }
  const bool renorm = p.method == RoutingMethod::Renormalize ||
                      p.method == RoutingMethod::RenormalizeNaive ||
                      (p.method == RoutingMethod::DeepSeekV3 && p.norm_topk_prob);
  for (double& w : x.weights) {
    if (renorm) w /= sum;
    if (p.method == RoutingMethod::DeepSeekV3) w *= p.routed_scaling_factor;
  }
  return x;
}

// True when `v` is at least `gap` away from each of `prev`.
bool apart(const std::vector<double>& prev, double v, double gap) {
  for (double p : prev) {
    if (std::fabs(p - v) < gap) return false;
  }
  return true;
}

// Draws N(0, 1.5^2) logits rounded to `dtype` into `out` [T, E]. A draw too close to an
// earlier logit of its row is redrawn (and for DeepSeekV3, one too close in biased or sigmoid
// score); a DeepSeekV3 row whose group scores come too close is redrawn whole. The expected
// picks and their order are then the same in float32 and float64.
void draw_tie_free_logits(const RoutingParams& p, int num_tokens, const std::vector<float>& bias,
                          DType dtype, std::mt19937_64& rng, std::vector<float>& out) {
  std::normal_distribution<float> dist(0.0f, 1.5f);
  const int e_count = p.num_experts;
  const bool dsv3 = p.method == RoutingMethod::DeepSeekV3;
  out.assign(static_cast<size_t>(num_tokens) * e_count, 0.0f);
  for (int t = 0; t < num_tokens; ++t) {
    for (int attempt = 0;; ++attempt) {
      ASSERT_LT(attempt, 1000) << "could not draw a tie-free row";
      std::vector<double> l, s, b;
      for (int e = 0; e < e_count; ++e) {
        for (int draw = 0;; ++draw) {
          ASSERT_LT(draw, 100000) << "could not draw a tie-free logit";
          float v = dist(rng);
          if (dtype == DType::BF16) v = round_to_bf16(v);
          const double sv = 1.0 / (1.0 + std::exp(-static_cast<double>(v)));
          const double bv = sv + (bias.empty() ? 0.0 : bias[e]);
          if (!apart(l, v, 1e-4)) continue;
          if (dsv3 && !(apart(b, bv, 1e-5) && apart(s, sv, 1e-6))) continue;
          out[static_cast<size_t>(t) * e_count + e] = v;
          l.push_back(v);
          s.push_back(sv);
          b.push_back(bv);
          break;
        }
      }
      if (!dsv3) break;
      const int gs = e_count / p.n_group;
      std::vector<double> gsum;
      bool ok = true;
      for (int g = 0; g < p.n_group && ok; ++g) {
        std::vector<double> gb(b.begin() + g * gs, b.begin() + (g + 1) * gs);
        std::sort(gb.rbegin(), gb.rend());
        ok = apart(gsum, gb[0] + gb[1], 1e-5);
        gsum.push_back(gb[0] + gb[1]);
      }
      if (ok) break;
    }
  }
}

void check_invariants(const RoutingParams& p, int num_tokens, DType dtype, uint64_t salt,
                      bool with_bias, float bias_lo = -0.15f, float bias_hi = 0.15f) {
  std::mt19937_64 rng(test::seed(salt));
  std::vector<float> bias;
  if (with_bias) {
    std::uniform_real_distribution<float> bd(bias_lo, bias_hi);
    for (int e = 0; e < p.num_experts; ++e) {
      float v = bd(rng);
      bias.push_back(dtype == DType::BF16 ? round_to_bf16(v) : v);
    }
  }
  std::vector<float> logits;
  draw_tie_free_logits(p, num_tokens, bias, dtype, rng, logits);
  if (::testing::Test::HasFatalFailure()) return;

  HostTensor logits_t = to_tensor(logits, {num_tokens, p.num_experts}, dtype);
  HostTensor bias_t;
  if (with_bias) bias_t = to_tensor(bias, {p.num_experts}, dtype);
  RouteOutputs out(num_tokens, p.top_k);
  route(logits_t, bias_t.view(), p, out.ids, out.weights);

  const int k = p.top_k;
  std::vector<double> l(p.num_experts), bd(p.num_experts);
  for (int t = 0; t < num_tokens; ++t) {
    const int32_t* ids = out.ids.data<int32_t>() + t * k;
    const float* w = out.weights.data<float>() + t * k;
    std::copy_n(logits.begin() + static_cast<size_t>(t) * p.num_experts, p.num_experts, l.begin());
    std::copy(bias.begin(), bias.end(), bd.begin());
    const Expected x = expected_row(p, l.data(), with_bias ? bd.data() : nullptr);
    std::set<int32_t> unique;
    double sum = 0.0;
    for (int j = 0; j < k; ++j) {
      SCOPED_TRACE(::testing::Message() << routing_method_name(p.method) << " E "
                                        << p.num_experts << " k " << k << " row " << t
                                        << " slot " << j);
      ASSERT_GE(ids[j], 0);
      ASSERT_LT(ids[j], p.num_experts);
      unique.insert(ids[j]);
      // Exact ids in the documented order (descending selection score, ties to lower id).
      ASSERT_EQ(ids[j], x.ids[j]);
      if (j > 0) {
        ASSERT_GT(x.sel[ids[j - 1]], x.sel[ids[j]]);
      }
      if (p.method == RoutingMethod::TopK) {
        ASSERT_EQ(w[j], logits[t * p.num_experts + ids[j]]);
      } else {
        ASSERT_NEAR(w[j], x.weights[j], 2e-6 * std::fabs(x.weights[j]));
      }
      sum += w[j];
    }
    EXPECT_EQ(unique.size(), static_cast<size_t>(k)) << "row " << t << ": repeated id";
    switch (p.method) {
      case RoutingMethod::Renormalize:
      case RoutingMethod::RenormalizeNaive: EXPECT_NEAR(sum, 1.0, 1e-5) << "row " << t; break;
      case RoutingMethod::DeepSeekV3:
        if (p.norm_topk_prob) {
          EXPECT_NEAR(sum, p.routed_scaling_factor, 1e-5 * p.routed_scaling_factor)
              << "row " << t;
        }
        break;
      case RoutingMethod::Default:
        EXPECT_LE(sum, 1.0 + 1e-6) << "row " << t;
        break;
      case RoutingMethod::Llama4: EXPECT_GT(w[0], 0.0f); EXPECT_LT(w[0], 1.0f); break;
      case RoutingMethod::TopK: break;
    }
  }
}

RoutingParams make_params(RoutingMethod m, int e, int k, int n_group = 0, int topk_group = 0,
                          float scale = 1.0f) {
  RoutingParams p;
  p.method = m;
  p.num_experts = e;
  p.top_k = k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.routed_scaling_factor = scale;
  return p;
}

TEST(RoutingInvariants, SoftmaxFamilyRandomShapes) {
  const RoutingMethod methods[] = {RoutingMethod::Default, RoutingMethod::Renormalize,
                                   RoutingMethod::RenormalizeNaive, RoutingMethod::TopK};
  const Shape shapes[] = {{7, 8, 2, 0, 0},  {33, 64, 6, 0, 0}, {19, 128, 8, 0, 0},
                          {5, 256, 8, 0, 0}, {3, 384, 8, 0, 0}, {4, 5, 5, 0, 0},
                          {6, 1, 1, 0, 0},   {9, 72, 1, 0, 0}};
  uint64_t salt = 100;
  for (RoutingMethod m : methods) {
    for (const Shape& s : shapes) {
      for (DType dt : {DType::F32, DType::BF16}) {
        // bf16 has too few values for 384 tie-free logits in one row.
        if (dt == DType::BF16 && s.num_experts > 128) continue;
        SCOPED_TRACE(::testing::Message() << routing_method_name(m) << " T " << s.num_tokens
                                          << " E " << s.num_experts << " k " << s.top_k << " "
                                          << dtype_name(dt));
        check_invariants(make_params(m, s.num_experts, s.top_k), s.num_tokens, dt, ++salt,
                         false);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(RoutingInvariants, Llama4RandomShapes) {
  for (int e : {1, 2, 16, 128, 160}) {
    SCOPED_TRACE(::testing::Message() << "E " << e);
    check_invariants(make_params(RoutingMethod::Llama4, e, 1), 23, DType::F32, 200 + e, false);
    if (HasFatalFailure()) return;
  }
}

TEST(RoutingInvariants, DeepSeekV3RandomShapes) {
  const Shape shapes[] = {{11, 8, 2, 4, 2},    {17, 64, 6, 8, 3},  {13, 256, 8, 8, 4},
                          {5, 384, 8, 1, 1},   {7, 160, 8, 8, 3},  {6, 6, 3, 3, 2},
                          {4, 64, 24, 8, 3},   {8, 32, 8, 16, 4},  {3, 256, 1, 8, 1}};
  const float scales[] = {1.0f, 2.5f, 2.827f};
  uint64_t salt = 300;
  for (const Shape& s : shapes) {
    for (float scale : scales) {
      for (bool with_bias : {true, false}) {
        for (bool norm : {true, false}) {
          SCOPED_TRACE(::testing::Message() << "E " << s.num_experts << " k " << s.top_k
                                            << " n_group " << s.n_group << " topk_group "
                                            << s.topk_group << " scale " << scale << " bias "
                                            << with_bias << " norm " << norm);
          RoutingParams p = make_params(RoutingMethod::DeepSeekV3, s.num_experts, s.top_k,
                                        s.n_group, s.topk_group, scale);
          p.norm_topk_prob = norm;
          check_invariants(p, s.num_tokens, DType::F32, ++salt, with_bias);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
  // bf16 logits and bias.
  RoutingParams p = make_params(RoutingMethod::DeepSeekV3, 64, 6, 8, 3, 2.5f);
  check_invariants(p, 9, DType::BF16, 399, true);
}

// All biased scores negative and k equal to the group size: every expert of the single kept
// group is picked. Scoring excluded experts 0 instead of -inf would pick experts of other groups.
TEST(RoutingInvariants, DeepSeekV3NegativeBiasedScores) {
  RoutingParams p = make_params(RoutingMethod::DeepSeekV3, 64, 8, 8, 1, 1.0f);
  check_invariants(p, 12, DType::F32, 500, true, -1.0f, -0.2f);
  if (HasFatalFailure()) return;

  // A hand-made row. Biased scores: group 0 ~ {-1.95, -1.94, -1.92, -1.91} (top-2 sum -3.83),
  // group 1 ~ {-0.62, -0.78, -0.97, -1.18} (top-2 sum -1.40). Group 1 is kept; all its biased
  // scores are negative, so scoring group 0's experts 0 instead of excluding them would pick
  // those instead.
  const int e_count = 8;
  RoutingParams q = make_params(RoutingMethod::DeepSeekV3, e_count, 4, 2, 1, 1.0f);
  const std::vector<float> logits = {-3.0f, -2.9f, -2.8f, -2.7f, 2.0f, 1.5f, 1.0f, 0.5f};
  const std::vector<float> bias2 = {-2.0f, -1.99f, -1.98f, -1.97f, -1.5f, -1.6f, -1.7f, -1.8f};
  HostTensor lt = to_tensor(logits, {1, e_count}, DType::F32);
  HostTensor bt = to_tensor(bias2, {e_count}, DType::F32);
  RouteOutputs out(1, 4);
  route(lt, bt, q, out.ids, out.weights);
  const int32_t* ids = out.ids.data<int32_t>();
  // All four experts of group 1, in descending biased-score order.
  EXPECT_EQ(std::vector<int32_t>(ids, ids + 4), (std::vector<int32_t>{4, 5, 6, 7}));
  double sum = 0.0;
  for (int j = 0; j < 4; ++j) sum += out.weights.data<float>()[j];
  EXPECT_NEAR(sum, 1.0, 1e-6);
}

// Without norm_topk_prob the weight is sigmoid(logit) * routed_scaling_factor.
TEST(RoutingInvariants, DeepSeekV3WithoutRenormalisation) {
  RoutingParams p = make_params(RoutingMethod::DeepSeekV3, 8, 2, 4, 2, 2.5f);
  p.norm_topk_prob = false;
  const std::vector<float> logits = {0.1f, 1.2f, -0.4f, 0.7f, 2.1f, -1.3f, 0.3f, 0.9f};
  HostTensor lt = to_tensor(logits, {1, 8}, DType::F32);
  RouteOutputs out(1, 2);
  route(lt, TensorView{}, p, out.ids, out.weights);
  std::vector<double> l(logits.begin(), logits.end());
  const Expected x = expected_row(p, l.data(), nullptr);
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(out.ids.data<int32_t>()[j], x.ids[j]);
    const double s = 1.0 / (1.0 + std::exp(-l[x.ids[j]]));
    EXPECT_NEAR(out.weights.data<float>()[j], s * 2.5, 1e-6);
  }
}

// Equal logits: the lower expert id ranks first (HELPERS.md item 7).
TEST(RoutingInvariants, TiesBreakTowardLowerId) {
  const std::vector<float> logits = {0.5f, 1.0f, 1.0f, 0.5f, 1.0f, -2.0f};
  HostTensor lt = to_tensor(logits, {1, 6}, DType::F32);
  for (RoutingMethod m : {RoutingMethod::Default, RoutingMethod::Renormalize,
                          RoutingMethod::RenormalizeNaive, RoutingMethod::TopK}) {
    SCOPED_TRACE(routing_method_name(m));
    RouteOutputs out(1, 4);
    route(lt, TensorView{}, make_params(m, 6, 4), out.ids, out.weights);
    const int32_t* ids = out.ids.data<int32_t>();
    EXPECT_EQ(std::vector<int32_t>(ids, ids + 4), (std::vector<int32_t>{1, 2, 4, 0}));
  }
  RouteOutputs out(1, 1);
  route(lt, TensorView{}, make_params(RoutingMethod::Llama4, 6, 1), out.ids, out.weights);
  EXPECT_EQ(out.ids.data<int32_t>()[0], 1);
}

TEST(RoutingInvariants, ZeroTokens) {
  for (int m = 0; m <= 5; ++m) {
    const auto method = static_cast<RoutingMethod>(m);
    SCOPED_TRACE(routing_method_name(method));
    RoutingParams p = method == RoutingMethod::DeepSeekV3
                          ? make_params(method, 64, 6, 8, 3, 2.5f)
                          : make_params(method, 64, method == RoutingMethod::Llama4 ? 1 : 6);
    // Views of zero rows with null data, as a caller with an empty batch may pass.
    const TensorView logits = make_view(nullptr, DType::F32, {0, 64});
    const TensorView ids = make_view(nullptr, DType::I32, {0, p.top_k});
    const TensorView w = make_view(nullptr, DType::F32, {0, p.top_k});
    HostTensor bias(DType::F32, {64});
    EXPECT_NO_THROW(route(logits, TensorView{}, p, ids, w));
    if (method == RoutingMethod::DeepSeekV3) {
      EXPECT_NO_THROW(route(logits, bias, p, ids, w));
    }
  }
}

// A non-contiguous row stride is rejected, but a size-1 dimension with any stride is
// contiguous and must be read correctly.
TEST(RoutingInvariants, SingleTokenWithOddRowStride) {
  std::vector<float> logits = {0.3f, -1.0f, 2.0f, 0.9f};
  TensorView lt = make_view(logits.data(), DType::F32, {1, 4});
  lt.strides[0] = 1000;
  RouteOutputs out(1, 2);
  route(lt, TensorView{}, make_params(RoutingMethod::TopK, 4, 2), out.ids, out.weights);
  EXPECT_EQ(out.ids.data<int32_t>()[0], 2);
  EXPECT_EQ(out.ids.data<int32_t>()[1], 3);
  EXPECT_EQ(out.weights.data<float>()[0], 2.0f);
}

TEST(RoutingParamsTest, MethodNames) {
  EXPECT_STREQ(routing_method_name(RoutingMethod::Default), "Default");
  EXPECT_STREQ(routing_method_name(RoutingMethod::Renormalize), "Renormalize");
  EXPECT_STREQ(routing_method_name(RoutingMethod::DeepSeekV3), "DeepSeekV3");
  EXPECT_STREQ(routing_method_name(RoutingMethod::Llama4), "Llama4");
  EXPECT_STREQ(routing_method_name(RoutingMethod::RenormalizeNaive), "RenormalizeNaive");
  EXPECT_STREQ(routing_method_name(RoutingMethod::TopK), "TopK");
  EXPECT_STREQ(routing_method_name(static_cast<RoutingMethod>(42)), "Unknown");
}

// ---------------------------------------------------------------------------------------------
// Argument validation: each bad input throws modmoe::Error naming the argument and what was
// expected, and writes nothing.

// Runs `fn`, expecting a modmoe::Error whose message contains every one of `needles`.
::testing::AssertionResult throws_with(const std::function<void()>& fn,
                                       std::initializer_list<const char*> needles) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const char* n : needles) {
      if (what.find(n) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "modmoe::Error message lacks \"" << n << "\": " << what;
      }
    }
    return ::testing::AssertionSuccess() << what;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-modmoe exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// A valid DeepSeekV3 problem that each test breaks in one way.
struct BadInputFixture : ::testing::Test {
  static constexpr int kTokens = 3, kExperts = 16, kTopK = 4;
  RoutingParams params = make_params(RoutingMethod::DeepSeekV3, kExperts, kTopK, 4, 2, 2.5f);
  HostTensor logits{DType::F32, {kTokens, kExperts}};
  HostTensor bias{DType::F32, {kExperts}};
  RouteOutputs out{kTokens, kTopK};

  void SetUp() override {
    std::mt19937_64 rng(test::seed(900));
    test::fill_normal(logits, rng, 1.5f);
    test::fill_normal(bias, rng, 0.1f);
  }
  ::testing::AssertionResult rejects(const RoutingParams& p,
                                     std::initializer_list<const char*> needles) {
    auto r = throws_with([&] { route(logits, bias, p, out.ids, out.weights); }, needles);
    if (r && !out.untouched()) return ::testing::AssertionFailure() << "outputs were written";
    return r;
  }
  ::testing::AssertionResult rejects(const TensorView& l, const TensorView& b,
                                     const TensorView& ids, const TensorView& w,
                                     std::initializer_list<const char*> needles) {
    auto r = throws_with([&] { route(l, b, params, ids, w); }, needles);
    if (r && !out.untouched()) return ::testing::AssertionFailure() << "outputs were written";
    return r;
  }
};

TEST_F(BadInputFixture, ValidBaselinePasses) {
  EXPECT_NO_THROW(route(logits, bias, params, out.ids, out.weights));
  EXPECT_FALSE(out.untouched());
}

TEST_F(BadInputFixture, TopKZero) {
  RoutingParams p = params;
  p.top_k = 0;
  EXPECT_TRUE(rejects(p, {"'params.top_k' = 0", "1 <= top_k <= num_experts (16)"}));
}

TEST_F(BadInputFixture, TopKAboveNumExperts) {
  RoutingParams p = make_params(RoutingMethod::Default, kExperts, 17);
  EXPECT_TRUE(throws_with([&] { p.validate(); },
                          {"'params.top_k' = 17", "1 <= top_k <= num_experts (16)"}));
}

TEST_F(BadInputFixture, NumExpertsZero) {
  RoutingParams p = make_params(RoutingMethod::Default, 0, 1);
  EXPECT_TRUE(throws_with([&] { p.validate(); }, {"'params.num_experts' = 0", ">= 1"}));
}

TEST_F(BadInputFixture, UnknownMethod) {
  RoutingParams p = params;
  p.method = static_cast<RoutingMethod>(9);
  EXPECT_TRUE(rejects(p, {"'params.method' = 9", "0 (Default) to 5 (TopK)"}));
}

TEST_F(BadInputFixture, Llama4NeedsTopKOne) {
  RoutingParams p = make_params(RoutingMethod::Llama4, kExperts, 2);
  EXPECT_TRUE(throws_with([&] { route(logits, TensorView{}, p, out.ids, out.weights); },
                          {"'params.top_k' = 2", "top_k == 1 for method Llama4"}));
}

TEST_F(BadInputFixture, DeepSeekV3GroupsMustDivideExperts) {
  RoutingParams p = params;
  p.n_group = 5;
  p.topk_group = 2;
  EXPECT_TRUE(rejects(p, {"'params.n_group' = 5", "divisor of num_experts (16)"}));
}

TEST_F(BadInputFixture, DeepSeekV3NeedsGroups) {
  RoutingParams p = params;
  p.n_group = 0;
  EXPECT_TRUE(rejects(p, {"'params.n_group' = 0", ">= 1 for method DeepSeekV3"}));
}

TEST_F(BadInputFixture, DeepSeekV3GroupOfOneExpert) {
  RoutingParams p = params;
  p.n_group = 16;
  p.topk_group = 4;
  EXPECT_TRUE(rejects(p, {"'params.n_group' = 16", "groups of >= 2 experts"}));
}

TEST_F(BadInputFixture, DeepSeekV3TopkGroupAboveNGroup) {
  RoutingParams p = params;
  p.topk_group = 5;
  EXPECT_TRUE(rejects(p, {"'params.topk_group' = 5", "1 <= topk_group <= n_group (4)"}));
  p.topk_group = 0;
  EXPECT_TRUE(rejects(p, {"'params.topk_group' = 0", "1 <= topk_group <= n_group (4)"}));
}

TEST_F(BadInputFixture, DeepSeekV3TopKAboveKeptExperts) {
  RoutingParams p = params;
  p.topk_group = 1;  // 1 group of 4 experts kept, k = 4 fits; k = 5 does not
  p.top_k = 5;
  RouteOutputs out5(kTokens, 5);
  EXPECT_TRUE(throws_with([&] { route(logits, bias, p, out5.ids, out5.weights); },
                          {"'params.top_k' = 5", "(1 * 4 = 4)"}));
}

TEST_F(BadInputFixture, ScalingFactorMustBeFinitePositive) {
  RoutingParams p = params;
  for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    p.routed_scaling_factor = bad;
    EXPECT_TRUE(rejects(p, {"'params.routed_scaling_factor'", "finite value > 0"})) << bad;
  }
}

TEST_F(BadInputFixture, GroupingOrScalingForOtherMethods) {
  RoutingParams p = make_params(RoutingMethod::Renormalize, kExperts, kTopK, 4, 2);
  EXPECT_TRUE(throws_with([&] { route(logits, TensorView{}, p, out.ids, out.weights); },
                          {"'params.n_group' = 4", "expected 0 for method Renormalize"}));
  p = make_params(RoutingMethod::Default, kExperts, kTopK, 0, 0, 2.5f);
  EXPECT_TRUE(throws_with([&] { route(logits, TensorView{}, p, out.ids, out.weights); },
                          {"'params.routed_scaling_factor' = 2.5", "expected 1 for method Default"}));
}

TEST_F(BadInputFixture, LogitsMissing) {
  EXPECT_TRUE(rejects(TensorView{}, bias, out.ids, out.weights, {"'logits' is missing"}));
}

TEST_F(BadInputFixture, LogitsDtype) {
  HostTensor l(DType::I32, {kTokens, kExperts});
  EXPECT_TRUE(rejects(l, bias, out.ids, out.weights, {"'logits' has dtype i32", "expected f32 or bf16"}));
}

TEST_F(BadInputFixture, LogitsExpertDimension) {
  HostTensor l(DType::F32, {kTokens, kExperts + 1});
  EXPECT_TRUE(rejects(l, bias, out.ids, out.weights,
                      {"'logits' has shape [3, 17]", "expected [*, 16]"}));
  HostTensor l3(DType::F32, {1, kTokens, kExperts});
  EXPECT_TRUE(rejects(l3, bias, out.ids, out.weights,
                      {"'logits' has shape [1, 3, 16]", "expected [*, 16]"}));
}

TEST_F(BadInputFixture, LogitsNotContiguous) {
  HostTensor big(DType::F32, {kTokens, 2 * kExperts});
  TensorView l = big.view();
  l.shape[1] = kExperts;  // every other half-row: row stride 32, not 16
  EXPECT_TRUE(rejects(l, bias, out.ids, out.weights, {"'logits'", "is not contiguous"}));
}

TEST_F(BadInputFixture, TopkIdsDtype) {
  HostTensor ids(DType::I64, {kTokens, kTopK});
  EXPECT_TRUE(rejects(logits, bias, ids, out.weights, {"'topk_ids' has dtype", "expected i32"}));
}

TEST_F(BadInputFixture, TopkIdsShape) {
  HostTensor ids(DType::I32, {kTokens, kTopK + 1});
  EXPECT_TRUE(rejects(logits, bias, ids, out.weights,
                      {"'topk_ids' has shape [3, 5]", "expected [3, 4]"}));
  HostTensor ids2(DType::I32, {kTokens + 1, kTopK});
  EXPECT_TRUE(rejects(logits, bias, ids2, out.weights,
                      {"'topk_ids' has shape [4, 4]", "expected [3, 4]"}));
}

TEST_F(BadInputFixture, TopkWeightsDtype) {
  HostTensor w(DType::BF16, {kTokens, kTopK});
  EXPECT_TRUE(rejects(logits, bias, out.ids, w, {"'topk_weights' has dtype", "expected f32"}));
}

TEST_F(BadInputFixture, TopkWeightsMissing) {
  EXPECT_TRUE(rejects(logits, bias, out.ids, TensorView{}, {"'topk_weights' is missing"}));
}

TEST_F(BadInputFixture, BiasForAnotherMethod) {
  RoutingParams p = make_params(RoutingMethod::Default, kExperts, kTopK);
  EXPECT_TRUE(throws_with([&] { route(logits, bias, p, out.ids, out.weights); },
                          {"'bias'", "method Default", "expected no bias"}));
  EXPECT_TRUE(out.untouched());
}

TEST_F(BadInputFixture, BiasShapeAndDtype) {
  HostTensor b(DType::F32, {kExperts + 1});
  EXPECT_TRUE(rejects(logits, b, out.ids, out.weights, {"'bias' has shape [17]", "expected [16]"}));
  HostTensor b16(DType::F16, {kExperts});
  EXPECT_TRUE(rejects(logits, b16, out.ids, out.weights, {"'bias' has dtype f16", "expected f32 or bf16"}));
}

TEST_F(BadInputFixture, DeviceMismatch) {
  TensorView ids = out.ids.view();
  ids.device = Device::cuda(0);
  EXPECT_TRUE(rejects(logits, bias, ids, out.weights,
                      {"'topk_ids' is on cuda:0", "expected cpu"}));
  TensorView b = bias.view();
  b.device = Device::cuda(1);
  EXPECT_TRUE(rejects(logits, b, out.ids, out.weights, {"'bias' is on cuda:1", "expected cpu"}));
}

TEST_F(BadInputFixture, NullDataPointer) {
  const TensorView l = make_view(nullptr, DType::F32, {kTokens, kExperts});
  EXPECT_TRUE(rejects(l, bias, out.ids, out.weights, {"'logits'", "null data pointer"}));
}

#ifndef MODMOE_WITH_CUDA
TEST_F(BadInputFixture, CudaViewsInCpuOnlyBuild) {
  auto on_gpu = [](TensorView v) {
    v.device = Device::cuda(0);
    return v;
  };
  EXPECT_TRUE(throws_with(
      [&] {
        route(on_gpu(logits), on_gpu(bias), params, on_gpu(out.ids), on_gpu(out.weights));
      },
      {"cuda:0", "no CUDA backend", "rebuild with nvcc"}));
  EXPECT_TRUE(out.untouched());
}
#endif

}  // namespace
}  // namespace modmoe
