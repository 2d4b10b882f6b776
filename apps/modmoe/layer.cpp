#include "layer.h"

#include <cmath>
#include <cstring>
#include <unistd.h>
#include <cstdio>

#include "core/synth_fill.h"
#include "reference/ep_sim.h"

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

// A line per tenth of the experts done, for fills of a gigabyte or more (with E >= 10).
class Progress {
 public:
  Progress(bool on, int64_t num_experts, double bytes_per_expert, const char* what)
      : on_(on && num_experts >= 10 && bytes_per_expert * static_cast<double>(num_experts) >= 1073741824.0),
        n_(num_experts), bytes_(bytes_per_expert), what_(what), end_(isatty(fileno(stderr)) ? "\r" : "\n") {}
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress() {
    if (on_ && *end_ == '\r') std::fprintf(stderr, "\n");
  }
  void done(int64_t e) const {  // experts [0, e] are done
    if (on_ && (e + 1) % (n_ / 10) == 0) {
      std::fprintf(stderr, "  generating %s: %lld/%lld experts (%.1f GB)%s", what_, static_cast<long long>(e + 1),
                   static_cast<long long>(n_), 1e-9 * bytes_ * static_cast<double>(e + 1), end_);
    }
  }

 private:
  bool on_;
  int64_t n_;
  double bytes_;
  const char* what_;
  const char* end_;
};

// The synthetic stream of a local expert: it depends only on the global id, not on the slice
// this rank holds, so every rank and the CPU check see the same weights.
uint64_t expert_stream(uint64_t stream, const ExpertMap& map, int64_t local_expert) {
  return stream * 4096 + static_cast<uint64_t>(map.local_expert_offset + local_expert);
}

// Fills expert by expert.
void fill_experts(const TensorView& t, const ExpertMap& map, uint64_t seed, uint64_t stream,
                  float scale, bool progress, const char* what) {
  const Progress pr(progress, t.size(0), static_cast<double>(t.nbytes()) / static_cast<double>(t.size(0)), what);
  for (int64_t e = 0; e < t.size(0); ++e) {
    synth::fill(t.select0(e), seed, expert_stream(stream, map, e), scale);
    pr.done(e);
  }
}

// FP8 weights the way a loader of a bf16 checkpoint makes them (docs/fp8.md, "Weights"), one
// expert at a time: the expert's bf16 masters (the numbers of the bf16 layer) ->
// quantize_weights (one scale per 128x128 block, or per expert) -> prepare_weights
// (GateUpInterleaved, G = 8) into the layer's tensors. Scratch: one expert, canonical.
// The layer's fp32 biases (all local experts, into l and `all`) and one expert's staging
// biases (b13, b2, into `src`), where the preset has them: the quantized layers' builders.
void make_biases(Layer& l, ExpertWeights& all, ExpertWeights& src, Buffer& b13, Buffer& b2,
                 int64_t rows13) {
  if (!l.preset.has_biases) return;
  const int64_t e_local = l.map.num_local_experts, h = l.preset.hidden;
  l.w13_bias = Buffer(DType::F32, {e_local, rows13}, l.device);
  l.w2_bias = Buffer(DType::F32, {e_local, h}, l.device);
  all.w13_bias = l.w13_bias;
  all.w2_bias = l.w2_bias;
  b13 = Buffer(DType::F32, {1, rows13}, l.device);
  b2 = Buffer(DType::F32, {1, h}, l.device);
  src.w13_bias = b13;
  src.w2_bias = b2;
}

