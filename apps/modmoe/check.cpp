#include "check.h"

#include <algorithm>
#include <cmath>
#include <map>


namespace modmoe::app {
namespace {

double bf16_at(const HostTensor& t, int64_t i) { return bf16_bits_to_float(t.data<uint16_t>()[i]); }

double act_f64(Activation kind, double g, double u, const ActivationParams& p) {
  switch (kind) {
    case Activation::Swiglu: return g / (1.0 + std::exp(-g)) * u;
    case Activation::SwigluOai: {
      const double gc = std::min(g, static_cast<double>(p.limit));
      const double uc = std::clamp(u, -static_cast<double>(p.limit), static_cast<double>(p.limit));
      return gc / (1.0 + std::exp(-p.alpha * gc)) * (uc + p.beta);
    }
    case Activation::Geglu: return 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0))) * u;
    case Activation::Relu2: return g > 0 ? g * g : 0.0;
  }
  return 0.0;
}

}  // namespace

SampleCheck check_sampled_tokens(const Layer& layer, const TensorView& hidden,
                                 const TensorView& topk_ids, const TensorView& topk_weights,
                                 const TensorView& out, int max_samples) {
  const HostTensor x = to_host(hidden), ids = to_host(topk_ids), w = to_host(topk_weights),
                   y = to_host(out);
  const int64_t t_all = x.view().size(0), h = layer.preset.hidden, inter = layer.preset.intermediate;
  const int k = static_cast<int>(ids.view().size(1));
  SampleCheck res;
  res.num_tokens = static_cast<int>(std::min<int64_t>(t_all, max_samples));
  if (res.num_tokens == 0) return res;

  std::vector<int64_t> tokens;
  for (int s = 0; s < res.num_tokens; ++s) tokens.push_back(s * t_all / res.num_tokens);
  std::map<int, int> slot;  // local expert -> index in the host subset
  std::vector<int> experts;
  for (int64_t t : tokens) {
    for (int j = 0; j < k; ++j) {
      const int id = ids.data<int32_t>()[t * k + j];
      if (!layer.map.is_local(id)) continue;
      const int local = id - layer.map.local_expert_offset;
      if (slot.emplace(local, static_cast<int>(experts.size())).second) experts.push_back(local);
    }
  }
  res.num_experts = static_cast<int>(experts.size());
  std::vector<HostTensor> keep;
  const ExpertWeights sub = layer.host_subset(experts, keep);
  const HostTensor& w13 = keep[0];
  const HostTensor& w2 = keep[1];
  const ActivationParams& ap = layer.options.activation;
  const bool gated = is_gated(ap.kind);

  double num = 0.0, den = 0.0;
  std::vector<double> act(static_cast<size_t>(inter)), acc(static_cast<size_t>(h));
  for (int64_t t : tokens) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int j = 0; j < k; ++j) {
      const int id = ids.data<int32_t>()[t * k + j];
      if (!layer.map.is_local(id)) continue;
      const int e = slot[id - layer.map.local_expert_offset];
      const int64_t rows13 = w13.view().size(1);
      for (int64_t i = 0; i < inter; ++i) {
        double g = 0.0, u = 0.0;
        const int64_t gr = gated ? sub.gate_row(i) : i, ur = gated ? sub.up_row(i) : i;
        for (int64_t c = 0; c < h; ++c) {
          const double xv = bf16_at(x, t * h + c);
          g += xv * bf16_at(w13, (e * rows13 + gr) * h + c);
          if (gated) u += xv * bf16_at(w13, (e * rows13 + ur) * h + c);
        }
        if (sub.w13_bias.defined()) {
          g += sub.w13_bias.ptr<float>()[e * rows13 + gr];
          if (gated) u += sub.w13_bias.ptr<float>()[e * rows13 + ur];
        }
        act[i] = act_f64(ap.kind, g, u, ap);
      }
      const double wt = w.data<float>()[t * k + j];
      for (int64_t r = 0; r < h; ++r) {
        double s = 0.0;
        for (int64_t i = 0; i < inter; ++i) s += act[i] * bf16_at(w2, (e * h + r) * inter + i);
        if (sub.w2_bias.defined()) s += sub.w2_bias.ptr<float>()[e * h + r];
        acc[r] += wt * s;
      }
    }
    for (int64_t r = 0; r < h; ++r) {
      const double o = bf16_at(y, t * h + r);
      num += (o - acc[r]) * (o - acc[r]);
      den += acc[r] * acc[r];
      if (!std::isfinite(o)) num = INFINITY;
    }
  }
  res.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return res;
}

}  // namespace modmoe::app
