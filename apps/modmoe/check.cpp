#include "check.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "parallel.h"
#include "reference/dense.h"

namespace modmoe::app {

SampleCheck check_sampled_tokens(const ExpertsInputs& in, const ExpertMap& map,
                                 const ExpertsOptions& options, const ExpertSubset& subset,
                                 const TensorView& out, int max_samples, bool emulate) {
  const HostTensor x = to_host(in.hidden), ids = to_host(in.topk_ids),
                   w = to_host(in.topk_weights), y = to_host(out);
  const bool scaled = in.hidden_scale.defined();
  const HostTensor xs = scaled ? to_host(in.hidden_scale) : HostTensor();
  const int64_t t_all = x.view().size(0), h = x.view().size(1);
  const int k = static_cast<int>(ids.view().size(1));
  SampleCheck res;
  res.num_tokens = static_cast<int>(std::min<int64_t>(t_all, max_samples));
  if (res.num_tokens == 0) return res;
  const int64_t s_count = res.num_tokens;
  // Bytes of one token's row of hidden, and of its scales ([1]: one for the whole tensor).
  const size_t row_bytes = static_cast<size_t>(h) * dtype_bytes(x.view().dtype);
  const bool per_tensor = scaled && xs.numel() == 1;
  const int64_t scales_per_row = scaled && !per_tensor ? xs.numel() / t_all : 0;

  // The sampled tokens, with their ids renumbered into the subset of experts they touch, so
  // that only those experts' weights are brought to the host.
  HostTensor sx(x.view().dtype, {s_count, h}), sids(DType::I32, {s_count, k}), sw(DType::F32, {s_count, k});
  HostTensor sxs;
  if (per_tensor) {
    sxs.reset(DType::F32, {1});
    sxs.data<float>()[0] = xs.data<float>()[0];
  } else if (scaled) {
    sxs.reset(DType::F32, scales_per_row == 1 ? std::vector<int64_t>{s_count}
                                              : std::vector<int64_t>{s_count, scales_per_row});
  }
  std::map<int, int> slot;  // local expert -> index in the subset
  std::vector<int> experts;
  for (int64_t s = 0; s < s_count; ++s) {
    const int64_t t = s * t_all / s_count;
    std::memcpy(static_cast<char*>(sx.view().data) + s * row_bytes,
                static_cast<const char*>(x.view().data) + t * row_bytes, row_bytes);
    if (scales_per_row > 0) {
      std::memcpy(sxs.data<float>() + s * scales_per_row, xs.data<float>() + t * scales_per_row,
                  static_cast<size_t>(scales_per_row) * sizeof(float));
    }
    for (int j = 0; j < k; ++j) {
      const int id = ids.data<int32_t>()[t * k + j];
      int sub_id = -1;
      if (map.is_local(id)) {
        const int local = id - map.local_expert_offset;
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
  const ExpertWeights sub = subset(experts, keep);
  reference::DenseOptions dense;
  dense.round_intermediate = emulate;
  dense.keep_unrounded = emulate;
  // One dense call per sampled token, the tokens in parallel: the same numbers as one call
  // over all of them, since every (token, slot) is computed on its own.
  auto row = [](const HostTensor& t, int64_t s) {  // [1, cols] view of row s
    const TensorView& v = t.view();
    const int64_t cols = v.numel() / v.size(0);
    return make_view(static_cast<char*>(v.data) + s * cols * static_cast<int64_t>(dtype_bytes(v.dtype)),
                     v.dtype, {1, cols});
  };
  std::vector<double> pure(static_cast<size_t>(s_count * h)), emulated(pure.size());
  parallel_for(s_count, [&](int64_t s) {
    ExpertsInputs one;
    one.hidden = row(sx, s);
    if (scaled) one.hidden_scale = per_tensor ? sxs.view() : row(sxs, s);
    one.topk_ids = row(sids, s);
    one.topk_weights = row(sw, s);
    const auto ref = reference::dense_moe_f64(one, sub, ExpertMap::single(std::max(1, res.num_experts)),
                                              options, dense);
    std::copy(ref.out.begin(), ref.out.end(), (emulate ? emulated : pure).begin() + s * h);
    if (emulate) std::copy(ref.out_unrounded.begin(), ref.out_unrounded.end(), pure.begin() + s * h);
  });

  auto rel_l2 = [&](const std::vector<double>& r) {
    double num = 0.0, den = 0.0;
    for (int64_t s = 0; s < s_count; ++s) {
      const int64_t t = s * t_all / s_count;
      for (int64_t c = 0; c < h; ++c) {
        const double o = bf16_bits_to_float(y.data<uint16_t>()[t * h + c]);
        const double v = r[s * h + c];
        num += std::isfinite(o) ? (o - v) * (o - v) : INFINITY;
        den += v * v;
      }
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  };
  res.rel_l2 = rel_l2(pure);
  if (emulate) res.rel_l2_emulated = rel_l2(emulated);
  return res;
}

SampleCheck check_sampled_tokens(const Layer& layer, const TensorView& hidden,
                                 const TensorView& topk_ids, const TensorView& topk_weights,
                                 const TensorView& out, int max_samples) {
  ExpertsInputs in;
  in.hidden = hidden;
  in.topk_ids = topk_ids;
  in.topk_weights = topk_weights;
  auto subset = [&layer](const std::vector<int>& experts, std::vector<HostTensor>& keep) {
    return layer.host_subset(experts, keep);
  };
  return check_sampled_tokens(in, layer.map, layer.options, subset, out, max_samples);
}

}  // namespace modmoe::app
