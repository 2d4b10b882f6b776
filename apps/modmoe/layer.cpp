#include "layer.h"

#include <cmath>
#include <cstring>
#include <unistd.h>
#include <cstdio>

#include "core/synth_fill.h"

namespace modmoe::app {

Buffer::Buffer(DType dtype, const std::vector<int64_t>& shape, Device device) {
  if (device.is_cuda()) {
#ifdef MODMOE_WITH_CUDA
    dev_ = std::make_shared<DeviceTensor>(dtype, shape, device.index);
    view_ = dev_->view();
#else
    MODMOE_FAIL("a CUDA tensor was requested but this build has no CUDA backend");
#endif
  } else {
    host_ = std::make_shared<HostTensor>(dtype, shape);
    view_ = host_->view();
  }
}

HostTensor to_host(const TensorView& t) {
  HostTensor h(t.dtype, std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim));
  if (t.nbytes() == 0) return h;
  if (t.device.is_cuda()) {
#ifdef MODMOE_WITH_CUDA
    MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, t.data, t.nbytes(), cudaMemcpyDeviceToHost));
#endif
  } else {
    std::memcpy(h.view().data, t.data, t.nbytes());
  }
  return h;
}

void copy_from_host(const TensorView& host, const TensorView& dst) {
  MODMOE_CHECK(!host.device.is_cuda() && host.nbytes() == dst.nbytes(), "copy_from_host: ",
               host.nbytes(), " bytes on ", host.device.to_string(), " into ", dst.nbytes(),
               " bytes on ", dst.device.to_string());
  if (dst.nbytes() == 0) return;
  if (dst.device.is_cuda()) {
#ifdef MODMOE_WITH_CUDA
    MODMOE_CUDA_CHECK(cudaMemcpy(dst.data, host.data, host.nbytes(), cudaMemcpyHostToDevice));
#endif
  } else {
    std::memcpy(dst.data, host.data, host.nbytes());
  }
}

void poison(const TensorView& t) {
  if (t.device.is_cuda()) {
#ifdef MODMOE_WITH_CUDA
    MODMOE_CUDA_CHECK(cudaMemset(t.data, 0xff, t.nbytes()));
#endif
  } else {
    std::memset(t.data, 0xff, t.nbytes());
  }
}

void synchronize(const Device& device) {
#ifdef MODMOE_WITH_CUDA
  if (device.is_cuda()) MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
#else
  (void)device;
#endif
}

namespace {

// Fills expert by expert so the stream index of an element depends only on its global expert
// id, not on the slice this rank holds: every rank and the CPU check see the same weights.
void fill_experts(const TensorView& t, const ExpertMap& map, uint64_t seed, uint64_t stream,
                  float scale, bool progress, const char* what) {
  const int64_t per_expert = t.numel() / t.size(0);
  // Only fills of a gigabyte or more take long enough to be worth a progress line.
  progress = progress && t.nbytes() >= (size_t{1} << 30) && t.size(0) >= 10;
  const char* end = isatty(fileno(stderr)) ? "\r" : "\n";
  for (int64_t e = 0; e < t.size(0); ++e) {
    TensorView slice = t.select0(e);
    const uint64_t expert_stream = stream * 4096 + static_cast<uint64_t>(map.local_expert_offset + e);
    synth::fill(slice, seed, expert_stream, scale);
    if (progress && (e + 1) % (t.size(0) / 10) == 0) {
      std::fprintf(stderr, "  generating %s: %lld/%lld experts (%.1f GB)%s", what,
                   static_cast<long long>(e + 1), static_cast<long long>(t.size(0)),
                   1e-9 * static_cast<double>(per_expert * (e + 1)) * 2.0, end);
    }
  }
  if (progress && *end == '\r') std::fprintf(stderr, "\n");
}

}  // namespace

Layer::Layer(const Preset& p, const ExpertMap& m, Device dev, uint64_t s, bool progress)
    : preset(p), map(m), device(dev), seed(s) {
  const int64_t e_local = map.num_local_experts, h = p.hidden, i = p.intermediate;
  const int64_t rows13 = is_gated(p.activation) ? 2 * i : i;
  w13 = Buffer(DType::BF16, {e_local, rows13, h}, dev);
  w2 = Buffer(DType::BF16, {e_local, h, i}, dev);
  fill_experts(w13, map, seed, kW13, 1.0f / std::sqrt(static_cast<float>(h)), progress, "w13");
  fill_experts(w2, map, seed, kW2, 1.0f / std::sqrt(static_cast<float>(i)), progress, "w2");
  weights.w13 = w13;
  weights.w2 = w2;
  weights.order = GateUpOrder::GateUp;
  if (p.has_biases) {
    w13_bias = Buffer(DType::F32, {e_local, rows13}, dev);
    w2_bias = Buffer(DType::F32, {e_local, h}, dev);
    fill_experts(w13_bias, map, seed, kW13Bias, 0.05f, false, "w13 bias");
    fill_experts(w2_bias, map, seed, kW2Bias, 0.05f, false, "w2 bias");
    weights.w13_bias = w13_bias;
    weights.w2_bias = w2_bias;
  }
  options.activation.kind = p.activation;
  options.do_finalize = true;
  if (p.routing.method == RoutingMethod::DeepSeekV3) {
    route_bias = Buffer(DType::F32, {p.num_experts}, dev);
    synth::fill(route_bias, seed, kRouteBias, 0.05f);
  }
}

ExpertWeights Layer::host_subset(const std::vector<int>& local_experts,
                                 std::vector<HostTensor>& keep) const {
  const int64_t n = static_cast<int64_t>(local_experts.size());
  const int64_t h = preset.hidden, i = preset.intermediate;
  const int64_t rows13 = is_gated(preset.activation) ? 2 * i : i;
  keep.emplace_back(DType::BF16, std::vector<int64_t>{n, rows13, h});
  keep.emplace_back(DType::BF16, std::vector<int64_t>{n, h, i});
  ExpertWeights w = weights;
  w.w13 = keep[keep.size() - 2];
  w.w2 = keep[keep.size() - 1];
  const bool bias = preset.has_biases;
  if (bias) {
    keep.emplace_back(DType::F32, std::vector<int64_t>{n, rows13});
    keep.emplace_back(DType::F32, std::vector<int64_t>{n, h});
    w.w13_bias = keep[keep.size() - 2];
    w.w2_bias = keep[keep.size() - 1];
  }
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t global = static_cast<uint64_t>(map.local_expert_offset + local_experts[j]);
    synth::fill_host(w.w13.select0(j), seed, kW13 * 4096 + global, 1.0f / std::sqrt(static_cast<float>(h)));
    synth::fill_host(w.w2.select0(j), seed, kW2 * 4096 + global, 1.0f / std::sqrt(static_cast<float>(i)));
    if (bias) {
      synth::fill_host(w.w13_bias.select0(j), seed, kW13Bias * 4096 + global, 0.05f);
      synth::fill_host(w.w2_bias.select0(j), seed, kW2Bias * 4096 + global, 0.05f);
    }
  }
  return w;
}

Batch::Batch(const Layer& layer, int64_t num_tokens, uint64_t batch_seed) {
  const Preset& p = layer.preset;
  hidden = Buffer(DType::BF16, {num_tokens, p.hidden}, layer.device);
  logits = Buffer(DType::F32, {num_tokens, p.num_experts}, layer.device);
  synth::fill(hidden, batch_seed, kHidden, 0.1f);
  synth::fill(logits, batch_seed, kLogits, 1.5f);
}

}  // namespace modmoe::app
