#include "bench_weights.h"

#include <chrono>
#include <cstdio>
#include <cstring>

#include "parallel.h"
#include "reference/quantize_weights.h"

namespace modmoe::app {
namespace {

// Every per-expert tensor of ExpertWeights: [E_local, ...] each, when defined.
constexpr TensorView ExpertWeights::*kTensors[] = {
    &ExpertWeights::w13,       &ExpertWeights::w2,       &ExpertWeights::w13_bias,
    &ExpertWeights::w2_bias,   &ExpertWeights::w13_scale, &ExpertWeights::w2_scale,
    &ExpertWeights::w13_global_scale, &ExpertWeights::w2_global_scale};

size_t expert_bytes(const TensorView& t) { return t.nbytes() / static_cast<size_t>(t.size(0)); }

char* expert_data(const TensorView& t, int64_t e) {
  return static_cast<char*>(t.data) + static_cast<size_t>(e) * expert_bytes(t);
}

// t's shape with `num_experts` experts.
std::vector<int64_t> shape_with(const TensorView& t, int64_t num_experts) {
  std::vector<int64_t> shape(t.shape.begin(), t.shape.begin() + t.ndim);
  shape[0] = num_experts;
  return shape;
}

// `like`'s fields, with every tensor replaced by a new one of `num_experts` experts on `device`.
ExpertWeights alloc_like(const ExpertWeights& like, int64_t num_experts, Device device,
                         std::vector<Buffer>& own) {
  ExpertWeights w = like;
  for (auto m : kTensors) {
    if (!(like.*m).defined()) continue;
    own.emplace_back((like.*m).dtype, shape_with(like.*m, num_experts), device);
    w.*m = own.back();
  }
  return w;
}

}  // namespace

ExpertWeights BenchWeights::subset(const Layer& layer, const std::vector<int>& local_experts,
                                   std::vector<HostTensor>& keep) const {
  if (dtype == BenchDtype::Bf16) return layer.host_subset(local_experts, keep);
  const int64_t n = static_cast<int64_t>(local_experts.size());
  ExpertWeights w = host;
  for (auto m : kTensors) {
    const TensorView& t = host.*m;
    if (!t.defined()) continue;
    keep.emplace_back(t.dtype, shape_with(t, n));
    for (int64_t j = 0; j < n; ++j) {
      std::memcpy(expert_data(keep.back(), j), expert_data(t, local_experts[j]), expert_bytes(t));
    }
    w.*m = keep.back();
  }
  return w;
}

BenchWeights make_bench_weights(const Layer& layer, BenchDtype dtype) {
  BenchWeights w;
  w.dtype = dtype;
  const int64_t num_experts = layer.map.num_local_experts;
  if (dtype == BenchDtype::Bf16) {
    w.prepared = alloc_like(layer.weights, num_experts, layer.device, w.buffers);
    prepare_weights(layer.weights, w.prepared);  // never in place
    return w;
  }
  const auto t0 = std::chrono::steady_clock::now();
  const QuantScheme scheme = bench_scheme(dtype);
  auto quantize_expert = [&](int64_t e, std::vector<HostTensor>& keep) {
    return reference::quantize_expert_weights(layer.host_subset({static_cast<int>(e)}, keep),
                                              scheme, keep);
  };
  std::vector<HostTensor> first_keep;
  const ExpertWeights first = quantize_expert(0, first_keep);  // gives the shapes
  w.host = alloc_like(first, num_experts, Device::cpu(), w.host_keep);
  parallel_for(num_experts, [&](int64_t e) {
    std::vector<HostTensor> keep;
    const ExpertWeights q = e == 0 ? first : quantize_expert(e, keep);
    for (auto m : kTensors) {
      if ((q.*m).defined()) std::memcpy(expert_data(w.host.*m, e), (q.*m).data, (q.*m).nbytes());
    }
  });
  std::vector<Buffer> staging;
  ExpertWeights prepared_host = alloc_like(w.host, num_experts, Device::cpu(), staging);
  prepare_weights(w.host, prepared_host);
  w.prepared = alloc_like(prepared_host, num_experts, layer.device, w.buffers);
  for (auto m : kTensors) {
    if ((prepared_host.*m).defined()) copy_from_host(prepared_host.*m, w.prepared.*m);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "  %s weights of %s: %lld experts quantized and prepared in %.1f s\n",
               bench_dtype_name(dtype), layer.preset.name.c_str(),
               static_cast<long long>(num_experts), s);
  return w;
}

}  // namespace modmoe::app
