// CPU reference for stage 1, routing (docs/contract.md "Stage 1"; tests/data/routing/README.md).
// Plain fp32 math, one token at a time. modmoe::route (src/api/routing.cpp) has validated every
// argument, so this file assumes valid input.
//
// Row order (docs/HELPERS.md item 7): descending selection score, ties toward the lower expert
// id. The selection score is the softmax prob for Default/RenormalizeNaive, the logit for
// Renormalize/TopK/Llama4 and the biased sigmoid score for DeepSeekV3.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "backend.h"
#include "modmoe/dtype.h"

namespace modmoe::reference {
namespace {

// Strict weak order for "a ranks before b": higher score first, then the lower id. NaN ranks
// first (as torch.topk does), so a NaN logit shows up in the weights instead of being dropped
// silently, and the order stays well defined for std::sort.
bool ranks_before(float score_a, int id_a, float score_b, int id_b) {
  const bool nan_a = std::isnan(score_a);
  const bool nan_b = std::isnan(score_b);
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && score_a != score_b) return score_a > score_b;
  return id_a < id_b;
}

// Writes the k best of `candidates` by `score` into `picks`, best first.
void top_k(const std::vector<float>& score, std::vector<int>& candidates, int k,
           std::vector<int>& picks) {
  std::partial_sort(candidates.begin(), candidates.begin() + k, candidates.end(),
                    [&](int a, int b) { return ranks_before(score[a], a, score[b], b); });
  picks.assign(candidates.begin(), candidates.begin() + k);
}

// Loads row `t` of an [T, E] (or [E] with t = 0) fp32|bf16 view into `out` as float.
void load_row(const TensorView& v, int64_t t, int num_experts, std::vector<float>& out) {
  out.resize(static_cast<size_t>(num_experts));
  const int64_t row = v.ndim == 2 ? t * v.stride(0) : 0;
  const int64_t col = v.stride(-1);
  for (int e = 0; e < num_experts; ++e) {
    const int64_t i = row + e * col;
    out[e] = v.dtype == DType::BF16 ? bf16_bits_to_float(v.ptr<const uint16_t>()[i])
                                    : v.ptr<const float>()[i];
  }
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Numerically stable softmax over the whole row: exp(l - max) / sum.
void softmax(const std::vector<float>& logits, std::vector<float>& probs) {
  const float max = *std::max_element(logits.begin(), logits.end());
  probs.resize(logits.size());
  // NOTE: the denominator is summed in double: an fp32 running sum over E = 512 drifts past
  // the 1e-6 relative weight tolerance of the contract.
  double sum = 0.0;
  for (size_t e = 0; e < logits.size(); ++e) {
    probs[e] = std::exp(logits[e] - max);
    sum += probs[e];
  }
  const float denom = static_cast<float>(sum);
  for (float& p : probs) p /= denom;
}

// Scratch reused across the tokens of one call.
struct Scratch {
  std::vector<float> logits;     // [E]
  std::vector<float> score;      // [E] selection score
  std::vector<float> value;      // [E] value the weights come from
  std::vector<int> candidates;   // expert ids still in the running
  std::vector<int> picks;        // [k], best first
  std::vector<float> group_score;  // [n_group]
  std::vector<int> groups;       // group ids
  std::vector<int> kept_groups;  // [topk_group]
};

// DeepSeekV3: s = sigmoid(l), b = s + bias. Groups are scored by the sum of their two largest
// b; the topk_group best groups are kept; the top-k of b among their experts are picked (other
// experts are excluded outright, never scored 0); weight = s / sum(s of picks) * scale.
void route_deepseek_v3(const RoutingParams& p, const std::vector<float>& bias, Scratch& s) {
  const int num_experts = p.num_experts;
  const int group_size = num_experts / p.n_group;
  s.value.resize(num_experts);
  s.score.resize(num_experts);
  for (int e = 0; e < num_experts; ++e) {
    s.value[e] = sigmoid(s.logits[e]);
    s.score[e] = bias.empty() ? s.value[e] : s.value[e] + bias[e];
  }
  s.group_score.resize(p.n_group);
  for (int g = 0; g < p.n_group; ++g) {
    // Two largest biased scores of the group; group_size >= 2 is validated.
    float first = -INFINITY, second = -INFINITY;
    for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
      const float b = s.score[e];
      if (b > first || std::isnan(b)) {
        second = first;
        first = b;
      } else if (b > second) {
        second = b;
      }
    }
    s.group_score[g] = first + second;
  }
  s.groups.resize(p.n_group);
  std::iota(s.groups.begin(), s.groups.end(), 0);
  top_k(s.group_score, s.groups, p.topk_group, s.kept_groups);
  // NOTE: only the kept groups' experts become candidates: that is the "-inf" exclusion, and it
  // differs from scoring them 0 whenever a biased score is negative.
  s.candidates.clear();
  for (int g : s.kept_groups) {
    for (int e = g * group_size; e < (g + 1) * group_size; ++e) s.candidates.push_back(e);
  }
  top_k(s.score, s.candidates, p.top_k, s.picks);
}

}  // namespace