void make_fp8_weights(Layer& l, bool progress) {
  const Preset& p = l.preset;
  const int64_t e_local = l.map.num_local_experts, h = p.hidden, i = p.intermediate;
  const int64_t rows13 = is_gated(p.activation) ? 2 * i : i, b = kFp8BlockSize;
  const bool block = l.scheme == QuantScheme::Fp8Block128;
  const Device dev = l.device;
  // [n, rows/128, cols/128] or [n] fp32
  auto scale_shape = [&](int64_t n, int64_t rows, int64_t cols) {
    return block ? std::vector<int64_t>{n, rows / b, cols / b} : std::vector<int64_t>{n};
  };
  l.w13 = Buffer(DType::E4M3, {e_local, rows13, h}, dev);
  l.w2 = Buffer(DType::E4M3, {e_local, h, i}, dev);
  l.w13_scale = Buffer(DType::F32, scale_shape(e_local, rows13, h), dev);
  l.w2_scale = Buffer(DType::F32, scale_shape(e_local, h, i), dev);
  ExpertWeights all;  // the layer's tensors, all local experts
  all.scheme = l.scheme;
  all.w13 = l.w13;
  all.w2 = l.w2;
  all.w13_scale = l.w13_scale;
  all.w2_scale = l.w2_scale;
  const Buffer m13(DType::BF16, {1, rows13, h}, dev), m2(DType::BF16, {1, h, i}, dev);
  const Buffer q13(DType::E4M3, {1, rows13, h}, dev), q2(DType::E4M3, {1, h, i}, dev);
  const Buffer s13(DType::F32, scale_shape(1, rows13, h), dev), s2(DType::F32, scale_shape(1, h, i), dev);
  ExpertWeights src;  // one expert, canonical GateUp
  src.scheme = l.scheme;
  src.w13 = q13;
  src.w2 = q2;
  src.w13_scale = s13;
  src.w2_scale = s2;
  Buffer b13, b2;
  make_biases(l, all, src, b13, b2, rows13);
  const Progress pr(progress, e_local, static_cast<double>(q13.view().nbytes() + q2.view().nbytes()),
                    quant_scheme_name(l.scheme));
  ExpertWeights dst;
  for (int64_t e = 0; e < e_local; ++e) {
    synth::fill(m13, l.seed, expert_stream(kW13, l.map, e), 1.0f / std::sqrt(static_cast<float>(h)));
    synth::fill(m2, l.seed, expert_stream(kW2, l.map, e), 1.0f / std::sqrt(static_cast<float>(i)));
    quantize_weights(m13, l.scheme, q13, s13);
    quantize_weights(m2, l.scheme, q2, s2);
    if (p.has_biases) {
      synth::fill(b13, l.seed, expert_stream(kW13Bias, l.map, e), 0.05f);
      synth::fill(b2, l.seed, expert_stream(kW2Bias, l.map, e), 0.05f);
    }
    dst = reference::slice_experts(all, e, 1);
    prepare_weights(src, dst);
    pr.done(e);
  }
  l.weights = all;
  l.weights.layout = dst.layout;  // what prepare_weights chose (Canonical for Relu2)
  l.weights.order = dst.order;
  l.weights.interleave_rows = dst.interleave_rows;
}

// NVFP4 weights the way a loader of a bf16 checkpoint quantized by ModelOpt gets them
// (docs/nvfp4.md, "Weights"), one expert at a time: the expert's bf16 masters ->
// quantize_nvfp4 (one dynamic global per matrix of the expert: gate and up share w13's) ->
// prepare_weights (GateUpInterleaved, G = 8) into the layer's tensors. The same bytes as
// reference::quantize_nvfp4_weights on the host.
void make_nvfp4_weights(Layer& l, bool progress) {
  const Preset& p = l.preset;
  const int64_t e_local = l.map.num_local_experts, h = p.hidden, i = p.intermediate;
  const int64_t rows13 = is_gated(p.activation) ? 2 * i : i, b = kNvfp4BlockSize;
  const Device dev = l.device;
  l.w13 = Buffer(DType::E2M1x2, {e_local, rows13, h / 2}, dev);
  l.w2 = Buffer(DType::E2M1x2, {e_local, h, i / 2}, dev);
  l.w13_scale = Buffer(DType::E4M3, {e_local, rows13, h / b}, dev);
  l.w2_scale = Buffer(DType::E4M3, {e_local, h, i / b}, dev);
  l.w13_global = Buffer(DType::F32, {e_local}, dev);
  l.w2_global = Buffer(DType::F32, {e_local}, dev);
  ExpertWeights all;
  all.scheme = QuantScheme::Nvfp4;
  all.w13 = l.w13;
  all.w2 = l.w2;
  all.w13_scale = l.w13_scale;
  all.w2_scale = l.w2_scale;
  all.w13_global_scale = l.w13_global;
  all.w2_global_scale = l.w2_global;
  const Buffer m13(DType::BF16, {rows13, h}, dev), m2(DType::BF16, {h, i}, dev);
  const Buffer q13(DType::E2M1x2, {1, rows13, h / 2}, dev), q2(DType::E2M1x2, {1, h, i / 2}, dev);
  const Buffer s13(DType::E4M3, {1, rows13, h / b}, dev), s2(DType::E4M3, {1, h, i / b}, dev);
  const Buffer g13(DType::F32, {1}, dev), g2(DType::F32, {1}, dev);
  ExpertWeights src;  // one expert, canonical GateUp
  src.scheme = QuantScheme::Nvfp4;
  src.w13 = q13;
  src.w2 = q2;
  src.w13_scale = s13;
  src.w2_scale = s2;
  src.w13_global_scale = g13;
  src.w2_global_scale = g2;
  Buffer b13, b2;
  make_biases(l, all, src, b13, b2, rows13);
  const Progress pr(progress, e_local, static_cast<double>(q13.view().nbytes() + q2.view().nbytes()), "nvfp4");
  ExpertWeights dst;
  for (int64_t e = 0; e < e_local; ++e) {
    synth::fill(m13, l.seed, expert_stream(kW13, l.map, e), 1.0f / std::sqrt(static_cast<float>(h)));
    synth::fill(m2, l.seed, expert_stream(kW2, l.map, e), 1.0f / std::sqrt(static_cast<float>(i)));
    quantize_nvfp4(m13, q13.view().select0(0), s13.view().select0(0), g13);
    quantize_nvfp4(m2, q2.view().select0(0), s2.view().select0(0), g2);
    if (p.has_biases) {
      synth::fill(b13, l.seed, expert_stream(kW13Bias, l.map, e), 0.05f);
      synth::fill(b2, l.seed, expert_stream(kW2Bias, l.map, e), 0.05f);
    }
    dst = reference::slice_experts(all, e, 1);
    prepare_weights(src, dst);
    pr.done(e);
  }
  l.weights = all;
  l.weights.layout = dst.layout;
  l.weights.order = dst.order;
  l.weights.interleave_rows = dst.interleave_rows;
}

}  // namespace

