#include "check.h"

#include <cmath>
#include <cstring>
#include <map>

#include "reference/dense.h"

namespace modmoe::app {

SampleCheck check_sampled_tokens(const Layer& layer, const TensorView& hidden,
                                 const TensorView& topk_ids, const TensorView& topk_weights,
                                 const TensorView& out, int max_samples) {
  const HostTensor x = to_host(hidden), ids = to_host(topk_ids), w = to_host(topk_weights),
                   y = to_host(out);
  const int64_t t_all = x.view().size(0), h = layer.preset.hidden;
  const int k = static_cast<int>(ids.view().size(1));
  SampleCheck res;
  res.num_tokens = static_cast<int>(std::min<int64_t>(t_all, max_samples));
  if (res.num_tokens == 0) return res;
  const int64_t s_count = res.num_tokens;

  // The sampled tokens, with their ids renumbered into the subset of experts they touch, so
  // that only those experts' weights are regenerated on the host.
  HostTensor sx(DType::BF16, {s_count, h}), sids(DType::I32, {s_count, k}), sw(DType::F32, {s_count, k});
  std::map<int, int> slot;  // local expert -> index in the subset
  std::vector<int> experts;
  for (int64_t s = 0; s < s_count; ++s) {
    const int64_t t = s * t_all / s_count;
    std::memcpy(sx.data<uint16_t>() + s * h, x.data<uint16_t>() + t * h, static_cast<size_t>(h) * 2);
    for (int j = 0; j < k; ++j) {
      const int id = ids.data<int32_t>()[t * k + j];
      int sub_id = -1;
      if (layer.map.is_local(id)) {
        const int local = id - layer.map.local_expert_offset;
        auto it = slot.emplace(local, static_cast<int>(experts.size())).first;
        if (it->second == static_cast<int>(experts.size())) experts.push_back(local);
        sub_id = it->second;
      }
      sids.data<int32_t>()[s * k + j] = sub_id;
      sw.data<float>()[s * k + j] = w.data<float>()[t * k + j];
    }
  }
  res.num_experts = static_cast<int>(experts.size());
  std::vector<HostTensor> keep;
  const ExpertWeights sub = layer.host_subset(experts, keep);
  ExpertsInputs in;
  in.hidden = sx;
  in.topk_ids = sids;
  in.topk_weights = sw;
  const auto ref = reference::dense_moe_f64(in, sub, ExpertMap::single(std::max(1, res.num_experts)),
                                            layer.options);

  double num = 0.0, den = 0.0;
  for (int64_t s = 0; s < s_count; ++s) {
    const int64_t t = s * t_all / s_count;
    for (int64_t c = 0; c < h; ++c) {
      const double o = bf16_bits_to_float(y.data<uint16_t>()[t * h + c]);
      const double r = ref.out[s * h + c];
      num += std::isfinite(o) ? (o - r) * (o - r) : INFINITY;
      den += r * r;
    }
  }
  res.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return res;
}

}  // namespace modmoe::app
