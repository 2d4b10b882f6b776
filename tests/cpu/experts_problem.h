// A random experts-stage problem on the host, shared by the experts tests: inputs, routing
// and canonical weights, with views for modmoe::experts and the dense reference.
#pragma once

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "modmoe/modmoe.h"
#include "reference/dense.h"

namespace modmoe::test {

struct ProblemSpec {
  int64_t num_tokens = 24;  // M
  int64_t hidden = 128;     // H
  int64_t inter = 64;       // I
  int num_experts = 8;      // E, global
  int top_k = 2;
  ExpertMap map = ExpertMap::single(8);
  Activation act = Activation::Swiglu;
  GateUpOrder order = GateUpOrder::GateUp;
  bool biases = false;
  bool lora = false;
  bool per_expert_act = false;  // SwigluOai alpha/beta/limit tensors
  // Fraction of slots given a non-local id (-1, num_experts, or another rank's expert).
  double junk_fraction = 0.0;
};

struct Problem {
  ProblemSpec spec;
  HostTensor hidden;    // [M, H] bf16, N(0, 0.1^2)
  HostTensor ids;       // [M, k] int32, distinct global ids per row
  HostTensor wts;       // [M, k] fp32, positive, rows sum to 1 over the real picks
  HostTensor w13;       // [E_local, 2I or I, H] bf16, N(0, 1/H), canonical `order`
  HostTensor w2;        // [E_local, H, I] bf16, N(0, 1/I)
  HostTensor w13_bias;  // [E_local, 2I or I] fp32, optional
  HostTensor w2_bias;   // [E_local, H] fp32, optional
  HostTensor lora;      // [M, k, 2I or I] bf16, optional
  HostTensor alpha, beta, limit;  // [E_local] fp32, optional

  int64_t rows13() const { return is_gated(spec.act) ? 2 * spec.inter : spec.inter; }

  ExpertWeights weights() const {
    ExpertWeights w;
    w.order = spec.order;
    w.w13 = w13;
    w.w2 = w2;
    if (spec.biases) {
      w.w13_bias = w13_bias;
      w.w2_bias = w2_bias;
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
    if (spec.per_expert_act) {
      o.activation.alpha_per_expert = alpha;
      o.activation.beta_per_expert = beta;
      o.activation.limit_per_expert = limit;
    }
    o.do_finalize = do_finalize;
    return o;
  }
};

inline Problem make_problem(const ProblemSpec& spec, uint64_t salt) {
  std::mt19937_64 rng(seed(salt));
  Problem p;
  p.spec = spec;
  const int64_t M = spec.num_tokens, H = spec.hidden, I = spec.inter;
  const int k = spec.top_k, E = spec.num_experts;
  const int64_t num_local = spec.map.num_local_experts;
  p.hidden.reset(DType::BF16, {M, H});
  fill_normal(p.hidden, rng, 0.1f);

  p.ids.reset(DType::I32, {M, k});
  p.wts.reset(DType::F32, {M, k});
  std::vector<int> perm(static_cast<size_t>(E));
  std::uniform_real_distribution<float> uw(0.2f, 1.0f);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  for (int64_t m = 0; m < M; ++m) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      int id = perm[j];
      if (u01(rng) < spec.junk_fraction) {
        const int choice = static_cast<int>(rng() % 3);
        id = choice == 0 ? -1 : (choice == 1 ? E : id);
      }
      p.ids.data<int32_t>()[m * k + j] = id;
      const float w = uw(rng);
      p.wts.data<float>()[m * k + j] = w;
      sum += w;
    }
    for (int j = 0; j < k; ++j) p.wts.data<float>()[m * k + j] /= sum;
  }

  p.w13.reset(DType::BF16, {num_local, p.rows13(), H});
  fill_normal(p.w13, rng, 1.0f / std::sqrt(static_cast<float>(H)));
  p.w2.reset(DType::BF16, {num_local, H, I});
  fill_normal(p.w2, rng, 1.0f / std::sqrt(static_cast<float>(I)));
  if (spec.biases) {
    p.w13_bias.reset(DType::F32, {num_local, p.rows13()});
    fill_normal(p.w13_bias, rng, 0.05f);
    p.w2_bias.reset(DType::F32, {num_local, H});
    fill_normal(p.w2_bias, rng, 0.05f);
  }
  if (spec.lora) {
    p.lora.reset(DType::BF16, {M, k, p.rows13()});
    fill_normal(p.lora, rng, 0.05f);
  }
  if (spec.per_expert_act) {
    // Limits inside the range of the GEMM1 outputs (std ~0.1) so the clamps are exercised.
    p.alpha.reset(DType::F32, {num_local});
    p.beta.reset(DType::F32, {num_local});
    p.limit.reset(DType::F32, {num_local});
    for (int64_t e = 0; e < num_local; ++e) {
      p.alpha.data<float>()[e] = 1.0f + 0.25f * static_cast<float>(e % 4);
      p.beta.data<float>()[e] = 0.5f + 0.125f * static_cast<float>(e % 5);
      p.limit.data<float>()[e] = 0.05f + 0.025f * static_cast<float>(e % 4);
    }
  }
  return p;
}

// Outputs of one experts() call, poisoned before it runs.
struct Outputs {
  HostTensor out;        // [M, H] bf16
  HostTensor gemm2_out;  // [M*k, H] bf16
  HostTensor expert_weights;
  HostTensor e2p;
  HostTensor offsets;
  HostTensor act;  // [M*k, I] bf16, when asked

  ExpertsOutputs views() const {
    ExpertsOutputs o;
    if (out.view().ndim) o.out = out;
    if (gemm2_out.view().ndim) o.gemm2_out = gemm2_out;
    if (expert_weights.view().ndim) o.expert_weights = expert_weights;
    if (e2p.view().ndim) o.expanded_idx_to_permuted_idx = e2p;
    if (offsets.view().ndim) o.expert_first_token_offset = offsets;
    if (act.view().ndim) o.gemm1_activation_output = act;
    return o;
  }
};

// Runs experts() on `p` (with `in`/`w` overriding the problem's views when given).
inline Outputs run_experts(const Problem& p, const ExpertsInputs& in, const ExpertWeights& w,
                           const ExpertsOptions& opt, bool with_act = false) {
  const int64_t M = p.spec.num_tokens, H = p.spec.hidden;
  const int k = p.spec.top_k;
  Outputs o;
  if (opt.do_finalize) {
    o.out.reset(DType::BF16, {M, H});
  } else {
    o.gemm2_out.reset(DType::BF16, {M * k, H});
    o.expert_weights.reset(DType::F32, {M, k});
    o.e2p.reset(DType::I32, {M, k});
    o.offsets.reset(DType::I64, {p.spec.map.num_local_experts + 1});
  }
  if (with_act) o.act.reset(DType::BF16, {M * k, p.spec.inter});
  poison(o.out);
  poison(o.gemm2_out);
  poison(o.expert_weights);
  poison(o.e2p);
  poison(o.offsets);
  poison(o.act);
  experts(in, w, p.spec.map, opt, o.views());
  return o;
}

inline Outputs run_experts(const Problem& p, const ExpertsOptions& opt, bool with_act = false) {
  return run_experts(p, p.inputs(), p.weights(), opt, with_act);
}

}  // namespace modmoe::test