Layer::Layer(const Preset& p, const ExpertMap& m, Device dev, uint64_t s, bool progress, QuantScheme q)
    : preset(p), map(m), device(dev), seed(s), scheme(q) {
  const int64_t e_local = map.num_local_experts, h = p.hidden, i = p.intermediate;
  const int64_t rows13 = is_gated(p.activation) ? 2 * i : i;
  if (scheme == QuantScheme::Nvfp4) {
    MODMOE_CHECK(h % 64 == 0 && i % 64 == 0, "preset ", p.name, " with quant scheme nvfp4: H = ", h, ", I = ", i,
                 ": expected multiples of 64 (16-value scale blocks, the W4A16 kernel's K tile); pick another "
                 "preset or bf16");
    MODMOE_CHECK(e_local >= 1, "synthetic layer of preset ", p.name, ": no local experts");
    make_nvfp4_weights(*this, progress);
  } else if (scheme != QuantScheme::None) {
    MODMOE_CHECK(scheme == QuantScheme::Fp8Block128 || scheme == QuantScheme::Fp8PerTensor,
                 "synthetic layer with quant scheme ", quant_scheme_name(scheme),
                 ": expected none (bf16), fp8-block, fp8-tensor or nvfp4");
    MODMOE_CHECK(h % kFp8BlockSize == 0 && i % kFp8BlockSize == 0, "preset ", p.name, " with quant scheme ",
                 quant_scheme_name(scheme), ": H = ", h, ", I = ", i,
                 ": expected multiples of 128 (the FP8 scale block); pick another preset or bf16");
    MODMOE_CHECK(e_local >= 1, "synthetic layer of preset ", p.name, ": no local experts");
    make_fp8_weights(*this, progress);
  } else {
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
  ExpertWeights w;  // bf16, canonical GateUp, whatever this layer holds
  w.order = GateUpOrder::GateUp;
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
    const int64_t e = local_experts[j];
    synth::fill_host(w.w13.select0(j), seed, expert_stream(kW13, map, e), 1.0f / std::sqrt(static_cast<float>(h)));
    synth::fill_host(w.w2.select0(j), seed, expert_stream(kW2, map, e), 1.0f / std::sqrt(static_cast<float>(i)));
    if (bias) {
      synth::fill_host(w.w13_bias.select0(j), seed, expert_stream(kW13Bias, map, e), 0.05f);
      synth::fill_host(w.w2_bias.select0(j), seed, expert_stream(kW2Bias, map, e), 0.05f);
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