void route(const TensorView& logits, const TensorView& bias, const RoutingParams& params,
           const TensorView& topk_ids, const TensorView& topk_weights, Stream /*stream*/) {
  const int64_t num_tokens = logits.size(0);
  const int num_experts = params.num_experts;
  const int k = params.top_k;

  std::vector<float> bias_f;  // [E] fp32, empty when absent
  if (bias.defined()) load_row(bias, 0, num_experts, bias_f);

  Scratch s;
  std::vector<float> weight(static_cast<size_t>(k));
  for (int64_t t = 0; t < num_tokens; ++t) {
    load_row(logits, t, num_experts, s.logits);
    s.candidates.resize(num_experts);
    std::iota(s.candidates.begin(), s.candidates.end(), 0);

    switch (params.method) {
      case RoutingMethod::Default:
      case RoutingMethod::RenormalizeNaive: {
        softmax(s.logits, s.score);
        top_k(s.score, s.candidates, k, s.picks);
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) {
          weight[j] = s.score[s.picks[j]];
          sum += weight[j];
        }
        if (params.method == RoutingMethod::RenormalizeNaive) {
          for (int j = 0; j < k; ++j) weight[j] /= sum;
        }
        break;
      }
      case RoutingMethod::Renormalize: {
        top_k(s.logits, s.candidates, k, s.picks);
        // Softmax over the k picked logits; picks[0] holds their max.
        const float max = s.logits[s.picks[0]];
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) {
          weight[j] = std::exp(s.logits[s.picks[j]] - max);
          sum += weight[j];
        }
        for (int j = 0; j < k; ++j) weight[j] /= sum;
        break;
      }
      case RoutingMethod::DeepSeekV3: {
        route_deepseek_v3(params, bias_f, s);
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) {
          weight[j] = s.value[s.picks[j]];
          sum += weight[j];
        }
        for (int j = 0; j < k; ++j) {
          if (params.norm_topk_prob) weight[j] /= sum;
          weight[j] *= params.routed_scaling_factor;
        }
        break;
      }
      case RoutingMethod::Llama4: {  // k == 1, validated
        top_k(s.logits, s.candidates, k, s.picks);
        weight[0] = sigmoid(s.logits[s.picks[0]]);
        break;
      }
      case RoutingMethod::TopK: {
        top_k(s.logits, s.candidates, k, s.picks);
        for (int j = 0; j < k; ++j) weight[j] = s.logits[s.picks[j]];
        break;
      }
    }

    int32_t* ids_row = topk_ids.ptr<int32_t>() + t * topk_ids.stride(0);
    float* weights_row = topk_weights.ptr<float>() + t * topk_weights.stride(0);
    for (int j = 0; j < k; ++j) {
      ids_row[j * topk_ids.stride(1)] = s.picks[j];
      weights_row[j * topk_weights.stride(1)] = weight[j];
    }
  }
}

}  // namespace modmoe::reference
