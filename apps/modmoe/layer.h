// One synthetic MoE layer of a preset: seeded weights, tokens and router logits, on the CPU or
// a GPU. Shared by `modmoe demo` and the benchmarks.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/host_tensor.h"
#include "core/presets.h"
#include "modmoe/modmoe.h"
#ifdef MODMOE_WITH_CUDA
#include "cuda/device/device_tensor.h"
#endif

namespace modmoe::app {

// A tensor owned on the host or on a GPU.
class Buffer {
 public:
  Buffer() = default;
  Buffer(DType dtype, const std::vector<int64_t>& shape, Device device);
  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }  // NOLINT

 private:
  std::shared_ptr<HostTensor> host_;
#ifdef MODMOE_WITH_CUDA
  std::shared_ptr<DeviceTensor> dev_;
#endif
  TensorView view_;
};

// Copies any view (host or device, contiguous) into a new host tensor.
HostTensor to_host(const TensorView& t);
// The inverse: copies a host view into `dst` (host or device, contiguous, same bytes).
void copy_from_host(const TensorView& host, const TensorView& dst);
// 0xFF bytes (NaN in bf16 and fp32), on the host or the device: an unwritten element fails.
void poison(const TensorView& t);
// Waits for the device's work (nothing to wait for on the CPU).
void synchronize(const Device& device);

// Stream ids of the synthetic tensors (synth.h), so a check can regenerate any of them.
enum SynthStream : uint64_t { kW13 = 1, kW2, kW13Bias, kW2Bias, kHidden, kLogits, kRouteBias };

struct Layer {
  Preset preset;
  ExpertMap map;
  Device device;
  uint64_t seed = 0;
  QuantScheme scheme = QuantScheme::None;
  // None: bf16, canonical GateUp layout. Fp8Block128 / Fp8PerTensor: e4m3 quantized from the
  // same bf16 numbers (quantize_weights), prepared (GateUpInterleaved, G = 8, when gated).
  // Nvfp4: E2M1x2 [E_local, 2I, H/2] / [E_local, H, I/2] quantized from the same bf16 numbers
  // (quantize_nvfp4, one dynamic global per expert and matrix, as a ModelOpt checkpoint),
  // prepared the same way.
  Buffer w13, w2, w13_bias, w2_bias;
  // FP8: [E_local, 2I/128, H/128] and [E_local, H/128, I/128], or [E_local] fp32.
  // Nvfp4: e4m3 block scales [E_local, 2I, H/16] and [E_local, H, I/16].
  Buffer w13_scale, w2_scale;
  Buffer w13_global, w2_global;  // Nvfp4 only: [E_local] fp32
  ExpertWeights weights;
  ExpertsOptions options;
  Buffer route_bias;  // [E] fp32, DeepSeekV3-style methods only

  // Allocates and fills the weights of experts [map.local_expert_offset, + num_local_experts).
  // `progress` prints a line per tenth done when the fill is large. FP8 schemes need H and I
  // multiples of 128, Nvfp4 multiples of 64 (the W4A16 kernel's K tile).
  Layer(const Preset& preset, const ExpertMap& map, Device device, uint64_t seed, bool progress,
        QuantScheme scheme = QuantScheme::None);
  // Host bf16 weights (canonical) of the listed local experts only, regenerated from the seed:
  // what a sampled check on the CPU needs. For an FP8 or NVFP4 layer, the masters it was
  // quantized from.
  ExpertWeights host_subset(const std::vector<int>& local_experts, std::vector<HostTensor>& keep) const;
};

struct Batch {
  Buffer hidden;  // [T, H] bf16
  Buffer logits;  // [T, E] fp32
  Batch(const Layer& layer, int64_t num_tokens, uint64_t batch_seed);
};

}  // namespace modmoe::app
